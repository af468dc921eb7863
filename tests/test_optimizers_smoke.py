"""Smoke test of the optimizer benchmark (``python -m benchmarks.optimizers --smoke``), so it cannot rot.

One in-process smoke run trains every problem with every available optimizer for a few steps (tiny data, the
grid's centre learning rate, one seed) and writes its report to a temporary folder; the tests below check that
every baseline took its steps, and the report.  An optimizer whose package is missing is skipped by the
benchmark with its reason, and the check of that optimizer is skipped here with the same reason.  The protocol's
pieces (grid extension, bootstrap, paired comparison, Sophia-G's update) are tested on hand-made inputs.
"""

import dataclasses
import json
import math
import time
import warnings

import pytest
import torch

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone
pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")
pytest.importorskip("tqdm")

from benchmarks import optimizers as bench  # noqa: E402
from benchmarks import (  # noqa: E402
    optimizers_problems,  # noqa: E402
    stats,
    tuning,
)
from benchmarks.optimizers_baselines import DEFAULT_OPTIMIZERS, hidden_matrices, make_optimizers  # noqa: E402
from benchmarks.optimizers_problems import PROBLEMS, make_problems  # noqa: E402

try:  # ResNet-18 comes from torchvision; without it the smoke run covers the other problems
    import torchvision  # noqa: F401

    RUN = list(make_problems())  # the built-in problems and every registered one
except ImportError:
    RUN = [p for p in make_problems() if p != "resnet18"]

SPECS = make_optimizers()
MISSING = {k: s.unavailable() for k, s in SPECS.items() if s.unavailable()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("optbench")
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    res = bench.main(["--smoke", "--out", str(out), "--problems", *RUN])
    elapsed = time.perf_counter() - t0
    if elapsed > 60:  # the budget of this smoke run (2 shared cores); a warning, since load varies
        warnings.warn(f"optimizer benchmark smoke run took {elapsed:.0f} s (budget 60 s)", stacklevel=1)
    assert torch.get_num_threads() == threads
    return out, res


@pytest.mark.parametrize("opt", DEFAULT_OPTIMIZERS)
def test_every_baseline_takes_its_steps(smoke, opt):
    _, res = smoke
    if opt in MISSING:
        assert res["skipped"][opt] == MISSING[opt]
        pytest.skip(f"{opt} not available here: {MISSING[opt]}")
    assert list(res["problems"]) == RUN
    for p in RUN:
        (run,) = bench.runs_of(res, p, "final", opt)
        assert run.error == "", (p, opt, run.error)
        assert not run.diverged and not run.capped, (p, opt)
        assert run.steps == 3 and run.train_s > 0 and math.isfinite(run.test), (p, opt)
        assert [c[0] for c in run.curve] == [0, 3] and [s for s, _ in run.losses] == [3], (p, opt)
        assert res["problems"][p]["grids"][opt]["edge"] == "single"


def test_the_baselines_are_the_issue_15_set():
    assert set(DEFAULT_OPTIMIZERS) == {
        "sgd", "adam", "adamw", "schedulefree_adamw", "muon", "soap", "kron", "adahessian", "sophiah", "sophiag",
        "fisher_adam", "fisher_adam_exact", "fisher_adam_mc1", "fisher_adam_hutchinson_batch", "natural_gradient",
        "sf_fisher_adam", "fisher_adam_010",
    }  # fmt: skip
    import fisher_optim

    reason = SPECS["fisher_adam_hutchinson_batch"].unavailable()
    assert (reason == "") == ("hutchinson_batch" in fisher_optim.ESTIMATORS) or "fisher_optim.optim" in reason


def test_smoke_report_and_plots(smoke):
    out, res = smoke
    md = (out / "optimizers.md").read_text()
    assert "python -m benchmarks.optimizers --smoke --out" in md and "--problems logreg" in md
    assert "## Findings (generated from the numbers below)" in md and "Versions: torch" in md
    assert "Edge choices: none" in md and "(one value)" in md  # smoke runs one lr: flagged, not an edge
    for p in RUN:
        assert f"## {p}: " in md
        assert (out / f"optimizers_{p}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "optimizers_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "optimizers.json").read_text())
    assert raw["command"] == res["command"] and set(raw["problems"]) == set(RUN)
    if not {"fisher_adam_exact", "fisher_adam_mc1"} & set(MISSING):
        fs = res["fisher_scale"]
        assert len(fs["ratio"]) == 1 and 0 < fs["ratio"][0] < 10
        assert "## mc1 versus exact" in md


