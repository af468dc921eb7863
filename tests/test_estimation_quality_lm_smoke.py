"""Smoke test of the estimation-quality benchmark's char-level Transformer LM (issue 14, goal c) and of
``benchmarks/estimation_regret.py``: tiny sizes, a few seconds; checks what must hold whatever the timings are."""

import json
import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone
pytest.importorskip("matplotlib")

from benchmarks import estimation_quality as eq  # noqa: E402
from benchmarks import estimation_regret  # noqa: E402
from benchmarks.lm_data import VOCAB_SIZE  # noqa: E402
from fisher_optim import diagonal_fisher  # noqa: E402
from fisher_optim.selection import CLOSED_FORM_SEEDS  # noqa: E402


def assert_tables_well_formed(md: str) -> None:
    """Every markdown table's delimiter row has as many cells as its header (else it does not render)."""
    lines = md.splitlines()
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("|---"):
            assert line.count("|") == lines[i - 1].count("|"), lines[i - 1]


def test_lm_problem_data_model_and_reference():
    cfg = eq.Config.smoke("lm")
    x, y = eq.load_data(cfg)
    xs, ys = eq.load_pool(cfg, x, y)
    assert x.shape == (cfg.n_train, cfg.seq_len) and xs.shape == (cfg.n_pool, cfg.seq_len)
    assert bool((x[:, 1:] == y[:, :-1]).all()) and bool((xs[:, 1:] == ys[:, :-1]).all())  # next characters
    assert cfg.seq_len * VOCAB_SIZE > CLOSED_FORM_SEEDS  # the smoke run takes the LM's long-output path too
    model = eq.make_model(cfg)
    assert model(xs).shape == (cfg.n_pool, cfg.seq_len, VOCAB_SIZE)
    ref = eq.full_data_references(model, xs, ys, cfg)
    exact = diagonal_fisher(model, xs, likelihood="categorical", estimator="exact")
    for n in ref["names"]:  # the reference is the exact Fisher of the pool
        torch.testing.assert_close(ref["fisher"][n].float(), exact[n], rtol=1e-4, atol=1e-6 * float(exact[n].max()))
    full = eq.Config.for_problem("lm")
    assert full.budget_by == "mc1 N=1" and "exact" not in full.curves and full.n_pool == 16
    assert full.m <= full.n_pool and full.reference_dtype == "float32"


def test_lm_smoke_run_and_regret_script(tmp_path):
    runs = {}
    for problem in ("lm", "cnn"):
        res = eq.main(["--smoke", "--problem", problem, "--out", str(tmp_path)])
        runs[problem] = res
    res = runs["lm"]
    cfg = res["config"]
    md = (tmp_path / "estimation_quality_lm.md").read_text()
    assert "python benchmarks/estimation_quality.py --smoke --problem lm" in md and "Goal (c)" in md
    assert "held-out validation windows" in md and "## Why" in md
    for problem in ("lm", "cnn"):
        stem = f"estimation_quality_{problem}"
        assert_tables_well_formed((tmp_path / f"{stem}.md").read_text())
    assert (tmp_path / "estimation_quality_lm.png").stat().st_size > 0
    for ck in res["checkpoints"]:
        for st in ck["streams"]:
            traces = st["traces"]
            assert set(traces) == set(cfg.curves) and traces["mc1 N=1"].refreshes == cfg.k_exact
            auto = traces[eq.AUTO]
            assert auto.kind[0] == eq.PLAN  # the first refresh: Hutchinson (start_plan), not an exact pass
            for name, tr in traces.items():
                errs = np.stack(tr.err_full)
                assert np.isfinite(errs).all() and (errs > 0).all(), name
            for sel in st["selections"]:  # selections from draws: every sampled family's variance online or a bound
                assert {c["source"] for c in sel.values() if c["estimator"] != "exact"} <= {"online", "bound"}
    saved = json.loads(res["json"].read_text())
    assert saved["problem"] == "lm" and saved["fixed"] == list(cfg.fixed)
    for ck in saved["wall"]:
        assert all(math.isfinite(v) for s in cfg.curves for v in ck["curves"][s])
    # the regret script on the two saved results
    out = tmp_path / "regret.md"
    reg = estimation_regret.main([str(tmp_path / "estimation_quality_lm.json"),
                                  str(tmp_path / "estimation_quality_cnn.json"), "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert "python benchmarks/estimation_regret.py" in text and "Goal (c)" in text and "| **auto** |" in text
    assert_tables_well_formed(text)
    for p in reg["per"]:
        for s, v in p.items():
            assert math.isfinite(v["worst"]) and v["worst"] > 0
            if s != eq.AUTO:
                assert v["worst"] >= 1 - 1e-12  # a fixed strategy is never better than the best fixed one
    assert reg["regret"][eq.AUTO]["n"] == 2
