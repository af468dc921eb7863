r"""Per-layer choice of estimator and sample count from the closed-form variances, and mixed estimation.

:func:`select` chooses one *plan* for the whole model: for every layer (a module's weight and bias, which share one
backward pass; any other parameter on its own) the exact Fisher or Î₁ with ``N`` samples.

**What a plan costs.**  A refresh runs one forward pass (and a per-call overhead), ``s``, then one seeded backward
per group of layers: ``C`` seeds for the exact layers (none for an output ``nn.Linear``, whose exact Fisher is a
closed form) and ``N_max`` sampled seeds for the Î₁ layers.  Each backward is as deep as the deepest layer of its
group, and each layer adds its own reduction (:meth:`Costs.refresh_cost`).  So one exact layer deep in the network
costs nearly a whole exact pass, and the layers cannot be chosen one at a time.

**What a plan buys.**  The running estimate is an exponential moving average with decay ``beta`` of refreshes on
``M`` inputs.  Per tensor ``t``, a refresh's expected squared relative error is :math:`(a_t + l_t/N)/M`
(docs/fisher-math.md §2.3 b),
with :math:`a_t = \sum_i \mathrm{Var}_x F_i(x) / \sum_i F_i^2` (input noise) and
:math:`l_t = \sum_i E_x \tilde v_1(\theta_i|x) / \sum_i F_i^2` (one-label noise of Î₁; 0 for exact), all from the
moments of the current batch (:mod:`fisher_optim.variance`).  A time budget buys ``1 / cost`` refreshes, so before
the EMA's plateau the mean relative error over tensors at equal time is proportional to

.. math::  \sqrt{\mathrm{cost}(\mathrm{plan})} \;\sum_t \sqrt{a_t + l_t/N_t},

which :func:`joint_plan` minimises (variance x cost, the classic efficiency of a Monte-Carlo estimator; the mean
over tensors weighs each tensor's relative error equally, so compute goes where the estimate is worst).  Each Î₁
layer must also keep the label noise of the running estimate under ``target_rse``: with per-refresh variance
:math:`V_i = \sum_m \tilde v_1(\theta_i|x_m)/(M^2 N)`, the EMA's steady-state variance is :math:`\phi V_i`,
:math:`\phi = (1-\beta)/(1+\beta)`, so ``N >= ceil(phi * mean V~1 / (target * mean F)^2)`` (layer means).
A plan within ``COST_TIE`` (25 %, the timing noise) of exact everywhere gives way to it (zero variance), and the
plan in use (``current=``) is kept unless the new optimum beats it by that margin (no flip-flopping on the noise of
one batch).  ``mc2`` is never chosen: it costs the exact pass plus the Hessian residual (Î₂ = exact + residual),
and where the residual vanishes (last layer, piecewise-linear networks, docs/fisher-math.md §6a/§6g) Î₂ *is* the exact
Fisher.

Two cost models give the per-layer backward and reduction costs and the shared part ``s`` (:class:`Costs`):

* ``"flops"`` (deterministic, for bit-reproducible runs): a seed's backward down to a layer crosses every later
  layer (sizes summed; a ``torch.func``-route parameter crosses the whole model), its reduction costs the layer's
  size; ``s`` is the parameter count;
* ``"measured"``: whole-model timings on the current batch of the calls a refresh makes: one forward pass, one
  exact pass and a one-sample and a ``COST_PROBE_SAMPLES``-sample Î₁ pass over *all* layers.  The two Î₁ timings
  separate the marginal cost of a sample from the per-call overhead, which joins the forward pass in ``s``; the
  ``"flops"`` model's per-layer costs are scaled so that it prices the exact and the one-sample plans at what was
  measured, and mixed plans from there.

Costs depend on the input shape and the layers, not on the parameter values: :func:`run_selection` returns them as
:class:`Costs` and accepts them back (``costs=``) to skip the timing on a batch of the same shape and dtype, as
:class:`~fisher_optim.optim.FisherAdam` does.  The selection's moments pass computes the exact Fisher
:math:`\sum_m F(x_m)` anyway (:func:`~fisher_optim.variance.moments_from_probe`); :func:`run_selection` returns it as
:attr:`Selection.fisher`, scaled as :func:`estimate_plan` (mean over the inputs), so the refresh that follows a
selection needs no estimation pass of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
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
from .variance import factor_moments, moments_from_probe

__all__ = ["Choice", "Costs", "Selection", "select", "run_selection", "estimate_plan", "PLAN_ESTIMATORS"]

#: every estimator of :func:`~fisher_optim.diagonal_fisher` can be given to a layer in a plan; :func:`select` chooses
#: among ``exact`` and ``mc1`` only (the cost model prices those two)
PLAN_ESTIMATORS = ESTIMATORS
#: relative cost difference treated as a tie (timing noise); ties go to the zero-variance exact estimator
COST_TIE = 0.25
#: the per-input sampled estimators :func:`select` chooses among (one backward of ``N`` seeds per input each, so one
#: cost model prices both; their per-input variances: Î₁'s ``v1`` and Hutchinson's ``2(F(x)^2 - sum_a A^4)``)
SAMPLED = ("mc1", "hutchinson")
#: labels of the sampled estimators in reasons
_LABEL = {"mc1": "Î₁", "hutchinson": "Hutchinson"}


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
    #: where the predicted variance came from: "closed form" (the moments of the batch), "online" or "bound"
    source: str = "closed form"

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


# -- selection -----------------------------------------------------------------------------------------
COST_MODELS = ("measured", "flops")


@dataclass
class Costs:
    r"""Per-refresh costs used by :func:`run_selection`, reusable on later batches of the same shape.

    The cost of a refresh with a mixed plan (:meth:`refresh_cost`) is

    .. math::  s + \Big[\max_{u\in E} b^{ex}_u + \sum_{u\in E} r^{ex}_u\Big]
               + \Big[N_{\max} \max_{u\in S} b^{1}_u + \sum_{u\in S} N_u\, r^{1}_u\Big]

    for the layers ``E`` estimated exactly and the layers ``S`` by Î₁ with ``N_u`` samples: each group runs one
    seeded backward, as deep as its deepest layer (``b``: the backward down to and through layer ``u``), plus one
    reduction per layer (``r``); the output layer's exact Fisher takes no seeds (``b = 0``).  ``units`` lists the
    layers (parameter names that share a backward: a module's weight and bias) and ``unit_costs`` their
    ``(b_ex, r_ex, b_1, r_1)`` in seconds (``"flops"``: parameter-count units); ``shared`` (``s``) is the part every
    plan pays once per refresh (the forward pass and the per-call overhead; ``"flops"``: the parameter count).

    ``per_param`` maps each parameter name to ``(c_exact, c_one_sample)``: its share of the seconds of one exact
    pass and of one one-sample Î₁ pass over all layers (for reports).  ``input_shape``, ``input_dtype`` and
    ``names`` (the parameters, sorted) say what the costs were measured for.
    """

    cost_model: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    names: tuple[str, ...]
    per_param: dict[str, tuple[float, float]]
    shared: float
    units: tuple[tuple[str, ...], ...] = ()
    unit_costs: tuple[tuple[float, float, float, float], ...] = ()

    def matches(self, inputs: Tensor, names, cost_model: str) -> bool:
        """Whether these costs hold for ``inputs`` (shape and dtype), the parameters ``names`` and ``cost_model``."""
        return (
            self.cost_model == cost_model
            and self.input_shape == tuple(inputs.shape)
            and self.input_dtype == inputs.dtype
            and self.names == tuple(sorted(names))
        )

    def unit_refresh_cost(self, options: list[int]) -> float:
        """:meth:`refresh_cost` of a plan given per unit (in ``units`` order): ``0`` for exact, ``N`` for Î₁."""
        b_ex = r_ex = b_1 = r_1 = 0.0
        n_max = 0
        for opt, (bex, rex, b1, r1) in zip(options, self.unit_costs):
            if opt == 0:
                b_ex = max(b_ex, bex)
                r_ex += rex
            else:
                n_max = max(n_max, opt)
                b_1 = max(b_1, b1)
                r_1 += opt * r1
        return self.shared + b_ex + r_ex + n_max * b_1 + r_1

    def refresh_cost(self, plan: dict[str, tuple[str, int]]) -> float:
        """Predicted seconds of one refresh with ``plan`` (``name -> (estimator, n_samples)``, estimators ``exact``
        or ``mc1``; a layer counts as exact unless its first listed parameter takes ``mc1``)."""
        options = []
        for unit in self.units:
            est, n = plan.get(unit[0], ("exact", 1))
            if est not in ("exact",) + SAMPLED:
                raise ValueError(f"refresh_cost models 'exact', 'mc1' and 'hutchinson' only, not {est!r}")
            options.append(0 if est == "exact" else int(n))
        return self.unit_refresh_cost(options)


@dataclass
class Selection:
    r"""What :func:`run_selection` computed: ``choices`` (as :func:`select` returns them), the ``costs`` it used
    (to pass back as ``costs=`` on a batch of the same shape) and ``fisher``, the exact diagonal Fisher of the
    selection batch, :math:`\frac1M\sum_m F_{ii}(x_m)` (mean over the ``M`` inputs: the scaling of
    :func:`estimate_plan` and :func:`~fisher_optim.diagonal_fisher`), for every selected parameter (zeros for
    a parameter unused by the forward pass)."""

    choices: dict[str, Choice]
    fisher: dict[str, Tensor]
    costs: Costs
    #: whether the plan differs from ``current`` (always ``True`` without one)
    changed: bool = True
    #: predicted seconds of one refresh with the chosen plan and with exact everywhere (``Costs.refresh_cost``)
    plan_cost: float = float("nan")
    exact_cost: float = float("nan")
    #: one line: the plan against exact everywhere and against the best plan with Î₁ on every layer that takes seeds
    summary: str = ""


def _module_units(probe: Probe) -> list[list[str]]:
    """Parameter names grouped by the layer (module) whose backward produces them."""
    units = [probe.module_params(i) for i in range(len(probe.fast))]
    units += [[n] for n in probe.general]
    return units


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


#: samples of the second one-sample-kind timing in the measured cost model (marginal cost per sample)
COST_PROBE_SAMPLES = 4


def _measured_costs(
    probe: Probe, units, warm_exact: bool = False
) -> tuple[dict[str, tuple[float, float]], float, tuple[float, float]]:
    """Per parameter (seconds of the exact pass, seconds per Î₁ sample) for its layer, the per-call overhead, and the
    seconds per flops unit of the exact and of the one-sample pass (scales of :func:`_unit_flops`).

    Three whole-model timings of the calls a refresh makes (:func:`plan_from_probe`): an exact pass, a one-sample
    and a ``COST_PROBE_SAMPLES``-sample Î₁ pass over every layer in ``units``.  Their difference gives the marginal
    cost of one sample; the rest of the one-sample call is per-call overhead (label draw, hooks, reductions' set-up),
    returned apart so that the caller adds it to the shared part (it is paid once per refresh, whatever the plan).
    The exact pass less that overhead, and the per-sample cost, are split over the parameters in proportion to
    :func:`_flops_costs` (see the module docstring).  The sampled passes get one untimed warm-up each, the exact pass
    too unless ``warm_exact`` (a batched-seed backward on this probe already ran: the first one pays a one-off vmap
    setup).  The scales make :func:`_unit_flops`'s whole-plan costs of the exact and of the one-sample pass equal the
    measured ones, so :meth:`Costs.refresh_cost` prices a mixed plan from the same three timings."""
    names = [n for unit in units for n in unit]
    if not names:
        return {}, 0.0, (0.0, 0.0)
    gen = torch.Generator(device=probe.h.device)  # private: the caller's label stream is never advanced
    exact_plan = {n: ("exact", 1) for n in names}
    one_plan = {n: ("mc1", 1) for n in names}
    many_plan = {n: ("mc1", COST_PROBE_SAMPLES) for n in names}

    def run(plan):  # the very calls a refresh makes (plan_from_probe), output-layer shortcut included
        plan_from_probe(probe, plan, generator=gen.manual_seed(0))

    run(one_plan)
    run(many_plan)
    if not warm_exact:
        run(exact_plan)
    t_ex = _time(lambda: run(exact_plan))
    t_1 = _time(lambda: run(one_plan))
    t_many = _time(lambda: run(many_plan))
    per_sample = max((t_many - t_1) / (COST_PROBE_SAMPLES - 1), 0.05 * t_1)  # timing noise can make it <= 0
    overhead = max(t_1 - per_sample, 0.0)
    exact_work = max(t_ex - overhead, per_sample)
    flops = _flops_costs(probe, units)
    tot_ex = sum(c for c, _ in flops.values()) or 1.0
    tot_1 = sum(c for _, c in flops.values()) or 1.0
    per_param = {n: (exact_work * c_ex / tot_ex, per_sample * c_1 / tot_1) for n, (c_ex, c_1) in flops.items()}
    uf = _unit_flops(probe, units)
    plan_ex = max(c[0] for c in uf) + sum(c[1] for c in uf)
    plan_1 = max(c[2] for c in uf) + sum(c[3] for c in uf)
    return per_param, overhead, (exact_work / max(plan_ex, 1e-300), per_sample / max(plan_1, 1e-300))


def _flops_costs(probe: Probe, units) -> dict[str, tuple[float, float]]:
    """Deterministic per-parameter costs ``(c_exact, c_one_sample)`` (for reports and the measured model's split): the
    layer's exact or one-sample pass on its own, ``b + r`` of :func:`_unit_flops`, shared by size within the layer."""
    out = {}
    for names, (b_ex, r_ex, b_1, r_1) in zip(units, _unit_flops(probe, units)):
        size = sum(probe.params[n].numel() for n in names)
        for n in names:
            share = probe.params[n].numel() / max(1, size)
            out[n] = ((b_ex + r_ex) * share, (b_1 + r_1) * share)
    return out


def _unit_flops(probe: Probe, units) -> list[tuple[float, float, float, float]]:
    """Per layer ``(b_ex, r_ex, b_1, r_1)`` of :class:`Costs` in parameter-count units: a seed's backward down to
    and through layer ``u`` crosses every later layer (``b = sum of their sizes and its own``; a ``torch.func``-route
    parameter crosses the whole model) and its reduction costs the layer's size; exact takes ``C`` seeds, none on
    the output layer (its reduction only, :meth:`~fisher_optim.engine.Probe.exact_output_layer`)."""
    c = probe.h.shape[1]
    sizes = [sum(probe.params[n].numel() for n in names) for names in units]
    out = []
    for i, size in enumerate(sizes):
        back = float(sum(sizes[i:]) if i < len(probe.fast) else sum(sizes))
        if i == probe.output_index:
            out.append((0.0, float(size), back, float(size)))
        else:
            out.append((c * back, c * float(size), back, float(size)))
    return out


def _costs(probe: Probe, units, cost_model: str, warm_exact: bool) -> Costs:
    """Fresh :class:`Costs` for this probe's batch and parameters."""
    uf = _unit_flops(probe, units)
    if cost_model == "measured":
        per_param, overhead, (k_ex, k_1) = _measured_costs(probe, units, warm_exact=warm_exact)
        # the part of a refresh every estimator pays once: the forward pass and the per-call overhead
        with torch.enable_grad():
            shared = _time(lambda: probe.outputs_of(probe.batch), repeats=2) + overhead
        uf = [(k_ex * bex, k_ex * rex, k_1 * b1, k_1 * r1) for bex, rex, b1, r1 in uf]
    else:
        per_param = _flops_costs(probe, units)
        shared = float(sum(p.numel() for p in probe.params.values()))
    x = probe.inputs
    return Costs(
        cost_model, tuple(x.shape), x.dtype, tuple(sorted(probe.params)), per_param, shared,
        tuple(tuple(u) for u in units), tuple(uf),
    )  # fmt: skip


@dataclass
class _UnitStats:
    """What the joint choice needs of one layer: per tensor the input and one-label noise relative to the squared
    norm of its mean Fisher (``a_t``, ``l_t``), the rse floor on ``N`` and the layer's reporting numbers."""

    names: tuple[str, ...]
    a: list[float]
    l: list[float]
    n_need: int
    f: float
    v1: float
    v2: float
    a_mean: float
    l_mean: float


def _tensor_sums(mom, names: list[str]) -> dict[str, list[float]]:
    """Per tensor ``[sum_i F_i, sum_i F_i^2, sum_i F2_i, sum_i v1_i, sum_i v2_i]`` of the moments (sums over inputs
    per entry, as :class:`~fisher_optim.variance.FisherMoments` holds them; ``v2`` 0 when absent), by fused
    ``torch._foreach_norm`` reductions in the moments' dtype (every statistic is non-negative, so its L1 norm is its
    sum; a float64 accumulation of float32 tensors is ~20x slower on the CPU) and read with one host
    synchronisation."""
    names = [n for n in names if mom.fisher[n].numel()]
    if not names:
        return {}
    cols = [
        torch._foreach_norm([mom.fisher[n] for n in names], 1),
        torch._foreach_norm([mom.fisher[n] for n in names], 2),
        torch._foreach_norm([mom.fisher_sq[n] for n in names], 1),
        torch._foreach_norm([mom.v1[n] for n in names], 1),
    ]
    if mom.v2 is not None:
        cols.append(torch._foreach_norm([mom.v2[n] for n in names], 1))
    vals = torch.stack([torch.stack([t.double() for t in c]) for c in cols]).tolist()  # dtypes may differ
    out = {}
    for j, n in enumerate(names):
        row = [vals[i][j] for i in range(len(cols))]
        row[1] = row[1] ** 2
        out[n] = row + ([0.0] if mom.v2 is None else [])
    return out


def _unit_stats(unit, sums: dict, numel: int, m: int, phi: float, target_rse: float, has_v2: bool):
    """:class:`_UnitStats` of the layer ``unit`` (``None``: empty layer) from the per-tensor sums of the moments of
    an ``M``-input batch (:func:`_tensor_sums`).

    Per entry ``i``: mean Fisher ``F_i = sum_m F_i(x_m)/M``, input noise ``A_i = sum_m F_i(x_m)^2/M - F_i^2`` and
    one-label noise ``L_i = sum_m v1(theta_i|x_m)/M``; per tensor ``a_t = sum_i A_i / sum_i F_i^2`` and
    ``l_t = sum_i L_i / sum_i F_i^2``, so a refresh on ``M`` inputs with ``N`` labels each has expected squared
    relative error ``(a_t + l_t/N)/M`` on that tensor (docs/fisher-math.md §2.3 b).  ``n_need`` is the smallest ``N``
    with which
    the label noise of the running estimate meets ``target_rse`` (layer means, EMA factor ``phi``)."""
    if numel == 0:
        return None
    a_t, l_t = [], []
    tot = [0.0, 0.0, 0.0, 0.0, 0.0]  # sum F, sum F^2 (of the batch mean), sum F(x)^2, sum v1, sum v2 over the layer
    for n in unit:
        if n not in sums:
            continue
        f_sum, norm2, fsq, l_sum, v2_sum = (v / d for v, d in zip(sums[n], (m, m * m, m, m, m)))
        a_sum = max(0.0, fsq - norm2)
        a_t.append(a_sum / norm2 if norm2 > 0 else 0.0)
        l_t.append(l_sum / norm2 if norm2 > 0 else 0.0)
        for i, v in enumerate((f_sum, norm2, fsq, l_sum, v2_sum)):
            tot[i] += v
    f = tot[0] / numel
    v1 = tot[3] / numel / m
    v2 = tot[4] / numel / m if has_v2 else float("nan")
    a_mean = max(0.0, (tot[2] - tot[1]) / numel)
    n_need = max(1, math.ceil(phi * v1 / (target_rse * f) ** 2)) if v1 > 0 and f > 0 else 1
    return _UnitStats(tuple(unit), a_t, l_t, n_need, f, v1, v2, a_mean, tot[3] / numel)


class _PlanScorer:
    r"""``score(plans)`` is ``J = cost * (sum_t sqrt(a_t + l_t/N_t))^2`` of every row of ``plans`` (``(R, U)``
    options: ``0`` exact, ``N`` Î₁; ``inf`` where an option is infeasible), ``cost`` as :meth:`Costs.refresh_cost`.

    Before the running estimate's plateau a time budget ``T`` buys ``T / cost`` refreshes, so tensor ``t``'s expected
    relative error is about :math:`\sqrt{\mathrm{cost}\,(a_t + l_t/N_t)/(M T)}`: the mean over tensors at equal time
    is proportional to ``sqrt(J)``."""

    def __init__(self, stats: list[_UnitStats | None], costs: Costs, max_samples: int):
        n_units, k = len(stats), max_samples
        self.k = k
        table = np.full((n_units, k + 1), np.inf)  # sum_t sqrt(a_t + l_t/N) per layer and option (col 0: exact)
        need = np.full(n_units, k + 1)
        for u, st in enumerate(stats):
            if st is None:
                table[u, 0] = 0.0
                continue
            a, lab = np.asarray(st.a, dtype=float), np.asarray(st.l, dtype=float)
            table[u, 0] = np.sqrt(a).sum()
            if st.n_need <= k:
                ns = np.arange(st.n_need, k + 1, dtype=float)
                table[u, st.n_need :] = np.sqrt(a[None, :] + lab[None, :] / ns[:, None]).sum(1)
                need[u] = st.n_need
        self.table, self.need, self.shared = table, need, costs.shared
        self.uc = np.asarray(costs.unit_costs, dtype=float).reshape(n_units, 4)
        self.rows = np.arange(n_units)[None, :]

    def score(self, plans: np.ndarray) -> np.ndarray:
        uc, ex = self.uc, plans == 0  # costs are >= 0, so masking by a product keeps the maxima
        err = self.table[self.rows, plans].sum(1)
        cost = (self.shared + (ex * uc[:, 0]).max(1, initial=0.0) + ex @ uc[:, 1]
                + plans.max(1, initial=0) * (~ex * uc[:, 2]).max(1, initial=0.0))  # fmt: skip
        cost += plans @ uc[:, 3]
        with np.errstate(invalid="ignore"):
            return np.where(err < np.inf, cost * err * err, np.inf)  # inf where an option is infeasible

    def alternatives(self, opts: list[int], i: int) -> tuple[np.ndarray, np.ndarray]:
        """Every feasible option of layer ``i`` with the others as in ``opts``, and their ``J``."""
        cand = np.array([0] if opts[i] else list(range(min(self.need[i], self.k + 1), self.k + 1)), dtype=np.int64)
        plans = np.repeat(np.asarray(opts, dtype=np.int64)[None, :], len(cand), 0)
        plans[:, i] = cand
        return cand, self.score(plans)


def joint_plan(
    stats: list[_UnitStats | None], costs: Costs, max_samples: int, max_steps: int | None = None,
    scorer: _PlanScorer | None = None,
) -> tuple[list[int], float]:
    r"""The plan (per unit ``0`` = exact or ``N`` = Î₁ with ``N`` samples, ``N >= n_need``) minimising the predicted
    mean relative error at equal time, :math:`J = \mathrm{cost} \cdot (\sum_t \sqrt{a_t + l_t/N_t})^2`
    (:class:`_PlanScorer`), and its ``J``.

    The layers are coupled: every layer's refresh rate is set by the whole plan's cost, and a group's backward
    is as deep as its deepest layer, so one exact layer deep down costs nearly a whole exact pass.  Steepest descent
    from all exact and from the four best structured starts (Î₁ with one sample count everywhere, or everywhere but
    the seedless output layer, or above / below a split layer with exact on the other side); a step is the best of
    every single-layer change and every common sample count of the Î₁ layers (all of them, or those at the largest
    ``N``), all candidate plans scored at once (numpy).  Empty layers stay exact (no cost, no error)."""  # fmt: skip
    n_units, k = len(stats), max_samples
    if n_units == 0:
        return [], 0.0
    sc = scorer if scorer is not None else _PlanScorer(stats, costs, max_samples)
    need, uc, score = sc.need, sc.uc, sc.score

    def uniform(n: int, exact_mask: np.ndarray) -> np.ndarray:
        return np.where(exact_mask | (need > k), 0, np.maximum(n, need))

    def moves(opts: np.ndarray) -> np.ndarray:
        single = np.repeat(opts[None, :], n_units * (k + 1), 0)
        single[np.arange(n_units * (k + 1)), np.repeat(np.arange(n_units), k + 1)] = np.tile(np.arange(k + 1), n_units)
        out = [single]
        n_max = opts.max()
        if n_max > 0:  # the Î₁ layers share one backward of N_max seeds: move their sample counts together
            ns = np.arange(1, k + 1)[:, None]
            out.append(np.where(opts[None, :] > 0, np.maximum(ns, need[None, :]), 0))
            out.append(np.where(opts[None, :] == n_max, np.maximum(ns, need[None, :]), opts[None, :]))
        return np.concatenate(out)

    none = np.zeros(n_units, dtype=bool)
    seedless = uc[:, 0] == 0.0
    starts = [uniform(n, none) for n in range(1, k + 1)] + [uniform(n, seedless) for n in range(1, k + 1)]
    n0 = 1 + int(np.argmin(score(np.stack(starts[:k]))))
    split = np.arange(n_units)
    for s in range(1, n_units):  # exact above layer s and Î₁ below, and the reverse
        starts += [uniform(n0, split >= s), uniform(n0, split < s)]
    starts = np.unique(np.stack(starts), axis=0)
    order = np.argsort(score(starts), kind="stable")[:4]
    best, best_j = None, math.inf
    steps = max_steps if max_steps is not None else 4 * n_units * (k + 1)
    visited: set[bytes] = set()  # a descent that reaches a plan an earlier one went through ends where it ended
    for start in [np.zeros(n_units, dtype=np.int64), *starts[order]]:
        opts = start.astype(np.int64)
        j = float(score(opts[None, :])[0])
        for _ in range(steps):
            if opts.tobytes() in visited:
                break
            visited.add(opts.tobytes())
            cand = moves(opts)
            js = score(cand)
            i = int(np.argmin(js))
            if not js[i] < j * (1 - 1e-12):
                break
            opts, j = cand[i], float(js[i])
        if j < best_j:
            best, best_j = opts, j
    return [int(o) for o in best], best_j


class _HutchMoments:
    """The moments of :class:`~fisher_optim.variance.FisherMoments` with Hutchinson's per-input variance,
    ``sum_m 2 (F_i(x_m)^2 - sum_a A_{m,ia}^4)`` (docs/fisher-math.md §13,
    :func:`~fisher_optim.variance.factor_moments`), in
    place of Î₁'s ``v1``, so :func:`_unit_stats` prices Hutchinson with the same formulas."""

    def __init__(self, mom, a4: dict[str, Tensor] | None = None, var: dict[str, Tensor] | None = None):
        self.fisher, self.fisher_sq, self.v2 = mom.fisher, mom.fisher_sq, None
        if var is not None:  # tracked online (summed over the inputs)
            self.v1 = {n: var[n] if n in var else 2 * mom.fisher_sq[n] for n in mom.fisher}
        elif a4 is not None:
            self.v1 = {n: (mom.fisher_sq[n] - a4[n]).clamp_min(0).mul_(2) for n in mom.fisher}
        else:  # the bound: sum_a A^4 >= 0, so the variance is at most 2 F(x)^2 (relative error sqrt(2/N))
            self.v1 = {n: 2 * mom.fisher_sq[n] for n in mom.fisher}


def _decide(
    units, mom, m, costs: Costs, hp, phi, target_rse, max_samples, out_unit, current=None, a4=None,
    h_source: str | None = None, h_var=None,
) -> tuple[dict[str, Choice], list[int], list[int] | None, str]:
    """Per-parameter :class:`Choice` of the joint plan (see :func:`joint_plan`), with the reasons, the plan's options
    and those of ``current`` (``None`` if not given or not a plan of exact/Î₁ over these layers).  ``current`` (a
    plan ``name -> (estimator, n)``) is kept when the new optimum does not beat it by the tie margin.

    With ``a4`` (per parameter ``sum_{m,a} A^4``, :func:`~fisher_optim.variance.factor_moments`) the sampled layers
    take Î₁ or Hutchinson, one estimator for the whole plan (they share one backward of ``N_max`` seeds, so the cost
    model is the same): the joint plan is searched with each estimator's per-input variance and the lower predicted
    error at equal time wins (ties within ``COST_TIE`` go to Î₁, the estimator the MLP defaults were tuned on)."""
    names_all = [n for u in units for n in u if n in mom.fisher]

    def stats_of(mm):
        sums = _tensor_sums(mm, names_all)
        return [
            _unit_stats(u, sums, sum(mom.fisher[n].numel() for n in u if n in mom.fisher), m, phi, target_rse,
                        mm.v2 is not None)
            for u in units
        ]  # fmt: skip

    def search(stats):
        feasible = list(stats)  # a layer whose label noise misses target_rse at max_samples can only be exact
        for i, st in enumerate(feasible):
            if st is not None and st.n_need > max_samples:
                feasible[i] = _UnitStats(st.names, st.a, st.l, max_samples + 1, st.f, st.v1, st.v2, st.a_mean,
                                         st.l_mean)  # fmt: skip
        scorer = _PlanScorer(feasible, costs, max_samples)
        opts, j = joint_plan(feasible, costs, max_samples, scorer=scorer)
        return feasible, scorer, opts, j

    stats = stats_of(mom)
    stats_mc1 = stats
    est = "mc1"
    feasible, scorer, opts, j = search(stats)
    other = ""
    source = "closed form"
    if h_source is not None:
        stats_h = stats_of(_HutchMoments(mom, a4, h_var))
        found_h = search(stats_h)
        if found_h[3] * (1.0 + COST_TIE) < j:
            other = (f"; Hutchinson over Î₁ (Hutchinson's variance: {h_source}): with Î₁ the plan's predicted "
                     f"error at equal time would be {math.sqrt(j / found_h[3]) if found_h[3] > 0 else math.inf:.3g}x")
            est, stats, source = "hutchinson", stats_h, h_source
            feasible, scorer, opts, j = found_h
        elif any(found_h[2]) and found_h[3] < math.inf and j > 0:
            ratio = math.sqrt(found_h[3] / j)
            other = f"; Î₁ over Hutchinson (Hutchinson's plan: predicted error at equal time {ratio:.3g}x)"
    lab = _LABEL[est]
    all_exact = [0] * len(units)
    j_ex = float(scorer.score(np.zeros((1, len(units)), dtype=np.int64))[0]) if units else 0.0
    if not j * (1.0 + COST_TIE) < j_ex:  # within the timing noise of exact: take the zero-variance estimator
        opts, j = all_exact, j_ex
    cur = None
    if current is not None:
        try:
            cur = [0 if current[u[0]][0] == "exact" else int(current[u[0]][1]) for u in units]
            if any(current[u[0]][0] not in ("exact", est) for u in units):
                cur = None
        except KeyError:
            cur = None
    kept = ""
    if cur is not None and all(o == 0 or (st is not None and o >= st.n_need) for o, st in zip(cur, feasible)):
        j_cur = float(scorer.score(np.asarray(cur, dtype=np.int64)[None, :])[0]) if units else 0.0
        if not j * (1.0 + COST_TIE) < j_cur:  # hysteresis: the plan in use is within the margin, keep it
            if cur != opts and j_cur > 0:
                kept = (
                    f"kept the plan in use (the new optimum's predicted error at equal time is "
                    f"{math.sqrt(j / j_cur):.3g}x its, within the {COST_TIE:.0%} margin); "
                )
            opts, j = cur, j_cur
    plan_cost = costs.unit_refresh_cost(opts)
    costs_pp = costs.per_param
    out: dict[str, Choice] = {}
    for i, (unit, st) in enumerate(zip(units, stats)):
        unit = [n for n in unit if n in mom.fisher]
        if st is None:
            for n in unit:
                out[n] = Choice("exact", 1, 0.0, 0.0, "empty parameter", 0.0, 0.0, 0.0)
            continue
        c_ex = sum(costs_pp.get(n, (0.0, 0.0))[0] for n in unit)
        c_1 = sum(costs_pp.get(n, (0.0, 0.0))[1] for n in unit)
        st1 = stats_mc1[i]
        rse1 = math.sqrt(st1.v1) / st1.f if st1.f > 0 else 0.0
        rse2 = math.sqrt(st.v2) / st.f if st.f > 0 and st.v2 == st.v2 else float("nan")
        # the best alternative for this layer with the others as chosen: how much worse the plan would be
        cand, js = scorer.alternatives(opts, i)
        alt_j, alt_o = (float(js.min()), int(cand[int(js.argmin())])) if len(cand) else (math.inf, None)
        if alt_j == math.inf:
            alt_o = None
        worse = math.sqrt(alt_j / j) if j > 0 and alt_j < math.inf else float("inf")
        alt_cost = costs.unit_refresh_cost(opts[:i] + [alt_o] + opts[i + 1 :]) if alt_o is not None else plan_cost
        if st.f <= 0:
            ch = Choice(est if opts[i] else "exact", max(1, opts[i]), 0.0, c_1 if opts[i] else c_ex,
                        "zero Fisher on this batch: the cheapest option in the joint plan", 0.0, 0.0, st.f)  # fmt: skip
        elif opts[i]:
            n = opts[i]
            reason = (
                f"{lab} with N={n} (rse target {target_rse:g} needs N>={st.n_need}): label noise L/N = "
                f"{st.l_mean / n / max(st.a_mean, 1e-300):.2g} x input noise; exact here would make a refresh "
                f"{alt_cost / plan_cost:.3g}x as costly and the plan's predicted error at equal time {worse:.3g}x"
            )
            if source != "closed form":
                reason += f" (Hutchinson's variance: {source})"
            ch = Choice(est, n, math.sqrt(phi * st.v1 / n) / st.f, n * c_1, reason, rse1, rse2, st.f, source)
        else:
            zero_res = hp is not None and all(n in hp.zero for n in unit)
            if zero_res and set(unit) <= out_unit:
                reason = "output layer: exact without seeds (Î₂ = exact here, d²h/dθ² = 0): zero variance"
            elif zero_res:
                reason = "Î₂ = exact here (d²h/dθ² = 0: piecewise-linear path): zero variance"
            else:
                reason = "exact: zero variance"
            if feasible[i].n_need > max_samples:
                reason += f"; {lab} would need N={st.n_need} > max_samples={max_samples}"
            elif alt_o is not None:
                reason += (
                    f"; {lab} (best N={alt_o}) would make a refresh {alt_cost / plan_cost:.3g}x as costly and the "
                    f"plan's predicted error at equal time {worse:.3g}x"
                )
            if opts == all_exact and j_ex > 0 and alt_o is not None and worse < 1.0:
                reason += f" (within the {COST_TIE:.0%} timing-noise margin: ties go to exact)"
            ch = Choice("exact", 1, 0.0, c_ex, reason, rse1, rse2, st.f)
        for n in unit:
            out[n] = ch
    return out, opts, cur, kept + _plan_summary(scorer, opts, costs, units, max_samples, lab) + other


def _plan_summary(
    scorer: _PlanScorer, opts: list[int], costs: Costs, units, max_samples: int, lab: str = "Î₁"
) -> str:
    """The chosen plan against exact everywhere and against the best uniform Î₁ plan (exact on the seedless output
    layer): predicted refresh cost and predicted error at equal time (``sqrt`` of the ratio of ``J``)."""
    n_units = len(opts)
    if n_units == 0:
        return "plan: 0 of 0 layers exact (no parameter used by the forward pass)"
    chosen = np.asarray(opts, dtype=np.int64)[None, :]
    exact = np.zeros((1, n_units), dtype=np.int64)
    seedless = scorer.uc[:, 0] == 0.0
    uniform = np.stack([np.where(seedless | (scorer.need > max_samples), 0, np.maximum(n, scorer.need))
                        for n in range(1, max_samples + 1)])  # fmt: skip
    j, j_ex, j_u = scorer.score(chosen)[0], scorer.score(exact)[0], scorer.score(uniform)
    best = int(np.argmin(j_u))

    def fmt(cost: float) -> str:
        return f"{1e3 * cost:.3g} ms" if costs.cost_model == "measured" else f"{cost:.3g} (flops units)"

    n_exact = sum(o == 0 for o in opts)
    ns = sorted({o for o in opts if o})
    text = (
        f"plan: {n_exact} of {n_units} layers exact"
        + (f", {n_units - n_exact} {lab} with N={'/'.join(map(str, ns))}" if ns else "")
        + f", predicted refresh {fmt(costs.unit_refresh_cost(opts))}"
    )
    alts = []
    for name, jj, plan in [("exact everywhere", j_ex, exact[0]),
                           (f"{lab} N={int(uniform[best].max())} on every layer with seeds", j_u[best], uniform[best])]:
        if (plan == chosen[0]).all() or (name.startswith(lab) and not (plan != 0).any()) or not jj < math.inf:
            continue
        ratio = f"{math.sqrt(j / jj):.3g}x" if jj > 0 else "inf x"
        alts.append(f"{name}: refresh {fmt(costs.unit_refresh_cost([int(o) for o in plan]))}, this plan's predicted "
                    f"error at equal time {ratio} its")  # fmt: skip
    return "; ".join([text, *alts])


def _check_select_args(target_rse, ema_decay, max_samples, cost_model) -> int:
    if not (isinstance(target_rse, (int, float)) and target_rse > 0):
        raise ValueError(f"Invalid target_rse: {target_rse}")
    if not (0.0 <= ema_decay < 1.0):
        raise ValueError(f"Invalid ema_decay: {ema_decay}")
    max_samples = check_n_samples(max_samples)
    if cost_model not in COST_MODELS:
        raise ValueError(f"Invalid cost_model: {cost_model!r}. Must be 'measured' or 'flops'")
    return max_samples


def select(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    generator: torch.Generator | None = None,
    target_rse: float = 0.1,
    ema_decay: float = 0.9,
    max_samples: int = 16,
    names=None,
    cost_model: str = "measured",
    with_v2: bool = False,
    costs: Costs | None = None,
    current: dict[str, tuple[str, int]] | None = None,
) -> dict[str, Choice]:
    r"""Choose ``(estimator, n_samples)`` per parameter tensor (see the module docstring).

    Args:
        target_rse: bound on the relative standard error of the running estimate.
        ema_decay: decay ``beta`` of the running estimate (``phi = (1-beta)/(1+beta)``).
        max_samples: largest ``N`` considered for Î₁.
        cost_model: ``"measured"`` (time whole-model passes on this batch) or ``"flops"``.
        with_v2: also compute Î₂'s variance for the report (``rse_mc2``; ``nan`` otherwise).
        costs: :class:`Costs` of an earlier :func:`run_selection` on a batch of the same shape and dtype, the
            same parameters and ``cost_model``: used instead of measuring (``ValueError`` if they do not match).
        current: the plan in use (``name -> (estimator, n_samples)``), kept unless the new optimum predicts an
            error at equal time lower by more than the tie margin ``COST_TIE`` (hysteresis: the choice does not
            flip on the noise of one batch's variances).
        generator: accepted for symmetry with :func:`estimate_plan` and never advanced: the choice needs no
            label draws (the timing pass uses a private, fixed generator), so a caller's label stream, and a
            resumed run, do not depend on when selections happen.

    :func:`run_selection` takes the same arguments and also returns the costs and the exact Fisher of the batch.

    Example:
        >>> import torch
        >>> from fisher_optim.selection import select
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3))
        >>> ch = select(net, torch.randn(32, 4), likelihood="categorical", cost_model="flops")
        >>> sorted(ch) == sorted(n for n, _ in net.named_parameters())
        True
    """
    return run_selection(
        model, inputs, likelihood=likelihood, output=output, generator=generator, target_rse=target_rse,
        ema_decay=ema_decay, max_samples=max_samples, names=names, cost_model=cost_model, with_v2=with_v2,
        costs=costs, current=current,
    ).choices  # fmt: skip


def run_selection(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    generator: torch.Generator | None = None,
    target_rse: float = 0.1,
    ema_decay: float = 0.9,
    max_samples: int = 16,
    names=None,
    cost_model: str = "measured",
    with_v2: bool = False,
    costs: Costs | None = None,
    current: dict[str, tuple[str, int]] | None = None,
    targets: Tensor | None = None,
    hutchinson: bool = True,
    closed_form_seeds: int = 4096,
    hutchinson_variance: dict[str, Tensor] | None = None,
) -> Selection:
    r""":func:`select`, returning its by-products too: a :class:`Selection` with the ``choices``, the ``costs``
    (measured now, or ``costs`` passed back) and ``fisher``, the exact diagonal Fisher
    :math:`\frac1M\sum_m F_{ii}(x_m)` of ``inputs`` that the variance pass computed (equal to
    ``diagonal_fisher(model, inputs, estimator="exact")`` up to rounding), whether the plan ``changed`` from
    ``current``, and the predicted refresh costs of the plan and of exact everywhere.  Draws no labels
    (``generator`` is never advanced).  ``targets`` (categorical) masks the positions whose target is
    ``ignore_index`` out of the moments, as in :func:`~fisher_optim.diagonal_fisher`.

    Example:
        >>> import torch
        >>> from fisher_optim import diagonal_fisher
        >>> from fisher_optim.selection import run_selection
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3)).double()
        >>> x = torch.randn(32, 4, dtype=torch.float64)
        >>> sel = run_selection(net, x, likelihood="categorical", cost_model="flops")
        >>> ref = diagonal_fisher(net, x, likelihood="categorical", estimator="exact")
        >>> all(torch.allclose(sel.fisher[n], ref[n]) for n in ref)
        True
        >>> again = run_selection(net, x, likelihood="categorical", cost_model="flops", costs=sel.costs)
        >>> def plan(s):
        ...     return {n: (c.estimator, c.n_samples) for n, c in s.choices.items()}
        >>> again.costs is sel.costs and plan(again) == plan(sel)
        True

    Sampled layers take Î₁ or (``hutchinson=True``) Hutchinson, whichever plan predicts the lower error at equal
    time.  Hutchinson's per-input variance is the closed form :math:`2(F^2-\sum_a A^4)` (one more backward with
    the exact pass's seeds) up to ``closed_form_seeds`` seeds per input (positions x classes); past it the bound
    :math:`2F(x)^2` (relative error :math:`\sqrt{2/N}`), or ``hutchinson_variance`` when given (per parameter,
    summed over the inputs: :class:`~fisher_optim.variance.OnlineVariance` of the estimator's own draws).  Each
    :class:`Choice` says which in ``source``.
    """
    max_samples = _check_select_args(target_rse, ema_decay, max_samples, cost_model)
    lik = get_likelihood(likelihood)
    phi = (1.0 - ema_decay) / (1.0 + ema_decay)
    with Probe(model, inputs, lik, names=names, output=output) as probe:
        x = probe.inputs
        if costs is not None and not costs.matches(x, probe.params, cost_model):
            raise ValueError(
                f"costs were measured for {costs.cost_model!r} costs, inputs {costs.input_shape} {costs.input_dtype} "
                f"and {len(costs.names)} parameters, not {cost_model!r}, {tuple(x.shape)} {x.dtype} and "
                f"{len(probe.params)} parameters: pass costs=None to measure them"
            )
        m = probe.h.shape[0]
        try:
            hp = hessian_plan(model, probe.params)
        except ValueError:
            hp = None
        # V2 is reported only when asked: mc2 costs the exact pass plus the residual, so it is never chosen
        lik = probe.lik
        mask = target_mask(probe, targets) if targets is not None and isinstance(lik, Categorical) else None
        mom = moments_from_probe(
            probe,
            with_v2=with_v2 and hp is not None and hp.route in ("chain", "zero"),
            with_fisher_sq=True,
            mask=mask,
        )
        units = [tuple(u) for u in _module_units(probe)]
        # Hutchinson's per-input variance needs sum_a A^4: one more backward with the exact pass's seeds
        # (closed form); past ``closed_form_seeds`` seeds per input (positions x classes) the variance tracked online
        # from Hutchinson's own draws (``hutchinson_variance``, summed over the inputs) or else the bound 2 F(x)^2
        a4, h_source = None, None
        if hutchinson_variance is not None:
            h_source = "online"
        elif hutchinson:
            seeds = math.prod(probe.h.shape[1:])
            h_source = "closed form" if seeds <= closed_form_seeds else "bound"
            a4 = factor_moments(probe, mask=mask)["a4"] if h_source == "closed form" else None
        if costs is None or tuple(costs.units) != tuple(units):  # new costs, or the layers used changed
            costs = _costs(probe, units, cost_model, warm_exact=True)  # the moments pass warmed the backward up
        unused = list(probe.unused)
        out_unit = set(probe.module_params(probe.output_index)) if probe.output_index is not None else set()
    out, opts, cur, summary = _decide(
        units, mom, m, costs, hp, phi, target_rse, max_samples, out_unit, current, a4=a4, h_source=h_source,
        h_var=hutchinson_variance,
    )
    for n in unused:
        out[n] = Choice("exact", 1, 0.0, 0.0, "unused by the forward pass: zero Fisher", 0.0, 0.0, 0.0)
    fisher = {n: (f / m).detach() for n, f in mom.fisher.items()}
    changed = cur is None or cur != opts
    if current is not None and not changed:  # the same layers, options and unused parameters as before
        changed = any((c.estimator, c.n_samples) != tuple(current.get(n, ("", 0))) for n, c in out.items())
    exact_cost = costs.unit_refresh_cost([0] * len(opts))
    return Selection(out, fisher, costs, changed, costs.unit_refresh_cost(opts), exact_cost, summary)
