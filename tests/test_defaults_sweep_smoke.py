"""Smoke test of the defaults sweep (``python -m benchmarks.defaults_sweep --smoke``), so it cannot rot.

Every model of the sweep (torchvision ResNet-18, MobileNetV3-small and a small ViT, a Transformer and an LSTM
classifier, the optimizer suite's logistic regression and CNN) trains 3 steps with AdamW, FisherAdam and
NaturalGradient with their defaults, FisherAdam's 0.1.0 update, and ScheduleFreeFisherAdam beside Schedule-Free AdamW;
the report is written and names the goal of every model.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

from benchmarks import defaults_sweep as bench  # noqa: E402
from fisher_optim.optim import FisherAdam, NaturalGradient, ScheduleFreeFisherAdam  # noqa: E402


def test_defaults_sweep_smoke(tmp_path):
    threads = torch.get_num_threads()
    out = bench.main(["--smoke", "--auto", "logreg", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # restored
    results = out["results"]
    assert list(results) == list(bench.MODELS)
    names = [c.name for c in out["configs"]]
    assert len(names) == 6 and names[0] == "AdamW lr=1e-3"
    assert any(n.startswith("ScheduleFreeFisherAdam defaults") for n in names)
    assert any(n.startswith("Schedule-Free AdamW defaults") for n in names)
    for key, rows in results.items():
        assert set(rows) == set(names), key
        for name, r in rows.items():
            assert math.isfinite(r["loss"]) and r["loss"] > 0, (key, name)
            assert r["wall_s"] > 0 and r["steps"] == 3
    assert set(out["auto"]["logreg"]) == {"FisherAdam defaults", "NaturalGradient defaults"}
    md = (tmp_path / "defaults_sweep.md").read_text()
    assert "Machine: CPU" in md and "--smoke" in md and "torchvision" in md
    for key in bench.MODELS:
        assert f"| {key} |" in md


def test_defaults_rows_follow_the_constructors():
    cfgs = bench.configs("mc1")
    for cls in (FisherAdam, ScheduleFreeFisherAdam, NaturalGradient):
        d = bench.constructor_defaults(cls)
        row = next(c for c in cfgs if c.name.startswith(f"{cls.__name__} defaults"))
        assert row.kwargs == {"estimator": "mc1"}  # nothing but the estimator: the constructor's defaults
        assert f"lr={d['lr']:g}" in row.name
        # one hyperparameter changed at a time, never to its default value
        for c in cfgs:
            if c.name.startswith(f"{cls.__name__} ") and c is not row and len(c.kwargs) == 2:
                (k, v), = [(k, v) for k, v in c.kwargs.items() if k != "estimator"]
                assert v != d[k], c.name


@pytest.mark.bench
def test_update_ablation_smoke(tmp_path, monkeypatch):
    """benchmarks/update_ablation.py in smoke mode: every variant runs (no error), the table has a row for each."""
    from benchmarks import update_ablation

    monkeypatch.setattr(update_ablation, "RESULTS", tmp_path / "ablation.md")
    text = update_ablation.main(["--smoke"])
    for label, _, _ in update_ablation.VARIANTS:
        assert f"| {label} |" in text
    assert not (tmp_path / "ablation.md").exists()  # smoke mode writes nothing


@pytest.mark.bench
def test_step_cost_smoke(tmp_path):
    """benchmarks/step_cost.py on one problem for a few steps: every optimizer's row, and the kinds add up."""
    from benchmarks import step_cost

    out = tmp_path / "step_cost.md"
    text = step_cost.main(["--problems", "logreg", "--steps", "12", "--out", str(out)])
    assert out.read_text() == text
    for name in step_cost.OPTIMIZERS:
        assert f"| logreg | {name} |" in text
    with pytest.raises(ValueError, match="Invalid steps: 0"):
        step_cost.main(["--steps", "0", "--out", ""])
