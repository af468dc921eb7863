r"""The empirical Fisher is not the Fisher: Kunstner, Balles & Hennig (2019), "Limitations of the Empirical
Fisher Approximation for Natural Gradient Descent", Fig. 1, re-drawn on data of the same kind.

Problem: linear least squares, :math:`y = \theta_1 x + \theta_2 + \varepsilon`, :math:`\varepsilon \sim
\mathcal N(0, \sigma^2)`, i.e. a Gaussian likelihood with mean :math:`h = \theta^\top \phi(x)`,
:math:`\phi(x) = (x, 1)`.  With the mean negative log-likelihood
:math:`L(\theta) = \frac1N \sum_n \frac{(y_n - \theta^\top\phi_n)^2}{2\sigma^2}`:

* gradient :math:`\nabla L = -\frac1N \sum_n r_n \phi_n / \sigma^2` with residuals
  :math:`r_n = y_n - \theta^\top \phi_n`;
* Fisher :math:`F = \frac1N J^\top J / \sigma^2 = \frac1N \sum_n \phi_n \phi_n^\top / \sigma^2` (the same
  at every :math:`\theta`; here it is also the Hessian, so natural-gradient descent is Newton's method and
  goes straight to the minimum);
* empirical Fisher :math:`\tilde F(\theta) = \frac1N \sum_n g_n g_n^\top` with the per-example gradients
  :math:`g_n = -r_n \phi_n / \sigma^2`: it scales with the squared residuals, so far from the minimum it
  is huge along the directions of large residuals and the "EF-preconditioned" steps
  :math:`-(\tilde F + \lambda I)^{-1} \nabla L` are distorted and badly scaled.

The figure has four panels, as in the paper: the data with the fitted line, then the vector fields (arrows:
direction; colour: log10 of the step length) and the paths from the same four starting points for gradient
descent, natural-gradient descent and EF-preconditioned descent (damping :math:`\lambda = 10^{-8}` as in the
paper).  The paths are the continuous flows :math:`\dot\theta = d(\theta)` of each direction field, integrated
(RK4, see :func:`flow`) until they are within ``1e-4`` of the minimum, as the paper's paths are followed to
convergence: a fixed small number of steps would stop the EF paths before they loop past the minimum and turn
back, which is the figure's point.  The data are drawn here (``x ~ N(2, 1)``, ``y = 2x - 1 + N(0, 1)``, 200
points), not the paper's, so the picture shows the same effect, not the same curves.

Why the full 2x2 matrices are computed here directly, and not with :func:`fisher_optim.diagonal_fisher`:
the point of the figure is the off-diagonal term.  :math:`F_{12} = \overline{x}/\sigma^2 \ne 0` couples slope
and intercept; a diagonal preconditioner cannot undo that coupling, so even the exact *diagonal* natural
gradient would not go straight to the minimum.  The script still checks that the diagonals of its
:math:`F` and :math:`\tilde F` equal ``diagonal_fisher(..., estimator="exact")`` and
``diagonal_fisher(..., estimator="empirical")`` of the same model written as an ``nn.Linear(1, 1)`` with a
Gaussian likelihood, so the two definitions (mean over examples, per-example squares) are the library's.

Usage::

    python examples/empirical_fisher_pitfall.py            # writes benchmarks/results/empirical_fisher_pitfall.png
    python examples/empirical_fisher_pitfall.py --out ef.png  # anywhere else
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisher_optim import diagonal_fisher  # noqa: E402
from fisher_optim.likelihoods import Gaussian  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "benchmarks" / "results" / "empirical_fisher_pitfall.png"  # the README's file
DTYPE = torch.float64
SIGMA = 1.0
DAMPING = 1e-8


def make_data(n: int = 200, seed: int = 0):
    """x ~ N(2, 1) (a nonzero mean couples slope and intercept), y = 2 x - 1 + N(0, sigma^2)."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 + torch.randn(n, generator=g, dtype=DTYPE)
    y = 2.0 * x - 1.0 + SIGMA * torch.randn(n, generator=g, dtype=DTYPE)
    return x, y


def features(x):
    return torch.stack([x, torch.ones_like(x)], 1)  # (N, 2): phi(x) = (x, 1)


def gradient(theta, phi, y):
    """Gradient of the mean NLL at each row of ``theta`` (..., 2)."""
    r = y - theta @ phi.T  # (..., N)
    return -(r[..., None] * phi).mean(-2) / SIGMA**2


def fisher(phi):
    """Full 2x2 Fisher, J^T J / (N sigma^2): independent of theta."""
    return phi.T @ phi / (len(phi) * SIGMA**2)


