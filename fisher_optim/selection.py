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
and :math:`L = \overline{E_x \tilde v_1}`, and a time budget buys :math:`1/(c + s)` refreshes (``s`` the forward
pass and per-call overhead, paid once per refresh), so Î₁ with ``N`` samples is chosen only if
:math:`(A + L/N)(N c_1 + s) < A (c_{exact} + s)`, with the best such ``N``.  The costs are those of whole-model
calls: a layer's seeds run a backward through every layer above it and the other layers ride on the same
backward, so :math:`c_{exact}` and :math:`c_1` are the costs of an exact and a one-sample pass over all the layers
(the output layer excepted, whose exact Fisher needs no seeds: its own costs).  Judging a layer by its share of
those passes instead (the previous rule) biased ``N`` low: the best ``N`` grows as :math:`\sqrt{L s / (A c_1)}`.
Candidates and their costs:

* ``exact``: ``C`` backward seeds (none for an output ``nn.Linear``), zero variance;
* ``mc1``: ``N`` sampled seeds, cost ``N`` times the one-sample cost;
* ``mc2``: costs the exact pass plus the Hessian residual (Î₂ = exact + residual here), so it never beats
  ``exact`` where the residual is nonzero; where the residual vanishes (last layer, piecewise-linear
  networks, spec §6a/§6g) Î₂ *is* the exact Fisher, which is what ``exact`` computes.

Costs within ``COST_TIE`` (25 %, the timing noise) of each other count as a tie, which goes to ``exact``
(zero variance).  Two cost models give the per-layer costs :math:`(c_{exact}, c_1)` and the shared part ``s``:

* ``"flops"`` (deterministic, for bit-reproducible runs): a layer's pass costs ``seeds x (size of every layer
  from the output down to it + its own size)`` (``C`` seeds for exact, one for Î₁; a ``torch.func``-route
  parameter crosses the whole model), ``s`` is the parameter count;
* ``"measured"``: whole-model timings on the current batch of the calls a refresh makes: one forward pass, one
  exact pass and a one-sample and a ``COST_PROBE_SAMPLES``-sample Î₁ pass over *all* layers.  The two Î₁ timings
  separate the marginal cost of a sample from the per-call overhead, which joins the forward pass in ``s``; the
  exact pass less that overhead and the per-sample cost are split over the layers in proportion to their
  ``"flops"`` costs.  Timing each layer apart (the previous model) took 8 backward passes per layer, over
  a minute on a ResNet-18; a backward pass through all layers costs about as much as one through the deepest.

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

import torch
from torch import Tensor, nn

from .engine import Probe, reduce_records
from .estimators import (
    _identity_sum,
    check_estimator,
    check_n_samples,
    exact_records,
    exact_reducer,
    square_sum,
    sum_of_squares,
)
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .likelihoods import Likelihood, get_likelihood
from .variance import moments_from_probe

__all__ = ["Choice", "Costs", "Selection", "select", "run_selection", "estimate_plan", "PLAN_ESTIMATORS"]

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
        done_out, done = probe.exact_output_layer(exact_names)  # the output layer needs no seeds
        out.update(done_out)
        exact_names -= done
    if exact_names:
        recs = exact_records(probe, exact_names)
        out.update(reduce_records(recs, exact_reducer(probe), 2, probe.params, exact_names))
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
                    return square_sum(x, n).div_(n)

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
    return {n: out[n] for n in probe.params if n in out}  # in the order of model.named_parameters()


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
COST_MODELS = ("measured", "flops")


@dataclass
class Costs:
    """Per-refresh costs used by :func:`run_selection`, reusable on later batches of the same shape.

    ``per_param`` maps each parameter name to ``(c_exact, c_one_sample)``: its share of the seconds of one exact
    pass and of one one-sample Î₁ pass (``"flops"``: relative units); ``shared`` is the part every estimator
    pays (the forward pass; ``"flops"``: the parameter count), split over the layers by size.  ``input_shape``,
    ``input_dtype`` and ``names`` (the parameters, sorted) say what the costs were measured for.
    """

    cost_model: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    names: tuple[str, ...]
    per_param: dict[str, tuple[float, float]]
    shared: float

    def matches(self, inputs: Tensor, names, cost_model: str) -> bool:
        """Whether these costs hold for ``inputs`` (shape and dtype), the parameters ``names`` and ``cost_model``."""
        return (
            self.cost_model == cost_model
            and self.input_shape == tuple(inputs.shape)
            and self.input_dtype == inputs.dtype
            and self.names == tuple(sorted(names))
        )


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


#: samples of the second one-sample-kind timing in the measured cost model (marginal cost per sample)
COST_PROBE_SAMPLES = 4


def _measured_costs(probe: Probe, units, warm_exact: bool = False) -> tuple[dict[str, tuple[float, float]], float]:
    """Per parameter (seconds of the exact pass, seconds per Î₁ sample) for its layer, and the per-call overhead.

    Three whole-model timings of the calls a refresh makes (:func:`plan_from_probe`): an exact pass, a one-sample
    and a ``COST_PROBE_SAMPLES``-sample Î₁ pass over every layer in ``units``.  Their difference gives the marginal
    cost of one sample; the rest of the one-sample call is per-call overhead (label draw, hooks, reductions' set-up),
    returned apart so that the caller adds it to the shared part (it is paid once per refresh, whatever the plan).
    The exact pass less that overhead, and the per-sample cost, are split over the parameters in proportion to
    :func:`_flops_costs` (see the module docstring).  The sampled passes get one untimed warm-up each, the exact pass
    too unless ``warm_exact`` (a batched-seed backward on this probe already ran: the first one pays a one-off vmap
    setup)."""
    names = [n for unit in units for n in unit]
    if not names:
        return {}, 0.0
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
    return per_param, overhead


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
        # the output layer's exact Fisher takes no seeds (Probe.exact_output_layer): one pass of its own size
        c_exact = float(sizes[i]) if i == probe.output_index else c * cost1
        for n in names:
            share = probe.params[n].numel() / max(1, sizes[i])
            out[n] = (c_exact * share, cost1 * share)
    return out


