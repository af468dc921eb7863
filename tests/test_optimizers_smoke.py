"""Smoke test of the optimizer benchmark (``python -m benchmarks.optimizers --smoke``), so it cannot rot.

One in-process smoke run trains every problem with every optimizer for a few steps (tiny data, the middle
learning rate of each grid, one seed) and writes its report to a temporary folder; the tests below check the
records and the report.  If ``fisher_optim.optim`` is not importable yet, the run still covers the torch,
pytorch_optimizer and Sophia-G optimizers, and only the fisher_optim checks are skipped, with the reason.
The helpers of the protocol (learning-rate choice, medians, Sophia-G's update) are tested on hand-made inputs.
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
pytest.importorskip("pytorch_optimizer")
pytest.importorskip("tqdm")

from benchmarks import optimizers as bench  # noqa: E402
from benchmarks.optimizers_problems import PROBLEMS, make_problems  # noqa: E402

try:  # ResNet-18 comes from torchvision; without it the smoke run covers the other problems
    import torchvision  # noqa: F401

    RUN = list(PROBLEMS)
except ImportError:
    RUN = [p for p in PROBLEMS if p != "resnet18"]

FISHER_MISSING = bench.fisher_classes()[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("optbench")
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    res = bench.main(["--smoke", "--out", str(out), "--problems", *RUN])
    elapsed = time.perf_counter() - t0
    if elapsed > 120:  # the budget of this smoke run in CI (2 shared cores); a warning, since load varies
        warnings.warn(f"optimizer benchmark smoke run took {elapsed:.0f} s (budget 120 s)", stacklevel=1)
    assert torch.get_num_threads() == threads
    return out, res


def _runs(res, problem, opt):
    return bench.runs_of(res, problem, "final", opt)


def test_smoke_covers_every_problem_and_non_fisher_optimizer(smoke):
    _, res = smoke
    assert list(res["problems"]) == RUN
    plain = [s.key for s in bench.make_optimizers().values() if not s.fisher]
    assert set(plain) == {"sgd", "adam", "adamw", "adahessian", "sophiah", "sophiag"}
    for p in RUN:
        for o in plain:
            (run,) = _runs(res, p, o)
            assert run.error == "", (p, o, run.error)
            assert not run.diverged, (p, o)
            assert run.steps == 3 and run.train_s > 0 and math.isfinite(run.test) and not run.capped, (p, o)
            assert [c[0] for c in run.curve] == [0, 3], (p, o)  # before training and at the end of the budget


def test_smoke_fisher_optimizers(smoke):
    _, res = smoke
    fisher = [k for k in bench.DEFAULT_OPTIMIZERS if bench.make_optimizers()[k].fisher]
    assert fisher == ["fisher_adam", "fisher_adam_exact", "fisher_adam_mc1", "natural_gradient"]
    if FISHER_MISSING:
        assert set(res["skipped"]) == set(fisher)
        pytest.skip(f"fisher_optim optimizers not benchmarked: {FISHER_MISSING}")
    assert res["skipped"] == {}
    for p in RUN:
        for o in fisher:
            (run,) = _runs(res, p, o)
            assert run.error == "" and not run.diverged and not run.capped and run.steps == 3, (p, o, run.error)
            assert math.isfinite(run.test), (p, o)


@pytest.mark.skipif(bool(FISHER_MISSING), reason=f"fisher_optim optimizers not importable: {FISHER_MISSING}")
@pytest.mark.parametrize("opt", ["fisher_adam_mc2", "fisher_adam_empirical"])
@pytest.mark.parametrize("problem", ["logreg", "autoencoder", "poisson"])
def test_optional_fisher_estimators_run(problem, opt):
    """The estimators outside the default list (mc2; empirical, which needs ``opt.step(targets=y)``)."""
    prob = make_problems()[problem]
    spec = bench.make_optimizers()[opt]
    run = bench.train(prob, prob.data(True), spec, spec.grid()[1], 0, max_steps=3, batch_size=8)
    assert run.error == "" and not run.diverged and run.steps == 3, run.error


def test_smoke_report_and_plots(smoke):
    out, res = smoke
    md = (out / "optimizers.md").read_text()
    assert "python -m benchmarks.optimizers --smoke --out" in md and "--problems logreg" in md
    assert "Machine: CPU" in md and "intra-op threads" in md
    for p in RUN:
        assert f"## {p}: " in md
    assert md.count("| Adam | 0.001 (0.001) |") == len(RUN)
    if FISHER_MISSING:
        assert "**Not run**" in md and "fisher_optim.optim is not importable" in md
    for axis in ("steps", "time"):
        assert (out / f"optimizers_{axis}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "optimizers.json").read_text())
    assert raw["command"] == res["command"] and set(raw["problems"]) == set(RUN)


def test_report_re_rendered_from_json(smoke, tmp_path):
    out, res = smoke
    again = bench.main(["--from-json", str(out / "optimizers.json"), "--out", str(tmp_path)])
    assert again["command"] == res["command"]
    old, new = (out / "optimizers.md").read_text(), (tmp_path / "optimizers.md").read_text()
    assert "Rendered by `python -m benchmarks.optimizers --from-json" in new
    assert old.split("\n")[3:] == new.split("\n")[3:]  # identical below the header line
    assert (tmp_path / "optimizers_steps.png").exists() and not (tmp_path / "optimizers.json").exists()


def test_missing_fisher_optim_skips_only_its_optimizers(monkeypatch):
    monkeypatch.setattr(bench, "fisher_classes", lambda: (None, "fisher_optim.optim is not importable (test)"))
    specs = bench.make_optimizers()
    res = bench.run_benchmark([make_problems()["poisson"]], [specs["adam"], specs["fisher_adam"]], seeds=1,
                              epochs_scale=1.0, smoke=True, max_steps=2)  # fmt: skip
    assert res["skipped"] == {"fisher_adam": "fisher_optim.optim is not importable (test)"}
    assert list(res["problems"]["poisson"]["final"]) == ["adam"]
    with pytest.raises(RuntimeError, match="not importable"):
        specs["fisher_adam"].grid()


def test_failing_optimizer_is_recorded_not_raised():
    prob = make_problems()["poisson"]
    data = prob.data(True)

    def broken(model, lr, lik, seed):
        raise RuntimeError("boom")

    spec = bench.OptSpec("broken", "Broken", lambda: [1.0], broken)
    run = bench.train(prob, data, spec, 1.0, 0, max_steps=2)
    assert run.error == "RuntimeError: boom" and run.steps == 0
    assert bench.selection_key(prob, run) == (math.inf, math.inf)


def test_divergence_stops_the_run():
    prob = make_problems()["poisson"]
    data = prob.data(True)
    spec = bench.make_optimizers()["sgd"]
    run = bench.train(prob, data, spec, 1e6, 0, max_steps=20)  # exp link: the rates overflow at once
    assert run.diverged and run.steps < 20 and math.isnan(run.test)


class _Sleepy(bench.Runner):
    """A step that takes ``seconds`` (time.sleep is interrupted by the SIGALRM time cap)."""

    seconds = 30.0

    def step(self, x, y):
        time.sleep(self.seconds)
        return 0.0


def test_time_cap_interrupts_a_step_and_skips_the_rest():
    prob = dataclasses.replace(make_problems()["poisson"], time_cap_s=0.2)
    slow = bench.OptSpec("slow", "Slow", lambda: [0.1, 0.2, 0.3], lambda m, lr, lik, seed: _Sleepy(m, None, lik, seed))
    adam = bench.make_optimizers()["adam"]
    t0 = time.perf_counter()
    res = bench.run_benchmark([prob], [slow, adam], seeds=3, epochs_scale=1.0, smoke=True, max_steps=2)
    assert time.perf_counter() - t0 < 20  # the 30 s step was cut at 0.2 s
    pr = res["problems"]["poisson"]
    (run,) = bench.runs_of(res, "poisson", "tuning", "slow")  # the other two grid values were not run
    assert run.capped and run.steps == 0 and 0.2 <= run.train_s < 5 and not math.isfinite(run.steps_to_target)
    assert [c[0] for c in run.curve] == [0, 0] and math.isfinite(run.test)  # validated where it stopped
    assert len(bench.runs_of(res, "poisson", "final", "slow")) == 1  # and no seeds
    assert "hit the 0.2 s time cap after 0 steps" in pr["notes"]["slow"]
    assert [r.seed for r in bench.runs_of(res, "poisson", "final", "adam")] == [0, 1, 2]
    assert "adam" not in pr["notes"]


def _run(lr, steps, final, err=""):
    return bench.Run("logreg", "x", lr, 0, steps_to_target=steps, final_val=final, error=err)


def test_choose_lr_fewest_steps_then_best_final_value():
    acc = make_problems()["logreg"]  # accuracy: higher is better
    runs = [_run(0.1, math.inf, 0.99), _run(0.3, 40, 0.95), _run(1.0, 40, 0.97), _run(3.0, 20, math.nan)]
    assert bench.choose_lr(acc, runs) == 1.0  # 3.0 diverged; 40 steps ties, better final accuracy wins
    assert bench.choose_lr(acc, [_run(0.1, math.inf, 0.5), _run(0.3, math.inf, 0.7)]) == 0.3
    assert bench.choose_lr(acc, [_run(0.1, 10, 0.9, err="E"), _run(0.3, 90, 0.9)]) == 0.3
    nll = make_problems()["autoencoder"]  # NLL: lower is better
    assert bench.choose_lr(nll, [_run(0.1, math.inf, 120.0), _run(0.3, math.inf, 115.0)]) == 0.3


def test_median_counts_unreached_as_infinite_and_compare():
    assert bench.median([10, 20, math.inf]) == 20
    assert bench.median([10, math.inf, math.inf]) == math.inf
    a, b = {"steps": 10.0}, {"steps": 20.0}
    assert bench.compare(a, b, "steps") == "win" and bench.compare(b, a, "steps") == "loss"
    assert bench.compare({"steps": math.inf}, {"steps": math.inf}, "steps") == "neither"
    assert bench.compare({"steps": 10.0}, {"steps": math.inf}, "steps") == "win"


def test_sophia_g_update_against_a_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = bench.SophiaG([p], lr=0.1, betas=(0.5, 0.75), rho=0.5, weight_decay=0.0)
    g_hat = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    opt.update_hessian([g_hat], batch_size=4)
    h = 0.25 * 4 * g_hat**2  # (1 - beta2) B g_hat^2 from a zero start: [4, 0, 1]
    p.grad = torch.tensor([4.0, -1.0, 0.5], dtype=torch.float64)
    opt.step()
    m = 0.5 * p.grad  # (1 - beta1) g
    ratio = torch.clamp(m.abs() / (0.5 * h + 1e-15), max=1.0)  # [1, 1 (h=0: clipped), 0.5]
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
        (["--smoke", "--problems", "imagenet"], "Invalid problems"),
        (["--smoke", "--optimizers", "lbfgs"], "Invalid optimizers"),
    ],
)
def test_invalid_arguments(argv, msg):
    with pytest.raises(ValueError, match=msg):
        bench.main(argv)