def empirical_fisher(theta, phi, y):
    """Full 2x2 empirical Fisher (1/N) sum_n g_n g_n^T at each row of ``theta`` (..., 2)."""
    r = y - theta @ phi.T  # (..., N)
    g = -r[..., None] * phi / SIGMA**2  # (..., N, 2)
    return g.transpose(-1, -2) @ g / len(phi)


def directions(theta, phi, y):
    """Descent directions of GD, NGD and EF-preconditioned GD at each row of ``theta``."""
    grad = gradient(theta, phi, y)
    eye = torch.eye(2, dtype=DTYPE)
    ngd = -torch.linalg.solve(fisher(phi) + DAMPING * eye, grad.unsqueeze(-1)).squeeze(-1)
    ef = -torch.linalg.solve(empirical_fisher(theta, phi, y) + DAMPING * eye, grad.unsqueeze(-1)).squeeze(-1)
    return {"gradient descent": -grad, "natural gradient (Fisher)": ngd, "empirical Fisher": ef}


def check_against_library(x, y, theta):
    """The diagonals of F and of the EF at ``theta`` equal fisher_optim.diagonal_fisher's (float64)."""
    model = torch.nn.Linear(1, 1).to(DTYPE)
    with torch.no_grad():
        model.weight.fill_(float(theta[0]))
        model.bias.fill_(float(theta[1]))
    lik = Gaussian(sigma=SIGMA)
    inputs = x[:, None]
    exact = diagonal_fisher(model, inputs, likelihood=lik, estimator="exact")
    emp = diagonal_fisher(model, inputs, likelihood=lik, estimator="empirical", targets=y[:, None])
    phi = features(x)
    F = fisher(phi)
    EF = empirical_fisher(theta, phi, y)
    ok_f = torch.allclose(torch.stack([exact["weight"][0, 0], exact["bias"][0]]), F.diagonal(), rtol=1e-10)
    ok_e = torch.allclose(torch.stack([emp["weight"][0, 0], emp["bias"][0]]), EF.diagonal(), rtol=1e-10)
    if not (ok_f and ok_e):
        raise AssertionError(f"diagonal mismatch: Fisher {ok_f}, empirical Fisher {ok_e}")
    return F, EF


def flow(starts, phi, y, kind: str, theta_star, tol: float = 1e-4, max_steps: int = 20_000):
    """Integrate the flow d theta/dt = direction(theta) from each row of ``starts`` until it converges.

    Classical Runge-Kutta (RK4) with a step that adapts per path: each step moves at most ``min(0.05, 0.1 d)``
    in parameter space (``d``: the current distance to ``theta*``) and lasts at most 0.2 time units (the
    stability limit of gradient descent's stiffest direction, 2.8 / lambda_max(F), is above 0.47 here).  A path
    stops once it is within ``tol`` of ``theta*``.  Returns one ``(steps + 1, 2)`` path per start and a flag
    per path saying whether it converged within ``max_steps``.
    """
    paths, converged = [], []
    for start in starts:
        theta, pts = start.clone(), [start]
        f = lambda t: directions(t, phi, y)[kind]  # noqa: E731
        for _ in range(max_steps):
            d = float(torch.linalg.norm(theta - theta_star))
            if d < tol:
                break
            k1 = f(theta)
            dt = min(0.2, min(0.05, 0.1 * d) / max(float(torch.linalg.norm(k1)), 1e-300))
            k2 = f(theta + 0.5 * dt * k1)
            k3 = f(theta + 0.5 * dt * k2)
            k4 = f(theta + dt * k3)
            theta = theta + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            pts.append(theta)
        paths.append(torch.stack(pts))
        converged.append(float(torch.linalg.norm(theta - theta_star)) < tol)
    return paths, converged


