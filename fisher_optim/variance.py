r"""Closed-form variances of the diagonal Fisher estimators (spec §2.3, §3, §5, §7.5).

For fixed inputs :math:`x_1..x_M` and ``N`` labels drawn per input, the estimators of
:func:`~fisher_optim.diagonal_fisher` (mean over inputs) have, per parameter ``i``, the variance over the
label draws

.. math::  \mathrm{Var}\,\hat F_i = \frac{1}{M^2} \sum_m V(\theta_i \mid x_m),
           \qquad V = \tilde v / N,

with the single-sample conditional variances (spec §3.2)

.. math::  \tilde v_1(\theta_i|x) = \mathcal M(v_i, v_i, v_i, v_i) = \kappa(v_i^4) + 2 F_i(x)^2,
           \qquad \tilde v_2(\theta_i|x) = u_i^\top I(h) u_i = \sum_k (S_{:,k}^\top u_i)^2,

where :math:`v_i = \partial_i h`, :math:`u_i = \partial^2_{ii} h`.  ``exact`` and ``empirical`` draw
nothing: variance 0.  Linear layers use the factorised forms (spec §7.1): one backward with the ``C`` unit
seeds gives :math:`F` and :math:`\tilde v_1` for every parameter by two matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .engine import Probe, reduce_records
from .estimators import check_estimator, check_n_samples, check_reduction, sum_of_squares
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .likelihoods import Likelihood, get_likelihood

__all__ = [
    "fisher_variance",
    "fisher_moments",
    "FisherMoments",
    "layer_summary",
    "joint_variance",
]


def unit_seeds(h: Tensor) -> Tensor:
    """``C`` unit seeds ``e_c`` per input: ``(C, B, C)``; the records then hold the Jacobian rows ``v_c``."""
    b, c = h.shape
    return torch.eye(c, dtype=h.dtype, device=h.device).unsqueeze(1).expand(c, b, c)


def _per_input(fn_of_h):
    """Wrap ``fn(h_rows, x)`` into a record reducer that slices ``h`` like the batch chunk."""

    def make(h: Tensor):
        def fn(x: Tensor, idx: slice) -> Tensor:
            return fn_of_h(h[idx], x)

        return fn

    return make


@dataclass
class FisherMoments:
    r"""Per-parameter moments at fixed inputs (all summed over inputs, *not* divided by ``M``).

    * ``fisher``: :math:`\sum_m F_i(x_m)`;
    * ``fisher_sq``: :math:`\sum_m F_i(x_m)^2` (input randomness, spec §2.3b);
    * ``v1``: :math:`\sum_m \tilde v_1(\theta_i|x_m)` (single-sample Î₁ variance);
    * ``v2``: :math:`\sum_m \tilde v_2(\theta_i|x_m)` (single-sample Î₂ variance), or ``None`` when not
      computed (``with_v2=False`` or an HVP-route model where it is too costly);
    * ``m``: number of inputs.
    """

    fisher: dict[str, Tensor]
    fisher_sq: dict[str, Tensor] | None
    v1: dict[str, Tensor]
    v2: dict[str, Tensor] | None
    m: int


def moments_from_probe(
    probe: Probe,
    with_v1: bool = True,
    with_v2: bool = True,
    with_fisher_sq: bool = False,
    names=None,
    with_fisher: bool = True,
) -> FisherMoments:
    """Compute :class:`FisherMoments` from an open :class:`~fisher_optim.engine.Probe` (skipped parts: ``None``)."""
    lik, h = probe.lik, probe.h.detach()
    recs = probe.seeded(unit_seeds(h), names=names)
    quad = _per_input(lik.fisher_quad)(h)
    fisher = reduce_records(recs, quad, 2, probe.params, names) if with_fisher else None
    fisher_sq = None
    if with_fisher_sq:
        fisher_sq = reduce_records(recs, lambda x, idx: quad(x, idx) ** 2, 4, probe.params, names)
    v1 = reduce_records(recs, _per_input(lik.moment4)(h), 4, probe.params, names) if with_v1 else None
    v2 = None
    if with_v2:
        factor = lik.fisher_factor(h)  # (B, C, K)
        seeds = factor.permute(2, 0, 1)
        # the S-seeded output gradients are linear combinations of the unit-seeded ones: no second backward
        grads = {k: torch.einsum("bck,cb...->kb...", factor.to(g.dtype), g) for k, g in probe.last_grads.items()}
        rrecs = residual_records(probe, seeds, per_sample=True, grads=grads)
        if names is not None:
            rrecs = [(r, {k: n for k, n in keys.items() if n in set(names)}) for r, keys in rrecs]
        v2 = reduce_records(rrecs, sum_of_squares(), 2, probe.params, names)
    def detach(d):
        return None if d is None else {n: t.detach() for n, t in d.items()}

    return FisherMoments(detach(fisher), detach(fisher_sq), detach(v1), detach(v2), h.shape[0])


def fisher_moments(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    with_v2: bool = True,
    with_fisher_sq: bool = False,
) -> FisherMoments:
    r""":class:`FisherMoments` of ``model`` at ``inputs`` (one forward, ``C`` unit-seed backward passes).

    ``with_fisher_sq`` adds :math:`\sum_m F_i(x_m)^2` (the input-randomness term of :func:`joint_variance`).
    """
    lik = get_likelihood(likelihood)
    with Probe(model, inputs, lik) as probe:
        return moments_from_probe(probe, with_v2=with_v2, with_fisher_sq=with_fisher_sq)


def fisher_variance(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    estimator: str,
    n_samples: int = 1,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    r"""Variance over label draws of :func:`~fisher_optim.diagonal_fisher` at fixed ``inputs``.

    Returns ``{name: tensor}`` with the keys and shapes of ``diagonal_fisher``:
    :math:`\frac{1}{M^2}\sum_m \tilde v(\theta_i|x_m)/N` for ``reduction="mean"`` (``\sum_m \tilde v/N``
    for ``"sum"``).  Zero for ``exact`` and ``empirical``.

    Example:
        >>> import torch
        >>> from fisher_optim import fisher_variance
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> V1 = fisher_variance(net, x, likelihood="categorical", estimator="mc1", n_samples=4)
        >>> V2 = fisher_variance(net, x, likelihood="categorical", estimator="mc2")
        >>> bool(V2["2.weight"].abs().max() == 0)  # Î₂ is exact on the last layer
        True
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator)
    n_samples = check_n_samples(n_samples)
    check_reduction(reduction)
    with Probe(model, inputs, lik) as probe:
        m = probe.h.shape[0]
        if estimator in ("exact", "empirical"):
            return {n: torch.zeros_like(p, dtype=probe.h.dtype).detach() for n, p in probe.params.items()}
        if estimator == "mc2":
            hessian_plan(model, probe.params)  # raise early for unsupported models
        mom = moments_from_probe(
            probe, with_v1=estimator == "mc1", with_v2=estimator == "mc2", with_fisher=False
        )
    v = mom.v1 if estimator == "mc1" else mom.v2
    scale = 1.0 / n_samples / (m * m if reduction == "mean" else 1)
    return {n: (t * scale).detach() for n, t in v.items()}


