r"""Soen & Sun (2021), Fig. 1: :math:`K(t) - \mathrm{Var}(t)^2` and :math:`\mathrm{Var}(t)` against the mean.

For a one-dimensional exponential family :math:`p(t \mid h) = \exp(t h - F(h))` (docs/fisher-math.md §1, §5.1) the
single-sample variance of Î₁ along a direction ``v`` is :math:`v^4 (K - I^2)` and the Fisher information is
:math:`v^2 I`, with

* :math:`I = \mathrm{Var}(t) = F''(h)` (``Likelihood.unit_variance``),
* :math:`\kappa_4 = F''''(h)` (``Likelihood.unit_kappa4``),
* :math:`K = E(t - \eta)^4 = \kappa_4 + 3 I^2` (docs/fisher-math.md §3.1; Soen & Sun 2021, Lemma 5) and
  :math:`K - I^2 = \kappa_4 + 2 I^2`.

The curves come from fisher_optim's likelihood objects, plotted against the mean :math:`\eta = ` ``lik.mean(h)``:

* Bernoulli, ``h = logit p``, mean ``p`` in (0, 1);
* Normal with :math:`\sigma = 1`, ``h = mu``, mean ``mu`` in [-3, 3] (both curves constant: 1 and 2);
* Poisson, ``h = log lambda``, mean ``lambda`` in (0, 5].

Cross-check: at a few means per family the script draws ``n`` labels with ``lik.sample`` and estimates
:math:`\mathrm{Var}(t)` by :math:`\overline{s^2}` and :math:`K - I^2` by the sample variance of :math:`s^2`, where
:math:`s = t - \eta = -` ``lik.grad(h, y)``.  Each estimate must lie within ``Z = 5`` standard errors (from the
sample's own higher moments) of the closed form, else the script raises ``AssertionError``; the Monte-Carlo points
are drawn on the figure with 2-standard-error bars.

Usage::

    python benchmarks/paper/fig1_moments.py            # writes benchmarks/results/paper_fig1.png
    python benchmarks/paper/fig1_moments.py --smoke --out DIR   # fewer points and samples
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fisher_optim.likelihoods import Bernoulli, Gaussian, Likelihood, Poisson  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
DTYPE = torch.float64
Z = 5.0  # z-score of the Monte-Carlo check (two-sided 5.7e-7 per comparison)


def families() -> list[dict]:
    """Per family: the likelihood, the map mean -> natural parameter ``h``, the plotted mean range, MC points."""
    return [
        {
            "name": "Bernoulli",
            "lik": Bernoulli(),
            "to_h": lambda mu: torch.log(mu) - torch.log1p(-mu),
            "range": (1e-3, 1 - 1e-3),
            "mc": [0.05, 0.2, 0.5, 0.7, 0.9],
            "xlabel": "mean p",
        },
        {
            "name": "Normal (σ = 1)",
            "lik": Gaussian(sigma=1.0),
            "to_h": lambda mu: mu.clone(),
            "range": (-3.0, 3.0),
            "mc": [-2.0, 0.0, 1.5],
            "xlabel": "mean μ",
        },
        {
            "name": "Poisson",
            "lik": Poisson(),
            "to_h": torch.log,
            "range": (1e-3, 5.0),
            "mc": [0.1, 1.0, 2.5, 5.0],
            "xlabel": "mean λ",
        },
    ]


def closed_form(lik: Likelihood, h: Tensor) -> dict[str, Tensor]:
    """Mean, ``Var(t) = I``, ``kappa4``, ``K = kappa4 + 3 I^2`` and ``K - I^2`` at natural parameters ``h`` (1-D)."""
    h2 = h.reshape(-1, 1)
    var = lik.unit_variance(h2)[:, 0]
    k4 = lik.unit_kappa4(h2)[:, 0]
    return {
        "mean": lik.mean(h2)[:, 0],
        "var": var,
        "kappa4": k4,
        "K": k4 + 3 * var**2,
        "K_minus_var2": k4 + 2 * var**2,
    }


def monte_carlo(lik: Likelihood, h: float, n: int, generator: torch.Generator) -> dict[str, float]:
    """Estimates of ``Var(t)`` and ``K - Var(t)^2`` from ``n`` draws of ``lik.sample``, with standard errors."""
    ht = torch.tensor([[h]], dtype=DTYPE)
    y = lik.sample(ht, n, generator=generator)  # (n, 1, 1)
    s = -lik.grad(ht, y).reshape(-1)  # t(y) - eta
    s2 = s * s
    var = float(s2.mean())  # unbiased: eta is known exactly
    se_var = float(s2.std() / math.sqrt(n))
    d = s2 - s2.mean()
    kmv = float(s2.var())  # unbiased sample variance of s^2 = estimate of K - I^2
    m4 = float((d**4).mean())
    se_kmv = math.sqrt(max(m4 - kmv**2, 0.0) / n)
    return {"var": var, "se_var": se_var, "K_minus_var2": kmv, "se_K_minus_var2": se_kmv}


def run(n_grid: int, n_mc: int, seed: int = 0) -> list[dict]:
    """Closed-form curves and the Monte-Carlo cross-check for the three families (raises on a failed check)."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for fam in families():
        lik = fam["lik"]
        lo, hi = fam["range"]
        mu = torch.linspace(lo, hi, n_grid, dtype=DTYPE)
        curves = closed_form(lik, fam["to_h"](mu))
        # the natural parameter maps back to the requested mean
        torch.testing.assert_close(curves["mean"], mu, rtol=1e-12, atol=1e-12)
        checks = []
        for m in fam["mc"]:
            h = fam["to_h"](torch.tensor([m], dtype=DTYPE))
            cf = closed_form(lik, h)
            mc = monte_carlo(lik, float(h[0]), n_mc, g)
            row = {"mean": m, "n": n_mc}
            for key in ("var", "K_minus_var2"):
                exact, est, se = float(cf[key][0]), mc[key], mc[f"se_{key}"]
                z = (est - exact) / se if se > 0 else (0.0 if abs(est - exact) <= 1e-12 else math.inf)
                row.update({f"{key}_closed": exact, f"{key}_mc": est, f"{key}_se": se, f"{key}_z": z})
                if not abs(z) <= Z:
                    raise AssertionError(
                        f"{fam['name']} at mean {m}: Monte-Carlo {key} = {est:.6g} ± {se:.2g} "
                        f"vs closed form {exact:.6g} (z = {z:.2f}, limit {Z})"
                    )
            checks.append(row)
        out.append({"name": fam["name"], "xlabel": fam["xlabel"], "mu": mu, "curves": curves, "checks": checks})
    return out