def overshoot(path, theta_star):
    """How far a path goes past the minimum: the largest distance it travels beyond ``theta*`` along its
    starting direction, relative to its starting distance (0 for a path that never passes the minimum)."""
    d0 = path[0] - theta_star
    along = (path - theta_star) @ d0 / float(torch.linalg.norm(d0)) ** 2
    return max(0.0, -float(along.min()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    x, y = make_data()
    phi = features(x)
    theta_star = torch.linalg.lstsq(phi, y[:, None]).solution[:, 0]
    F, EF = check_against_library(x, y, theta_star + torch.tensor([1.5, -2.0], dtype=DTYPE))
    cond = torch.linalg.cond(F)
    print(f"least-squares fit: theta* = ({theta_star[0]:.3f}, {theta_star[1]:.3f}); cond(F) = {cond:.1f}")
    print("diagonals of F and EF match fisher_optim.diagonal_fisher (exact / empirical): True")
    ef_star = empirical_fisher(theta_star, phi, y)
    print(f"at theta*: |EF - F|/|F| = {float(torch.linalg.norm(ef_star - F) / torch.linalg.norm(F)):.3f} "
          "(the EF matches F only near the minimum of a well-specified model, up to sampling noise)")  # fmt: skip

    # the paths first: the field's window is the box around all of them (the EF loops reach past the start box)
    starts = theta_star + torch.tensor([[2.5, -5.0], [-2.5, 5.0], [2.5, 5.0], [-2.0, -5.5]], dtype=DTYPE)
    kinds = ("gradient descent", "natural gradient (Fisher)", "empirical Fisher")
    trajs, conv = {}, {}
    for k in kinds:
        trajs[k], conv[k] = flow(starts, phi, y, k, theta_star)
    pts = torch.cat([tr for v in trajs.values() for tr in v])
    lo, hi = pts.min(0).values, pts.max(0).values
    lo, hi = lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo)
    # grid of parameters (an even size: the minimum itself, where the gradient is 0, is not on it in general)
    n = 22
    t1, t2 = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), n, dtype=DTYPE),
                            torch.linspace(float(lo[1]), float(hi[1]), n, dtype=DTYPE), indexing="ij")  # fmt: skip
    grid = torch.stack([t1.reshape(-1), t2.reshape(-1)], 1)
    fields = directions(grid, phi, y)
    dist = {k: [float(torch.linalg.norm(tr[-1] - theta_star)) for tr in v] for k, v in trajs.items()}
    over = {k: [overshoot(tr, theta_star) for tr in v] for k, v in trajs.items()}
    path_len = {k: [float(torch.linalg.norm(tr.diff(dim=0), dim=1).sum() / torch.linalg.norm(tr[0] - theta_star))
                  for tr in v] for k, v in trajs.items()}  # fmt: skip
    for k in fields:
        print(f"{k:26s} converged {sum(conv[k])}/{len(starts)} in {[len(t) - 1 for t in trajs[k]]} RK4 steps; "
              f"path length / start distance {', '.join(f'{v:.2f}' for v in path_len[k])}; "
              f"overshoot past theta* {', '.join(f'{v:.2f}' for v in over[k])}")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.3))
    ax = axes[0]
    ax.scatter(x, y, s=6, alpha=0.6)
    xs = torch.linspace(float(x.min()), float(x.max()), 2, dtype=DTYPE)
    ax.plot(xs, theta_star[0] * xs + theta_star[1], color="k")
    ax.set(title="data: y = θ₁x + θ₂ + noise", xlabel="x", ylabel="y")
    loss = 0.5 * ((y - grid @ phi.T) ** 2).mean(-1).reshape(n, n) / SIGMA**2
    for ax, (name, d) in zip(axes[1:], fields.items()):
        length = torch.linalg.norm(d, dim=1)
        unit = d / length.clamp_min(1e-300)[:, None]
        ax.contour(t1, t2, loss, levels=12, colors="0.8", linewidths=0.7)
        q = ax.quiver(grid[:, 0], grid[:, 1], unit[:, 0], unit[:, 1], torch.log10(length.clamp_min(1e-12)),
                      cmap="viridis", angles="xy", scale=30, width=0.004)  # fmt: skip
        fig.colorbar(q, ax=ax, label="log10 step length")
        for tr in trajs[name]:
            ax.plot(tr[:, 0], tr[:, 1], color="tab:red", lw=1.2)
            ax.plot(tr[0, 0], tr[0, 1], "o", color="tab:red", ms=3)
        ax.plot(*theta_star, "k*", ms=10)
        ax.set(title=f"{name} (flow, run to convergence)", xlabel="θ₁ (slope)", ylabel="θ₂ (intercept)")
        ax.set_xlim(float(t1.min()), float(t1.max()))
        ax.set_ylim(float(t2.min()), float(t2.max()))
    command = shlex.join(["python", "examples/empirical_fisher_pitfall.py", *argv])
    note = "Kunstner et al. 2019, Fig. 1, re-drawn; full 2x2 matrices, damping 1e-8; flows run to 1e-4 of θ*"
    fig.text(0.01, 0.01, f"made by: {command}   ({note})", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"saved {args.out}")
    assert all(math.isfinite(v) for d in dist.values() for v in d)
    return {"theta_star": theta_star, "distances": dist, "converged": conv, "overshoot": over,
            "path_length": path_len, "paths": trajs, "fisher": F, "empirical_fisher": EF}  # fmt: skip


if __name__ == "__main__":
    main()
