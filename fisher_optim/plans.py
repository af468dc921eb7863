r"""Mixed-plan estimation: every parameter with its own ``(estimator, n_samples)`` in one probe.

:func:`estimate_plan` is what the optimizers' refreshes and EWC's auto mode call; with one estimator for every
parameter it equals :func:`~fisher_optim.diagonal_fisher`.  One forward serves every group, one label draw of
``max N`` serves every sampled parameter, and each group's backward is restricted to its layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_estimator, check_n_samples
from .batch import OutputSpec
from .engine import Probe, reduce_records
from .estimators import (
    ESTIMATORS,
    _identity_sum,
    batch_squares,
    empirical_seeds,
    exact_sum,
    hutchinson_seeds,
    sampled_seeds,
    square_sum,
    sum_of_squares,
    target_mask,
)
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .likelihoods import Categorical, Likelihood, get_likelihood

__all__ = ["estimate_plan", "plan_from_probe", "PLAN_ESTIMATORS"]

#: every estimator of :func:`~fisher_optim.diagonal_fisher` can be given to a layer in a plan
PLAN_ESTIMATORS = ESTIMATORS


# -- mixed estimation ----------------------------------------------------------------------------------
def _check_plan(plan: dict[str, tuple[str, int]], params: dict[str, Tensor]) -> dict[str, tuple[str, int]]:
    out = {}
    for name, spec in plan.items():
        if name not in params:
            raise ValueError(f"plan names unknown or frozen parameter {name!r}")
        est, n = spec
        check_estimator(est, PLAN_ESTIMATORS)
        out[name] = (est, check_n_samples(n))
    return out


def _per_input_squares(probe: Probe, recs, counts: dict[str, int]) -> dict[str, Tensor]:
    """``sum_m (1/N_i) sum_{k < N_i} x_k^2`` per parameter from records of ``max N_i`` seeds (``counts``)."""
    out: dict[str, Tensor] = {}
    for n in sorted(set(counts.values())):
        names = {k for k, v in counts.items() if v == n}

        def fn(x, idx, n=n):
            return square_sum(x, n).div_(n)

        out.update(reduce_records(recs, fn, 2, probe.params, names))
    return out


def plan_from_probe(probe: Probe, plan, generator=None, targets=None) -> dict[str, Tensor]:
    """Sum over inputs of the diagonal Fisher, each parameter with its own ``(estimator, n_samples)``.

    One label draw of ``max N`` samples serves every sampled parameter (a parameter with ``N_l`` samples
    uses the first ``N_l``); each group's backward is restricted to its layers.  Likewise one Rademacher draw
    serves the ``hutchinson`` parameters, one the ``hutchinson_batch`` parameters, and one label draw the ``gnb``
    parameters (drawn in that order, after the Î₁/Î₂ labels).  The batch estimators return the squared batch
    gradient (unbiased for the *sum* over inputs, like every entry here).
    """
    lik = probe.lik
    plan = _check_plan(plan, probe.params)
    zero = hessian_plan(probe.model, probe.params).zero if any(e == "mc2" for e, _ in plan.values()) else set()
    groups: dict[str, dict[str, int]] = {e: {} for e in PLAN_ESTIMATORS}
    for name, (est, n) in plan.items():
        if est == "mc2" and name in zero:
            est = "exact"  # Î₂ = exact where d2h/dtheta_i^2 = 0 (docs/fisher-math.md §6a, §6g)
        groups[est][name] = n
    mask = target_mask(probe, targets) if targets is not None and isinstance(lik, Categorical) else None
    out: dict[str, Tensor] = {}
    exact_names = set(groups["exact"]) | set(groups["mc2"])
    if exact_names:
        out.update(exact_sum(probe, exact_names, mask))
    n_max = max([*groups["mc1"].values(), *groups["mc2"].values(), 0])
    if n_max:
        _, grads = sampled_seeds(probe, n_max, generator, mask)
        if groups["mc1"]:
            kmax = max(groups["mc1"].values())
            recs = probe.seeded(grads[:kmax], names=groups["mc1"])
            out.update(_per_input_squares(probe, recs, groups["mc1"]))
        for n in sorted(set(groups["mc2"].values())):
            names = {k for k, v in groups["mc2"].items() if v == n}
            rrecs = residual_records(probe, grads[:n].mean(0, keepdim=True), per_sample=False)
            res = reduce_records(rrecs, _identity_sum, 1, probe.params, names)
            for k in names:
                out[k] = out[k] + res[k]
    if groups["hutchinson"]:
        n_h = max(groups["hutchinson"].values())
        recs = probe.seeded(hutchinson_seeds(probe, n_h, generator, mask), names=groups["hutchinson"])
        out.update(_per_input_squares(probe, recs, groups["hutchinson"]))
    if groups["hutchinson_batch"]:
        seeds = hutchinson_seeds(probe, max(groups["hutchinson_batch"].values()), generator, mask)
        out.update(batch_squares(probe, seeds, groups["hutchinson_batch"]))
    if groups["gnb"]:
        _, seeds = sampled_seeds(probe, max(groups["gnb"].values()), generator, mask)
        out.update(batch_squares(probe, seeds, groups["gnb"]))
    if groups["empirical"]:
        if targets is None:
            raise ValueError("estimator 'empirical' needs targets (the observed labels)")
        recs = probe.seeded(empirical_seeds(probe, targets), names=groups["empirical"])
        out.update(reduce_records(recs, sum_of_squares(), 2, probe.params, groups["empirical"]))
    return {n: out[n] for n in probe.params if n in out}  # in the order of model.named_parameters()


def estimate_plan(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    plan: dict[str, tuple[str, int]],
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
) -> dict[str, Tensor]:
    r"""Mean over inputs of the diagonal Fisher for the parameters in ``plan``, each with its own estimator.

    ``plan`` maps parameter names (as in ``model.named_parameters()``) to ``(estimator, n_samples)``.
    The scaling contract is :func:`~fisher_optim.diagonal_fisher`'s: :math:`\frac1M\sum_m \hat I_{ii}`.

    Example:
        >>> import torch
        >>> from fisher_optim.selection import estimate_plan
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> plan = {"0.weight": ("mc1", 4), "0.bias": ("mc1", 4), "2.weight": ("exact", 1)}
        >>> F = estimate_plan(net, torch.randn(8, 4), likelihood="categorical", plan=plan)
        >>> sorted(F)
        ['0.bias', '0.weight', '2.weight']
    """
    lik = get_likelihood(likelihood)
    with Probe(model, inputs, lik, names=list(plan), output=output) as probe:
        out = plan_from_probe(probe, plan, generator=generator, targets=targets)
        m = probe.h.shape[0]
    return {n: (v / m).detach() for n, v in out.items()}


