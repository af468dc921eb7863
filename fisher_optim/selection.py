r"""Per-layer choice of estimator and sample count from the closed-form variances, and mixed estimation.

:func:`select` answers, for every layer (a module's weight and bias, which share one backward pass; any other
parameter on its own): which estimator, with how many samples,
keeps the relative standard error of the *running* estimate under ``target_rse`` at the lowest cost?

The running estimate is an exponential moving average with decay ``beta`` of refreshes, each an
estimate on ``M`` inputs.  With per-refresh variance :math:`V_i = \sum_m \tilde v(\theta_i|x_m)/(M^2 N)`
(:mod:`fisher_optim.variance`) and independent refreshes, the EMA's steady-state variance is
:math:`\phi V_i` with :math:`\phi = (1-\beta)/(1+\beta)`.  The layer's relative standard error is

.. math::  \mathrm{rse} = \sqrt{\phi\,\overline{V}}\;/\;\overline{F}
           \qquad(\text{means over the tensor's entries}),

so Î₁ needs :math:`N \ge \lceil \phi\,\overline{\tilde V_1} / (\mathrm{target}\cdot\overline F)^2 \rceil`
samples.  Meeting the target is necessary, not sufficient: the running estimate also carries the noise of the
inputs.  Per input, a refresh's error variance is :math:`(A + L/N)/M` with :math:`A = \overline{\mathrm{Var}_x F_i}`
and :math:`L = \overline{E_x \tilde v_1}`, and a time budget buys :math:`1/(c + s)` refreshes (``s`` the shared
forward pass, split by size), so Î₁ with ``N`` samples is chosen only if
:math:`(A + L/N)(N c_1 + s) < A (c_{exact} + s)`, with the best such ``N``.  Candidates and their costs:

* ``exact``: ``C`` backward seeds down to the layer, zero variance;
* ``mc1``: ``N`` sampled seeds, cost ``N`` times the one-sample cost;
* ``mc2``: costs the exact pass plus the Hessian residual (Î₂ = exact + residual here), so it never beats
  ``exact`` where the residual is nonzero; where the residual vanishes (last layer, piecewise-linear
  networks, spec §6a/§6g) Î₂ *is* the exact Fisher, which is what ``exact`` computes.

Costs within ``COST_TIE`` (25 %, the timing noise) of each other count as a tie, which goes to ``exact``
(zero variance).  Costs are measured on the current batch (``cost_model="measured"``: each layer's exact and one-sample
passes timed in isolation) or predicted from sizes (``"flops"``: deterministic, for reproducible runs).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .engine import Probe, reduce_records
from .estimators import _identity_sum, check_estimator, check_n_samples, sum_of_squares
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .likelihoods import Likelihood, get_likelihood
from .variance import moments_from_probe

__all__ = ["Choice", "select", "estimate_plan", "PLAN_ESTIMATORS"]

PLAN_ESTIMATORS = ("exact", "mc1", "mc2", "empirical")
#: relative cost difference treated as a tie (timing noise); ties go to the zero-variance exact estimator
COST_TIE = 0.25


@dataclass
class Choice:
    """The estimator chosen for one parameter tensor, and why.

    ``rse`` is the predicted relative standard error of the running (EMA) estimate, ``cost`` the predicted
    seconds per refresh for this tensor (``"flops"`` cost model: relative units), ``rse_mc1``/``rse_mc2``
    the one-sample, one-refresh relative standard errors, ``mean_fisher`` the mean exact Fisher entry.
    """

    estimator: str
    n_samples: int
    rse: float
    cost: float
    reason: str
    rse_mc1: float = float("nan")
    rse_mc2: float = float("nan")
    mean_fisher: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


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


def plan_from_probe(probe: Probe, plan, generator=None, targets=None) -> dict[str, Tensor]:
    """Sum over inputs of the diagonal Fisher, each parameter with its own ``(estimator, n_samples)``.

    One label draw of ``max N`` samples serves every sampled parameter (a parameter with ``N_l`` samples
    uses the first ``N_l``); each group's backward is restricted to its layers.
    """
    lik, h = probe.lik, probe.h.detach()
    plan = _check_plan(plan, probe.params)
    zero = hessian_plan(probe.model, probe.params).zero if any(e == "mc2" for e, _ in plan.values()) else set()
    groups: dict[str, dict[str, int]] = {"exact": {}, "mc1": {}, "mc2": {}, "empirical": {}}
    for name, (est, n) in plan.items():
        if est == "mc2" and name in zero:
            est = "exact"  # Î₂ = exact where d2h/dtheta_i^2 = 0 (spec §6a, §6g)
        groups[est][name] = n
    out: dict[str, Tensor] = {}
    exact_names = set(groups["exact"]) | set(groups["mc2"])
    if exact_names:
        seeds = lik.fisher_factor(h).permute(2, 0, 1)
        recs = probe.seeded(seeds, names=exact_names)
        out.update(reduce_records(recs, sum_of_squares(), 2, probe.params, exact_names))
    n_max = max([*groups["mc1"].values(), *groups["mc2"].values(), 0])
    if n_max:
        y = lik.sample(h, n_max, generator=generator)
        grads = lik.grad(h, y)
        if groups["mc1"]:
            kmax = max(groups["mc1"].values())
            recs = probe.seeded(grads[:kmax], names=groups["mc1"])
            for n in sorted(set(groups["mc1"].values())):
                names = {k for k, v in groups["mc1"].items() if v == n}

                def fn(x, idx, n=n):
                    return (x[:n] * x[:n]).sum(0) / n

                out.update(reduce_records(recs, fn, 2, probe.params, names))
        for n in sorted(set(groups["mc2"].values())):
            names = {k for k, v in groups["mc2"].items() if v == n}
            rrecs = residual_records(probe, grads[:n].mean(0, keepdim=True), per_sample=False)
            res = reduce_records(rrecs, _identity_sum, 1, probe.params, names)
            for k in names:
                out[k] = out[k] + res[k]
    if groups["empirical"]:
        if targets is None:
            raise ValueError("estimator 'empirical' needs targets (the observed labels)")
        yt = lik.check_targets(h, targets)
        recs = probe.seeded(lik.grad(h, yt).unsqueeze(0), names=groups["empirical"])
        out.update(reduce_records(recs, sum_of_squares(), 2, probe.params, groups["empirical"]))
    return out


def estimate_plan(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
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
    with Probe(model, inputs, lik, names=list(plan)) as probe:
        out = plan_from_probe(probe, plan, generator=generator, targets=targets)
        m = probe.h.shape[0]
    return {n: (v / m).detach() for n, v in out.items()}


# -- selection -----------------------------------------------------------------------------------------
def _module_units(probe: Probe) -> list[list[str]]:
    """Parameter names grouped by the layer (module) whose backward produces them."""
    units = [probe._module_params(i) for i in range(len(probe.fast))]
    units += [[n] for n in probe.general]
    return units


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measured_costs(probe: Probe, units) -> dict[str, tuple[float, float]]:
    """Per parameter: (seconds of the exact pass, seconds of a one-sample Î₁ pass) for its layer."""
    lik, h = probe.lik, probe.h.detach()
    seeds_exact = lik.fisher_factor(h).permute(2, 0, 1)
    one = lik.grad(h, lik.sample(h, 1, generator=torch.Generator(device=h.device).manual_seed(0)))
    out = {}
    for names in units:
        def run(seeds, names=names):
            reduce_records(probe.seeded(seeds, names=names), sum_of_squares(), 2, probe.params, names)

        run(one)  # warm-up of both paths (the first batched-seed backward pays a one-off vmap setup)
        run(seeds_exact)
        t_ex = _time(lambda: run(seeds_exact), repeats=2)
        t_1 = _time(lambda: run(one), repeats=2)
        share = 1.0 / len(names)
        for n in names:
            out[n] = (t_ex * share, t_1 * share)
    return out


def _flops_costs(probe: Probe, units) -> dict[str, tuple[float, float]]:
    """Deterministic cost model: seeds x (backward work from the output down to the layer + reduction)."""
    c = probe.h.shape[1]
    sizes = []
    for names in units:
        sizes.append(sum(probe.params[n].numel() for n in names))
    out = {}
    # fast modules are in forward order; the backward to layer l crosses every later layer
    for i, names in enumerate(units):
        depth = sum(sizes[i:]) if i < len(probe.fast) else sum(sizes)
        cost1 = float(depth + sizes[i])
        for n in names:
            share = probe.params[n].numel() / max(1, sizes[i])
            out[n] = (c * cost1 * share, cost1 * share)
    return out


def select(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    generator: torch.Generator | None = None,
    target_rse: float = 0.1,
    ema_decay: float = 0.9,
    max_samples: int = 16,
    names=None,
    cost_model: str = "measured",
    with_v2: bool = False,
) -> dict[str, Choice]:
    r"""Choose ``(estimator, n_samples)`` per parameter tensor (see the module docstring).

    Args:
        target_rse: bound on the relative standard error of the running estimate.
        ema_decay: decay ``beta`` of the running estimate (``phi = (1-beta)/(1+beta)``).
        max_samples: largest ``N`` considered for Î₁.
        cost_model: ``"measured"`` (time each layer's passes on this batch) or ``"flops"``.
        with_v2: also compute Î₂'s variance for the report (``rse_mc2``; ``nan`` otherwise).
        generator: accepted for symmetry with :func:`estimate_plan` and never advanced: the choice needs no
            label draws (the timing pass uses a private, fixed generator), so a caller's label stream, and a
            resumed run, do not depend on when selections happen.

    Example:
        >>> import torch
        >>> from fisher_optim.selection import select
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3))
        >>> ch = select(net, torch.randn(32, 4), likelihood="categorical", cost_model="flops")
        >>> sorted(ch) == sorted(n for n, _ in net.named_parameters())
        True
    """
    if not (isinstance(target_rse, (int, float)) and target_rse > 0):
        raise ValueError(f"Invalid target_rse: {target_rse}")
    if not (0.0 <= ema_decay < 1.0):
        raise ValueError(f"Invalid ema_decay: {ema_decay}")
    max_samples = check_n_samples(max_samples)
    if cost_model not in ("measured", "flops"):
        raise ValueError(f"Invalid cost_model: {cost_model!r}. Must be 'measured' or 'flops'")
    lik = get_likelihood(likelihood)
    phi = (1.0 - ema_decay) / (1.0 + ema_decay)
    with Probe(model, inputs, lik, names=names) as probe:
        m = probe.h.shape[0]
        try:
            hp = hessian_plan(model, probe.params)
        except ValueError:
            hp = None
        # V2 is reported only when asked: mc2 costs the exact pass plus the residual, so it is never chosen
        mom = moments_from_probe(
            probe, with_v2=with_v2 and hp is not None and hp.route in ("chain", "zero"), with_fisher_sq=True
        )
        units = _module_units(probe)
        costs = _measured_costs(probe, units) if cost_model == "measured" else _flops_costs(probe, units)
        # the part of a refresh every estimator pays (forward pass, per-call overhead), shared by size
        if cost_model == "measured":
            with torch.enable_grad():
                shared = _time(lambda: model(inputs), repeats=2)
        else:
            shared = float(sum(p.numel() for p in probe.params.values()))
    total_numel = max(1, sum(p.numel() for p in probe.params.values()))
    out: dict[str, Choice] = {}
    # one decision per layer (the parameters that share a backward pass: a module's weight and bias)
    for unit in units:
        unit = [n for n in unit if n in probe.params]
        if not unit:
            continue
        numel = sum(mom.fisher[n].numel() for n in unit)
        if numel == 0:
            for n in unit:
                out[n] = Choice("exact", 1, 0.0, 0.0, "empty parameter", 0.0, 0.0, 0.0)
            continue

        def mean(d, unit=unit, numel=numel):
            return sum(float(d[n].sum()) for n in unit) / numel

        f = mean(mom.fisher) / m
        v1 = mean(mom.v1) / m**2
        # per-input noise levels: A = mean_i Var_x F_i(x) (inputs), L = mean_i E_x v1(theta_i|x) (one label)
        a_in = max(0.0, mean(mom.fisher_sq) / m - sum(float((mom.fisher[n] / m).pow(2).sum()) for n in unit) / numel)
        l_lab = mean(mom.v1) / m
        s_l = shared * sum(mom.fisher[n].numel() for n in unit) / total_numel
        v2 = mean(mom.v2) / m**2 if mom.v2 is not None else float("nan")
        c_ex = sum(costs.get(n, (0.0, 0.0))[0] for n in unit)
        c_1 = sum(costs.get(n, (0.0, 0.0))[1] for n in unit)
        zero_res = hp is not None and all(n in hp.zero for n in unit)
        if f <= 0:
            ch = Choice("mc1", 1, 0.0, c_1, "zero Fisher on this batch: cheapest estimator", 0.0, 0.0, f)
        else:
            rse1 = math.sqrt(v1) / f
            rse2 = math.sqrt(v2) / f if v2 == v2 else float("nan")
            n_need = max(1, math.ceil(phi * v1 / (target_rse * f) ** 2)) if v1 > 0 else 1
            # error per unit of time, input noise included: a refresh's error variance is (A + L/N)/M and a
            # budget buys 1/(cost + shared) refreshes; Î₁ must beat exact's A * (c_ex + shared)
            best_n, best_score = None, float("inf")
            for n in range(n_need, max_samples + 1):
                score = (a_in + l_lab / n) * (n * c_1 + s_l)
                if score < best_score:
                    best_n, best_score = n, score
            exact_score = a_in * (c_ex + s_l)
            if best_n is not None and best_score * (1.0 + COST_TIE) < exact_score:
                rse = math.sqrt(phi * v1 / best_n) / f
                reason = (
                    f"Î₁ with N={best_n} meets target rse {target_rse:g} and is more accurate per second than "
                    f"exact (label noise L/N = {l_lab / best_n / a_in:.2g} x input noise)"
                )
                ch = Choice("mc1", best_n, rse, best_n * c_1, reason, rse1, rse2, f)
            else:
                if zero_res:
                    reason = "Î₂ = exact here (d²h/dθ² = 0: last layer or piecewise-linear path): zero variance"
                elif n_need > max_samples:
                    reason = f"Î₁ would need N={n_need} > max_samples={max_samples}"
                elif a_in > 0:
                    reason = (
                        f"exact is more accurate per second: Î₁'s label noise (L/N = {l_lab / n_need / a_in:.2g} x "
                        f"input noise at N={n_need}) outweighs its saving ({c_ex / max(n_need * c_1, 1e-300):.2g}x)"
                    )
                else:
                    reason = "exact: no input noise measured on this batch to hide Î₁'s label noise"
                ch = Choice("exact", 1, 0.0, c_ex, reason, rse1, rse2, f)
        for n in unit:
            out[n] = ch
    return out
