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
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_n_samples
from .batch import OutputSpec
from .costs import COST_MODELS, SAMPLED, Costs, build_costs, module_units  # noqa: F401 (re-exported)
from .engine import Probe
from .estimators import ESTIMATORS as PLAN_ESTIMATORS  # noqa: F401 (re-exported)
from .estimators import estimate_plan  # noqa: F401 (re-exported)
from .hessian import plan as hessian_plan
from .likelihoods import Categorical, Likelihood, get_likelihood
from .plan_search import HutchMoments, PlanScorer, UnitStats, joint_plan, tensor_sums, unit_stats
from .seeds import target_mask
from .variance import factor_moments, moments_from_probe

__all__ = ["Choice", "Costs", "Selection", "select", "run_selection", "estimate_plan", "PLAN_ESTIMATORS"]

#: relative cost difference treated as a tie (timing noise); ties go to the zero-variance exact estimator
COST_TIE = 0.25
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


# -- selection -------------------------------------------------------------------------------------
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
        sums = tensor_sums(mm, names_all)
        return [
            unit_stats(u, sums, sum(mom.fisher[n].numel() for n in u if n in mom.fisher), m, phi, target_rse,
                        mm.v2 is not None)
            for u in units
        ]  # fmt: skip

    def search(stats):
        feasible = list(stats)  # a layer whose label noise misses target_rse at max_samples can only be exact
        for i, st in enumerate(feasible):
            if st is not None and st.n_need > max_samples:
                feasible[i] = UnitStats(st.names, st.a, st.l, max_samples + 1, st.f, st.v1, st.v2, st.a_mean,
                                         st.l_mean)  # fmt: skip
        scorer = PlanScorer(feasible, costs, max_samples)
        opts, j = joint_plan(feasible, costs, max_samples, scorer=scorer)
        return feasible, scorer, opts, j

    stats = stats_of(mom)
    stats_mc1 = stats
    est = "mc1"
    feasible, scorer, opts, j = search(stats)
    other = ""
    source = "closed form"
    if h_source is not None:
        stats_h = stats_of(HutchMoments(mom, a4, h_var))
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
    scorer: PlanScorer, opts: list[int], costs: Costs, units, max_samples: int, lab: str = "Î₁"
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
        units = [tuple(u) for u in module_units(probe)]
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
            costs = build_costs(probe, units, cost_model, warm_exact=True)  # the moments pass warmed the backward up
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
