"""Smoke test of ``benchmarks/estimation_quality.py`` (issue 4, benchmark c) and exact checks of its pieces.

The running estimate and its prediction formula are checked against obviously-right references (explicit weighted
sums; exact enumeration over input subsets and labels); the ``--smoke`` run checks what must hold whatever the
timings are.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from benchmarks import estimation_quality as eq  # noqa: E402
from fisher_optim import diagonal_fisher  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_running_fisher_is_the_bias_corrected_weighted_average():
    beta, k = 0.9, 7
    gen = torch.Generator().manual_seed(0)
    ests = [{"w": torch.rand(3, 2, generator=gen, dtype=torch.float64)} for _ in range(k)]
    run = eq.RunningFisher(beta)
    for e in ests:
        run.update(e)
    w = [(1 - beta) * beta ** (k - 1 - j) for j in range(k)]
    ref = sum(wj * e["w"] for wj, e in zip(w, ests)) / sum(w)
    torch.testing.assert_close(run.value()["w"], ref, rtol=1e-14, atol=0)
    assert math.isclose(eq.ema_weight_ratio(beta, k), sum(x * x for x in w) / sum(w) ** 2, rel_tol=1e-12)
    assert eq.ema_weight_ratio(beta, 1) == pytest.approx(1.0, rel=1e-14)
    const = eq.RunningFisher(0.99)  # bias correction: a constant stream is reproduced from the first refresh
    for _ in range(3):
        const.update({"w": torch.full((2,), 0.25)})
        torch.testing.assert_close(const.value()["w"], torch.full((2,), 0.25, dtype=torch.float64), rtol=1e-14, atol=0)


def test_step_values_use_the_last_completed_refresh():
    cum = np.array([1.0, 2.0, 4.0])
    vals = np.array([0.5, 0.3, 0.1])
    got = eq.step_values(cum, vals, np.array([0.5, 1.0, 1.5, 3.9, 4.0, 9.0]))
    np.testing.assert_array_equal(got, [1.0, 0.5, 0.5, 0.3, 0.1, 0.1])


def test_predicted_error_matches_enumeration_over_subsets_and_labels():
    """E||F_hat - F_full||^2 over all M-subsets of P inputs and all label draws (one refresh, mc1 N=1) equals
    (c_M A + L1)/M exactly: the prediction used in the report."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 3)).double()
    P, M, C = 5, 2, 3
    x = torch.randn(P, 4, dtype=torch.float64)
    y = torch.randint(0, C, (P,))
    cfg = eq.Config(n_train=P, chunk=3)
    cfg.defaults = {**cfg.defaults, "fisher_batch": M}
    ref = eq.full_data_references(net, x, y, cfg)
    probs = torch.softmax(net(x), -1).detach()
    names = ref["names"]
    sq = dict.fromkeys(names, 0.0)
    subsets = list(itertools.combinations(range(P), M))
    for sub in subsets:
        idx = torch.tensor(sub)
        for labels in itertools.product(range(C), repeat=M):
            t = torch.tensor(labels)
            p = float(probs[idx, t].prod()) / len(subsets)
            est = diagonal_fisher(net, x[idx], likelihood="categorical", estimator="empirical", targets=t)
            for n in names:  # the empirical Fisher with the drawn labels is Î₁ with those labels
                sq[n] += p * float(((est[n] - ref["fisher"][n]) ** 2).sum())
    pred = eq.predicted_error(ref, names, cfg, 1, 1, "L1", True)
    for j, n in enumerate(names):
        assert math.isclose(math.sqrt(sq[n]) / ref["per"][n]["norm_F"], pred[j], rel_tol=1e-9), n
    # without labels (exact estimator): the input part alone
    sq_in = dict.fromkeys(names, 0.0)
    for sub in subsets:
        est = diagonal_fisher(net, x[list(sub)], likelihood="categorical", estimator="exact")
        for n in names:
            sq_in[n] += float(((est[n] - ref["fisher"][n]) ** 2).sum()) / len(subsets)
    pred_in = eq.predicted_error(ref, names, cfg, 1, math.inf, "L1", True)
    for j, n in enumerate(names):
        assert math.isclose(math.sqrt(sq_in[n]) / ref["per"][n]["norm_F"], pred_in[j], rel_tol=1e-9), n


def test_smoke_run_writes_report_and_respects_budgets(tmp_path):
    res = eq.main(["--smoke", "--out", str(tmp_path)])
    md = (tmp_path / "estimation_quality.md").read_text()
    assert "python benchmarks/estimation_quality.py --smoke" in md
    assert "## Answer" in md and "## Why" in md and "## Proposal" in md
    assert (tmp_path / "estimation_quality.png").read_bytes()[:8] == PNG
    assert torch.get_num_threads() >= 1  # restored (the run itself uses one thread)
    for ck in res["checkpoints"]:
        for st in ck["streams"]:
            traces = st["traces"]
            k_exact = res["config"].k_exact
            assert traces["exact"].refreshes == k_exact
            T = st["T"]
            for clock in ("wall", "cpu"):
                assert T[clock] == pytest.approx(traces["exact"].cum(clock, False)[-1], rel=1e-12)
            for name, tr in traces.items():
                wall, cpu = tr.cum("wall", with_selection=False), tr.cum("cpu", with_selection=False)
                # every strategy reaches the budget on both clocks, and stops once it has (after exact's last refresh)
                assert wall[-1] >= T["wall"] and cpu[-1] >= T["cpu"], name
                if tr.refreshes > k_exact:
                    assert wall[-2] < T["wall"] or cpu[-2] < T["cpu"], name
                errs = np.stack(tr.err_full)
                assert np.isfinite(errs).all() and (errs > 0).all(), name
            assert (np.stack(traces["exact"].err_stream) == 0).all()  # the exact strategy is the reference
            for name in ("mc1 N=1", "mc1 N=4", "empirical"):
                assert (np.stack(traces[name].err_stream) > 0).all(), name
            # auto selects on its first refresh and then every variance_interval refreshes
            n_sel = sum(w > 0 for w in traces[eq.AUTO].sel_wall)
            interval = res["config"].defaults["variance_interval"]
            assert n_sel == len(st["selections"]) == math.ceil(traces[eq.AUTO].refreshes / interval)
            for sel in st["selections"]:
                assert {c["estimator"] for c in sel.values()} <= {"exact", "mc1", "mc2", "empirical"}
    for r in res["rows"]:
        for c in eq.CURVES:
            assert r["table"][(c, "full")].shape == (len(res["config"].fractions),)