def plot(results: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.4 * len(results), 3.9))
    for ax, res in zip(axes, results):
        mu, c = res["mu"].numpy(), res["curves"]
        ax.plot(mu, c["K_minus_var2"].numpy(), color="C3", label="K(t) − Var(t)²  (κ₄ + 2I²)")
        ax.plot(mu, c["var"].numpy(), color="C0", label="Var(t) = I")
        for key, color, marker in (("K_minus_var2", "C3", "o"), ("var", "C0", "s")):
            xs = [r["mean"] for r in res["checks"]]
            ys = [r[f"{key}_mc"] for r in res["checks"]]
            es = [2 * r[f"{key}_se"] for r in res["checks"]]
            ax.errorbar(xs, ys, yerr=es, fmt=marker, color=color, mfc="none", ms=6, capsize=3, lw=1)
        ax.set_title(res["name"])
        ax.set_xlabel(res["xlabel"])
        ax.grid(alpha=0.3)
    mid = axes[len(axes) // 2]
    mid.plot([], [], "ko", mfc="none", label=f"Monte Carlo, lik.sample (n = {results[0]['checks'][0]['n']:,}, ±2 se)")
    mid.legend(fontsize=8, loc="center")
    fig.suptitle("Soen & Sun (2021) Fig. 1 from fisher_optim likelihoods: 4th-moment term K − I² (Î₁ variance "
                 "per v⁴) and Var(t) = I (Fisher per v²)", fontsize=9)  # fmt: skip
    fig.text(0.5, 0.005, f"made by: {command}", ha="center", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="fewer grid points and Monte-Carlo samples")
    parser.add_argument("--out", type=Path, default=None, help="folder for paper_fig1.png (default benchmarks/results)")
    parser.add_argument("--mc-samples", type=int, default=None, help="draws per MC point (400000; smoke 20000)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    n_mc = args.mc_samples if args.mc_samples is not None else (20_000 if args.smoke else 400_000)
    if n_mc < 2:
        raise ValueError(f"Invalid mc_samples: {n_mc}")
    results = run(n_grid=50 if args.smoke else 400, n_mc=n_mc)
    for res in results:
        print(res["name"])
        for r in res["checks"]:
            print(
                f"  mean {r['mean']:6.3f}: Var(t) {r['var_closed']:.5f} vs MC {r['var_mc']:.5f} ± {r['var_se']:.1e} "
                f"(z {r['var_z']:+.2f});  K-Var^2 {r['K_minus_var2_closed']:.5f} vs MC {r['K_minus_var2_mc']:.5f} "
                f"± {r['K_minus_var2_se']:.1e} (z {r['K_minus_var2_z']:+.2f})"
            )
    out = args.out if args.out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/paper/fig1_moments.py", *argv])
    plot(results, out / "paper_fig1.png", command)
    print(f"wrote {out / 'paper_fig1.png'}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