def test_report_re_rendered_from_json(smoke, tmp_path):
    out, res = smoke
    again = bench.main(["--from-json", str(out / "optimizers.json"), "--out", str(tmp_path)])
    assert again["command"] == res["command"]
    old, new = (out / "optimizers.md").read_text(), (tmp_path / "optimizers.md").read_text()
    assert "Rendered by `python -m benchmarks.optimizers --from-json" in new
    assert old.split("\n")[3:] == new.split("\n")[3:]  # identical below the header line
    assert (tmp_path / "optimizers_ratios.png").exists() and not (tmp_path / "optimizers.json").exists()


@pytest.mark.skipif("fisher_adam" in MISSING, reason=MISSING.get("fisher_adam", ""))
@pytest.mark.parametrize("opt", ["fisher_adam_mc2", "fisher_adam_empirical"])
def test_optional_fisher_estimators_run(opt):
    """The estimators outside the default list (mc2; empirical, which needs ``opt.step(targets=y)``)."""
    prob = make_problems()["poisson"]
    spec = SPECS[opt]
    run = bench.train(prob, prob.data(True), spec, spec.default_lr(), 0, max_steps=3, batch_size=8)
    assert run.error == "" and not run.diverged and run.steps == 3, run.error


def test_problem_registry(monkeypatch):
    monkeypatch.setattr(optimizers_problems, "REGISTRY", {})
    base = make_problems()["logreg"]

    @optimizers_problems.register_problem("logreg_copy")
    def copy():
        return dataclasses.replace(base, key="logreg_copy")

    assert list(make_problems()) == [*PROBLEMS, "logreg_copy"]
    with pytest.raises(ValueError, match="already registered"):
        optimizers_problems.register_problem("logreg")(copy)
    res = bench.run_benchmark([make_problems()["logreg_copy"]], [SPECS["adamw"]], 1, 1.0, True, 2)
    assert list(res["problems"]) == ["logreg_copy"]


def test_missing_package_skips_only_its_optimizer():
    specs = make_optimizers()
    broken = dataclasses.replace(specs["adam"], key="needs_pkg", requires="no_such_package_xyz")
    res = bench.run_benchmark([make_problems()["poisson"]], [specs["adamw"], broken], seeds=1, epochs_scale=1.0,
                              smoke=True, max_steps=2)  # fmt: skip
    assert "no_such_package_xyz is not importable" in res["skipped"]["needs_pkg"]
    assert list(res["problems"]["poisson"]["final"]) == ["adamw"]


def test_failing_optimizer_is_recorded_not_raised():
    prob = make_problems()["poisson"]

    def broken(model, lr, lik, seed):
        raise RuntimeError("boom")

    spec = bench.OptSpec("broken", "Broken", lambda: 1.0, broken, "first-order")
    run = bench.train(prob, prob.data(True), spec, 1.0, 0, max_steps=2)
    assert run.error == "RuntimeError: boom" and run.steps == 0
    assert bench.run_key(prob, run) == (math.inf, math.inf)


def test_divergence_stops_the_run():
    prob = make_problems()["poisson"]
    run = bench.train(prob, prob.data(True), SPECS["sgd"], 1e6, 0, max_steps=20)  # exp link: overflow at once
    assert run.diverged and run.steps < 20 and math.isnan(run.test)


class _Sleepy(bench.Runner):
    """A step that takes 30 s (time.sleep is interrupted by the SIGALRM time cap)."""

    def step(self, x, y):
        time.sleep(30.0)
        return 0.0