def _costs(probe: Probe, units, cost_model: str, warm_exact: bool) -> Costs:
    """Fresh :class:`Costs` for this probe's batch and parameters."""
    if cost_model == "measured":
        per_param, overhead = _measured_costs(probe, units, warm_exact=warm_exact)
        # the part of a refresh every estimator pays once: the forward pass and the per-call overhead
        with torch.enable_grad():
            shared = _time(lambda: probe.model(probe.inputs), repeats=2) + overhead
    else:
        per_param = _flops_costs(probe, units)
        shared = float(sum(p.numel() for p in probe.params.values()))
    x = probe.inputs
    return Costs(cost_model, tuple(x.shape), x.dtype, tuple(sorted(probe.params)), per_param, shared)


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
    costs: Costs | None = None,
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
        model, inputs, likelihood=likelihood, generator=generator, target_rse=target_rse, ema_decay=ema_decay,
        max_samples=max_samples, names=names, cost_model=cost_model, with_v2=with_v2, costs=costs,
    ).choices  # fmt: skip


def run_selection(
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
    costs: Costs | None = None,
) -> Selection:
    r""":func:`select`, returning its by-products too: a :class:`Selection` with the ``choices``, the ``costs``
    (measured now, or ``costs`` passed back) and ``fisher``, the exact diagonal Fisher
    :math:`\frac1M\sum_m F_{ii}(x_m)` of ``inputs`` that the variance pass computed (equal to
    ``diagonal_fisher(model, inputs, estimator="exact")`` up to rounding).  Draws no labels (``generator`` is
    never advanced).

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
    """
    max_samples = _check_select_args(target_rse, ema_decay, max_samples, cost_model)
    lik = get_likelihood(likelihood)
    phi = (1.0 - ema_decay) / (1.0 + ema_decay)
    with Probe(model, inputs, lik, names=names) as probe:
        if costs is not None and not costs.matches(inputs, probe.params, cost_model):
            raise ValueError(
                f"costs were measured for {costs.cost_model!r} costs, inputs {costs.input_shape} {costs.input_dtype} "
                f"and {len(costs.names)} parameters, not {cost_model!r}, {tuple(inputs.shape)} {inputs.dtype} and "
                f"{len(probe.params)} parameters: pass costs=None to measure them"
            )
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
        if costs is None:
            costs = _costs(probe, units, cost_model, warm_exact=True)  # the moments pass warmed the backward up
        unused = list(probe.unused)
        out_unit = set(probe._module_params(probe.output_index)) if probe.output_index is not None else set()
    costs_pp, shared = costs.per_param, costs.shared
    # whole-refresh costs: a layer's Î₁ samples (or exact seeds) run a backward through every layer above it, and the
    # forward pass and per-call overhead are paid once per refresh, so each layer is judged on the costs of the
    # whole-model calls; only the output layer's passes are its own (its exact Fisher needs no seeds at all)
    c1_all = sum(c for _, c in costs_pp.values())
    cex_all = sum(c for n, (c, _) in costs_pp.items() if n not in out_unit)
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
        is_out = bool(out_unit) and set(unit) <= out_unit
        v2 = mean(mom.v2) / m**2 if mom.v2 is not None else float("nan")
        c_ex = sum(costs_pp.get(n, (0.0, 0.0))[0] for n in unit)
        c_1 = sum(costs_pp.get(n, (0.0, 0.0))[1] for n in unit)
        zero_res = hp is not None and all(n in hp.zero for n in unit)
        if f <= 0:
            ch = Choice("mc1", 1, 0.0, c_1, "zero Fisher on this batch: cheapest estimator", 0.0, 0.0, f)
        else:
            rse1 = math.sqrt(v1) / f
            rse2 = math.sqrt(v2) / f if v2 == v2 else float("nan")
            n_need = max(1, math.ceil(phi * v1 / (target_rse * f) ** 2)) if v1 > 0 else 1
            # error per unit of time, input noise included: a refresh's error variance is (A + L/N)/M and a
            # budget buys 1/(refresh cost) refreshes; Î₁ must beat exact's A * (exact refresh cost)
            w_1 = c_1 if is_out else c1_all
            w_ex = c_ex if is_out else cex_all
            best_n, best_score = None, float("inf")
            for n in range(n_need, max_samples + 1):
                score = (a_in + l_lab / n) * (n * w_1 + shared)
                if score < best_score:
                    best_n, best_score = n, score
            exact_score = a_in * (w_ex + shared)
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
                        f"input noise at N={n_need}) outweighs its saving (a refresh "
                        f"{(w_ex + shared) / max(n_need * w_1 + shared, 1e-300):.2g}x cheaper)"
                    )
                else:
                    reason = "exact: no input noise measured on this batch to hide Î₁'s label noise"
                ch = Choice("exact", 1, 0.0, c_ex, reason, rse1, rse2, f)
        for n in unit:
            out[n] = ch
    for n in unused:
        out[n] = Choice("exact", 1, 0.0, 0.0, "unused by the forward pass: zero Fisher", 0.0, 0.0, 0.0)
    fisher = {n: (f / m).detach() for n, f in mom.fisher.items()}
    return Selection(out, fisher, costs)
