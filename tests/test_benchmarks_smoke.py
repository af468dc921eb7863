"""Smoke tests of the benchmark scripts, so they cannot rot (docs/design.md §7).

Estimators part: ``benchmarks/estimators.py --smoke`` runs every model at tiny sizes for one round, including
its float64 agreement check against BackPACK and torch.func, and writes its report only when asked.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone
pytest.importorskip("backpack")
pytest.importorskip("mlxtend")

from benchmarks import _common  # noqa: E402
from benchmarks import estimators as bench  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# benchmarks/_common.py


def test_interleaved_timings_slow_callables_measured_in_few_rounds():
    calls = []
    fns = {"fast": lambda: calls.append("fast"), "slow": lambda: calls.append("slow")}
    times = _common.interleaved_timings(fns, rounds=5, warmup=3, target_s=0.0, slow_s=-1.0, slow_rounds=3)
    # slow_s < 0: every callable is slow: one warm-up call, then measured in rounds 0, 2, 4 only
    assert [math.isnan(t) for t in times["fast"]] == [False, True, False, True, False]
    assert calls == ["fast", "slow"] + ["fast", "slow"] * 3
    s = _common.summarise({"b": [1.0] * 5, "x": [2.0, math.nan, 4.0, math.nan, 6.0]}, "b")
    assert s["x"]["rounds"] == 3 and s["x"]["ratio"] == 4.0


def test_interleaved_timings_round_robin():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = _common.interleaved_timings(fns, rounds=3, warmup=1, target_s=0.0)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    # per callable a first call and a calibration call, then one measurement of each per round, in turn
    assert calls == list("aabbcc") + list("abc") * 3
    with pytest.raises(ValueError, match="Invalid rounds: 0"):
        _common.interleaved_timings(fns, rounds=0)


def test_summarise_ratios_are_per_round_medians():
    times = {"base": [1.0, 2.0, 4.0], "x": [3.0, 2.0, 4.0]}
    s = _common.summarise(times, "base")
    assert s["x"]["ratio"] == 1.0  # per-round ratios 3, 1, 1: median 1 (the ratio of medians would be 1.5)
    assert s["x"]["ms"] == 3000.0 and s["base"]["ratio"] == 1.0
    assert s["x"]["ratio_q75"] == 2.0 and s["x"]["rounds"] == 3


def test_machine_info_names_torch_and_threads():
    info = _common.machine_info()
    assert torch.__version__ in info and f"{torch.get_num_threads()} intra-op threads" in info


# ---------------------------------------------------------------------------------------------------------
# benchmarks/estimators.py


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    results = bench.main(["--smoke", "--threads", "1", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored
    return out, results


def test_estimators_smoke_all_methods_timed(smoke_run):
    _, results = smoke_run
    assert [r["case"].key for r in results] == ["mlp", "cnn", "cnn_sigmoid", "cnn_sigmoid_small"]
    for res in results:
        stats = res["stats"]
        expected = {bench.BASELINE, bench.TORCH_FUNC, *bench.COUNTERPART, *bench.COUNTERPART.values()}
        assert set(stats) == expected
        assert stats[bench.BASELINE]["ratio"] == 1.0
        for st in stats.values():
            assert math.isfinite(st["ratio"]) and st["ratio"] > 0 and st["ms"] > 0
        targets = bench.targets(res)
        assert len(targets) == 5 and all(met in (True, False) for *_, met in targets)
        assert all(v <= 1e-9 for v in res["agreement"].values()) and len(res["agreement"]) == 5


def test_estimators_smoke_writes_report(smoke_run):
    out, results = smoke_run
    md = (out / "estimators.md").read_text()
    assert "python benchmarks/estimators.py --smoke --threads 1 --out" in md
    assert md.count("| fisher_optim mc1 (N=1) |") == len(results)
    assert md.count("| mc1 (N=1) <= 2x plain forward+backward |") == len(results)
    assert "B · sum_grad_squared" in md and "§6g" in md
    assert (out / "estimators.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimators_smoke_writes_nothing_without_out(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    res = bench.main(["--smoke", "--threads", "1", "--models", "mlp"])
    assert len(res) == 1 and list(tmp_path.iterdir()) == []


def test_full_sigmoid_cnn_reasons_for_not_running():
    """The full-size sigmoid CNN names why mc2 and DiagHessian are not run, with the sizes computed."""
    cases = {c.key: c for c in bench.make_cases(smoke=False)}
    assert all(not c.skip for k, c in cases.items() if k != "cnn_sigmoid")
    skip = cases["cnn_sigmoid"].skip
    assert set(skip) == {bench.MC2, bench.DIAG_H}
    # one HVP per parameter of conv1 (16*1*9 + 16) and conv2 (32*16*9 + 32)
    assert "(4,800)" in skip[bench.MC2] and "'hvp' route" in skip[bench.MC2]
    # two dense [V, B, V] float32 matrices per sigmoid, V = 16*28*28 and 32*14*14, B = 64
    gb = sum(2 * 64 * v * v * 4 for v in (16 * 28 * 28, 32 * 14 * 14)) / 1e9
    assert f"{gb:,.1f} GB" in skip[bench.DIAG_H] and "V = 12,544, 6,272" in skip[bench.DIAG_H]


def test_agreement_check_catches_a_scaling_error(monkeypatch):
    """A fisher_optim result off by the batch size (the classic 1/B slip) must fail the check."""
    case = bench.make_cases(smoke=True)[0]
    x, y = bench.mnist(case.batch, case.image, case.synthetic)
    real = bench.diagonal_fisher

    def off_by_b(model, inputs, **kw):
        return {n: v * inputs.shape[0] for n, v in real(model, inputs, **kw).items()}

    monkeypatch.setattr(bench, "diagonal_fisher", off_by_b)
    with pytest.raises(AssertionError, match="exact vs DiagGGNExact"):
        bench.check_agreement(case, x, y)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--smoke", "--rounds", "0"], "Invalid rounds: 0"),
        (["--smoke", "--threads", "0"], "Invalid threads: 0"),
        (["--smoke", "--models", "rnn"], "Invalid models"),
    ],
)
def test_estimators_invalid_arguments(argv, msg):
    with pytest.raises(ValueError, match=msg):
        bench.main(argv)


def test_estimators_lm_smoke_writes_report(tmp_path):
    """``--lm --smoke``: both language models at tiny sizes, their float64 agreement with torch.func, a report."""
    results = bench.main(["--lm", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert [r["case"].key for r in results] == ["lm_transformer", "lm_lstm"]
    assert results[0]["general"] == []  # every Transformer parameter on a fast rule
    assert any(n.startswith("lstm.") for n in results[1]["general"])
    for r in results:
        assert all(v <= 1e-9 for v in r["agreement"].values())
        assert all(st["ms"] > 0 for st in r["stats"].values())
    md = (tmp_path / "estimators_lm.md").read_text()
    assert "python benchmarks/estimators.py --lm --smoke --threads 1 --out" in md
    assert "1 intra-op threads" in md