def test_time_cap_interrupts_a_step_and_stops_tuning():
    prob = dataclasses.replace(make_problems()["poisson"], time_cap_s=0.2)
    slow = bench.OptSpec("slow", "Slow", lambda: 0.1, lambda m, lr, lik, seed: _Sleepy(m, None, lik, seed),
                         "first-order")  # fmt: skip
    t0 = time.perf_counter()
    res = bench.run_benchmark([prob], [slow, SPECS["adamw"]], seeds=2, epochs_scale=1.0, smoke=False, max_steps=2)
    assert time.perf_counter() - t0 < 30  # the 30 s step was cut at 0.2 s
    pr = res["problems"]["poisson"]
    (run,) = bench.runs_of(res, "poisson", "tuning", "slow")  # the other grid values were not run
    assert run.capped and run.steps == 0 and 0.2 <= run.train_s < 5
    assert len(bench.runs_of(res, "poisson", "final", "slow")) == 1  # and no seeds
    assert "hit the 0.2 s time cap after 0 steps" in pr["notes"]["slow"] and pr["grids"]["slow"]["edge"] == "single"
    assert [r.seed for r in bench.runs_of(res, "poisson", "final", "adamw")] == [0, 1]


# -- the protocol's pieces ---------------------------------------------------------------------------------
def test_grid_is_half_decades_around_the_default():
    assert tuning.start_exponents(1e-3) == [-7, -6, -5]
    assert [tuning.lr_of(e) for e in tuning.start_exponents(2e-2)] == [0.01, 0.03162, 0.1]
    with pytest.raises(ValueError, match="Invalid default lr"):
        tuning.start_exponents(0.0)


@pytest.mark.parametrize(
    "best, expected",
    [
        (1e-3, [-7, -6, -5]),  # interior at once
        (1e-5, [-11, -10, -9, -8, -7, -6, -5]),  # extended down until 1e-5 has a neighbour below
        (3.0, [-7, -6, -5, -4, -3, -2, -1, 0]),  # up, but stopped by max_values=8: an edge choice
    ],
)
def test_grid_extends_until_the_best_is_interior(best, expected):
    """A validation curve with its optimum at ``best``: the search extends exactly as far as it must."""
    loss = lambda lr: (math.inf, abs(math.log10(lr) - math.log10(best)))  # noqa: E731
    gs = tuning.run_grid(tuning.GridSearch(1e-3, max_values=8), loss)
    assert sorted(gs.keys) == expected
    assert gs.edge() == ("high" if best == 3.0 else "")


def test_a_diverged_value_makes_the_best_interior():
    key = lambda lr: (math.inf, math.inf) if lr > 2e-3 else (math.inf, -lr)  # noqa: E731 -- larger is better
    gs = tuning.run_grid(tuning.GridSearch(1e-3), key)
    assert sorted(gs.keys) == [-7, -6, -5] and tuning.lr_of(gs.best()) == 1e-3 and gs.edge() == ""


def test_selection_prefers_fewer_steps_then_better_final_value():
    acc = lambda steps, v, failed=False: tuning.selection_key(steps, v, True, failed)  # noqa: E731
    assert acc(40, 0.95) < acc(60, 0.99) < acc(math.inf, 0.999) < acc(10, 0.99, failed=True)
    assert acc(40, 0.97) < acc(40, 0.95)
    assert tuning.selection_key(math.inf, 110.0, False, False) < tuning.selection_key(math.inf, 120.0, False, False)


def test_bootstrap_median_interval():
    med, lo, hi = stats.median_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert med == 3.0 and 1.0 <= lo <= 3.0 <= hi <= 100.0
    assert stats.median_ci([1.0, 2.0, 3.0, 4.0, 100.0]) == (med, lo, hi)  # seeded: the same numbers
    assert stats.median_ci([5.0]) == (5.0, 5.0, 5.0)
    assert stats.median_ci([10.0, math.inf, math.inf])[0] == math.inf
    assert all(math.isnan(v) for v in stats.median_ci([]))


def test_paired_ratio_and_sign_test():
    a = {0: 50.0, 1: 60.0, 2: 40.0, 3: math.inf, 4: math.inf}
    b = {0: 100.0, 1: 100.0, 2: 80.0, 3: 90.0, 4: math.inf}  # seed 4: neither reached, left out
    p = stats.paired_ratio(a, b)
    assert p.n == 4 and (p.n_less, p.n_more) == (3, 1) and p.median == pytest.approx(0.55)
    assert stats.sign_test(3, 1) == pytest.approx(0.625) and stats.sign_test(5, 0) == pytest.approx(0.0625)
    clear = stats.paired_ratio({s: 10.0 for s in range(6)}, {s: 20.0 + s for s in range(6)})
    assert clear.verdict == "less" and clear.high < 1
    d = stats.paired_difference({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.85})
    assert d.n == 2 and d.median == pytest.approx(0.0) and d.verdict == "unclear"