def layer_summary(fisher: dict[str, Tensor], variance: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    r"""Per parameter tensor: trace and mean of ``F`` and ``V``, and the relative standard error.

    ``rse = sqrt(mean_i V_i) / mean_i F_i``: the RMS standard error of the entries relative to their mean
    Fisher (0 when ``F`` is all zero and ``V`` too; ``inf`` when only ``F`` is zero).
    """
    out = {}
    for n, f in fisher.items():
        v = variance[n]
        fm = float(f.mean()) if f.numel() else 0.0
        vm = float(v.mean()) if v.numel() else 0.0
        rse = (vm**0.5 / fm) if fm > 0 else (0.0 if vm == 0 else float("inf"))
        out[n] = {
            "trace_fisher": float(f.sum()),
            "mean_fisher": fm,
            "trace_variance": float(v.sum()),
            "mean_variance": vm,
            "rse": rse,
        }
    return out


def joint_variance(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    estimator: str,
    n_samples: int = 1,
) -> dict[str, dict[str, Tensor]]:
    r"""Variance of the joint estimator with random inputs, estimated from the batch (spec §2.3b).

    For a design with ``M`` inputs drawn i.i.d. from :math:`p(x)` and ``N`` labels each,

    .. math::  \mathrm{Var} = \frac1M\Big[\underbrace{\mathrm{Var}_x F_i(x)}_{\text{input}}
               + \frac1N \underbrace{E_x \tilde v(\theta_i|x)}_{\text{output}}\Big],

    with :math:`p(x)` replaced by the empirical distribution of ``inputs`` (``Var_x`` is the population
    variance over the batch, so the identity is exact for a uniform ``p(x)`` over these inputs).
    Returns ``{"input": ..., "output": ..., "total": ...}`` (each a per-parameter dict).
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator, ("mc1", "mc2"))
    n_samples = check_n_samples(n_samples)
    with Probe(model, inputs, lik) as probe:
        mom = moments_from_probe(
            probe, with_v1=estimator == "mc1", with_v2=estimator == "mc2", with_fisher_sq=True
        )
    m = mom.m
    v = mom.v1 if estimator == "mc1" else mom.v2
    inp = {n: (mom.fisher_sq[n] / m - (mom.fisher[n] / m) ** 2) / m for n in mom.fisher}
    out = {n: v[n] / m / n_samples / m for n in mom.fisher}
    return {"input": inp, "output": out, "total": {n: inp[n] + out[n] for n in inp}}