def test_muon_takes_hidden_matrices_only():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    hidden, rest = hidden_matrices(model)
    assert [tuple(p.shape) for p in hidden] == [(4, 8)]  # not the conv filter, not the output layer
    assert len(rest) == len(list(model.parameters())) - 1


def test_sophia_g_official_update_against_a_hand_computation():
    sophia_opt = pytest.importorskip("sophia_opt")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = sophia_opt.SophiaG([p], lr=0.1, betas=(0.5, 0.75), rho=0.5, weight_decay=0.0)
    g_hat = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)  # gradient of the sampled-label mean loss
    p.grad = g_hat.clone()
    opt.update_hessian()
    p.grad = torch.tensor([4.0, -1.0, 0.5], dtype=torch.float64)
    opt.step(bs=4)
    h = 0.25 * g_hat**2  # (1 - beta2) g_hat^2 from a zero start; the step divides by rho * B * h = rho * B g^2 ...
    m = 0.5 * p.grad
    ratio = torch.clamp(m.abs() / (0.5 * 4 * h + 1e-15), max=1.0)  # [1, 1 (h=0: clipped), 0.5]
    expected = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) - 0.1 * m.sign() * ratio
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--smoke", "--seeds", "0"], "Invalid seeds: 0"),
        (["--smoke", "--epochs-scale", "0"], "Invalid epochs_scale: 0"),
        (["--smoke", "--max-steps", "0"], "Invalid max_steps: 0"),
        (["--smoke", "--threads", "0"], "Invalid threads: 0"),
        (["--smoke", "--max-grid", "2"], "Invalid max_grid: 2"),
        (["--smoke", "--problems", "imagenet"], "Invalid problems"),
        (["--smoke", "--optimizers", "lbfgs"], "Invalid optimizers"),
    ],
)
def test_invalid_arguments(argv, msg):
    with pytest.raises(ValueError, match=msg):
        bench.main(argv)


def test_merge_results_of_different_problems():
    a = {"problems": {"logreg": {}}, "skipped": {}, "command": "A", "elapsed_s": 60.0, "fisher_scale": {"x": 1}}
    b = {"problems": {"cnn": {}}, "skipped": {"kron": "why"}, "command": "B", "elapsed_s": 30.0, "fisher_scale": None}
    m = bench.merge_results([a, b])
    assert list(m["problems"]) == ["logreg", "cnn"] and m["skipped"] == {"kron": "why"}
    assert m["command"] == "A ; B" and m["elapsed_s"] == 90.0 and m["fisher_scale"] == [{"x": 1}]


def test_merge_results_joins_optimizers_of_one_problem():
    def prob(opt, budget=100):
        return {"n_train": 64, "batch_size": 8, "budget_steps": budget, "grids": {opt: {"chosen": 1e-3}},
                "tuning": {opt: []}, "final": {opt: [{"seed": 0}]}, "notes": {}}  # fmt: skip

    a = {"problems": {"cnn": prob("adamw")}, "skipped": {}, "command": "A", "elapsed_s": 1.0}
    b = {"problems": {"cnn": prob("fisher_adam")}, "skipped": {}, "command": "B", "elapsed_s": 2.0}
    m = bench.merge_results([a, b])
    assert sorted(m["problems"]["cnn"]["final"]) == ["adamw", "fisher_adam"]
    assert sorted(m["problems"]["cnn"]["grids"]) == ["adamw", "fisher_adam"]
    assert list(a["problems"]["cnn"]["final"]) == ["adamw"]  # the inputs are not modified
    with pytest.raises(ValueError, match="more than one file"):
        bench.merge_results([a, a])
    with pytest.raises(ValueError, match="different data or budgets"):
        bench.merge_results([a, {**b, "problems": {"cnn": prob("fisher_adam", budget=50)}}])


def testlm_goal_compares_with_the_best_baseline_only():
    from benchmarks import optimizers_report as rep

    steps = {"adamw": 160.0, "soap": 100.0, "fisher_adam": 115.0, "fisher_adam_exact": 20.0}
    stats = {"lm_x": {o: {"steps": (v, 0, 0)} for o, v in steps.items()}}
    line = rep.lm_goal(stats, ["lm_x"], str)[0]
    assert "not met" in line and "soap's 100" in line and "1.15×" in line  # exact (fisher_optim) is no baseline
    stats["lm_x"]["fisher_adam"]["steps"] = (105.0, 0, 0)
    assert ": met:" in rep.lm_goal(stats, ["lm_x"], str)[0]


def test_goal_needs_names_the_missing_problems_and_the_cost_allowance():
    from benchmarks import optimizers_report as rep
    from benchmarks.stats import Paired

    def vs(steps, time, ms):
        return {w: Paired(v, v, v, 5, 0, 0, 1.0) for w, v in (("steps", steps), ("time", time), ("ms", ms))}

    stats = {"a": {"f": {"vs_ref": vs(0.5, 0.9, 1.8)}},  # fewer steps and less time
             "b": {"f": {"vs_ref": vs(0.8, 1.1, 1.4)}},  # fewer steps, step too dear: allowance 1.25
             "c": {"f": {"vs_ref": vs(1.5, 1.6, 1.1)}}}  # more steps  # fmt: skip
    lines = rep.goal_needs(stats, ["a", "b", "c"], "f", "F", "R")
    assert "on 0 more problem(s)" in lines[0] and "c 1.50×" in lines[0] and "a " not in lines[0]
    assert "Less wall-clock on 1 more problem(s)" in lines[1]
    assert "b 1.25/1.40×" in lines[1] and "within the allowance on 1 problem(s)" in lines[1]
    assert "step too dear on b" in lines[1]


def test_issue19_goals_count_the_better_of_the_two_and_name_what_is_missing():
    """The issue-19 findings from hand-made paired statistics: per problem the better of FisherAdam and its
    Schedule-Free form counts; the Schedule-Free form against Schedule-Free AdamW; the LM goal from the best of ours."""
    from benchmarks import optimizers_report as rep
    from benchmarks.stats import median_ci, paired_ratio

    def st(steps_ratio, time_ratio, median_steps, vs_sf=None):
        seeds = range(5)
        out = {"steps": median_ci([median_steps] * 5),
               "vs_ref": {"steps": paired_ratio({s: steps_ratio for s in seeds}, {s: 1.0 for s in seeds}),
                          "time": paired_ratio({s: time_ratio for s in seeds}, {s: 1.0 for s in seeds})}}  # fmt: skip
        if vs_sf is not None:
            out["vs_sf"] = paired_ratio({s: vs_sf for s in seeds}, {s: 1.0 for s in seeds})
        return out

    keys = [f"p{i}" for i in range(10)] + ["lm_x"]
    stats = {k: {"fisher_adam": st(0.8 if i < 6 else 1.2, 0.9 if i < 4 else 1.1, 100),
                 "sf_fisher_adam": st(0.7 if i in (6, 7) else 1.3, 1.5, 100, vs_sf=0.9 if i < 3 else 1.1),
                 "adamw": {"steps": median_ci([120] * 5)},
                 "schedulefree_adamw": {"steps": median_ci([95] * 5)}}
             for i, k in enumerate(keys)}  # fmt: skip
    text = "\n".join(rep.issue19_goals(stats, keys, lambda o: o, "adamw"))
    assert "fewer steps on 8 of 11 (met: p0, p1, p2, p3, p4, p5, p6, p7)" in text
    assert "less wall-clock on 4 of 11 (not met" in text and "Wall-clock: 2 more problem(s) needed" in text
    assert "fewer steps on 3 of 11 (not met, goal 6 of 11)" in text
    assert "LM goal on lm_x (fisher_adam within 10% of the best baseline's median steps): not met: 100 steps " \
           "against schedulefree_adamw's 95" not in text  # 100/95 = 1.05: within 10 %
    assert "LM goal on lm_x" in text and ": met: 100 steps against schedulefree_adamw's 95 (1.05×)" in text
