r"""Per-layer choice of estimator and sample count from the variances (closed form, online, or bounds).

:func:`select` chooses one *plan* for the whole model: for every layer (a module's weight and bias, which share one
backward pass; any other parameter on its own) the exact Fisher or, each layer with its own ``N``, Î₁, Hutchinson
or hutchinson_batch (:func:`~fisher_optim.decide.decide`; ties within ``COST_TIE`` go to the Î₁-only plan).

**What a plan costs.**  A refresh runs one forward pass (and a per-call overhead), ``s``, then one seeded backward
per group of layers: ``D`` seeds per input for the exact layers (``D = T*C`` for ``T`` positions of ``C`` classes,
``C`` otherwise; none for an output ``nn.Linear``, whose exact Fisher is a closed form) and, per sampled family,
``N_max`` seeds per input (hutchinson_batch: ``N_max`` ordinary backward passes).  Each backward is as deep as
the deepest layer of its group, and each layer adds its own reduction (:meth:`Costs.refresh_cost`).  So one exact
layer deep in the network costs nearly a whole exact pass, and the layers cannot be chosen one at a time.

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
  exact pass (past ``EXACT_TIMING_SEEDS`` seeds per input: two subsamples of its seeds, scaled by the seed count,
  :func:`~fisher_optim.costs.measured_costs`), one pass of each sampled family, and a one-sample and a
  ``COST_PROBE_SAMPLES``-sample Î₁ pass over *all* layers.  The two Î₁ timings
  separate the marginal cost of a sample from the per-call overhead, which joins the forward pass in ``s``; the
  ``"flops"`` model's per-layer costs are scaled so that it prices the exact and the one-sample plans at what was
  measured, and mixed plans from there.

Costs depend on the input shape and the layers, not on the parameter values: :func:`run_selection` returns them as
:class:`Costs` and accepts them back (``costs=``) to skip the timing on a batch of the same shape and dtype, as
:class:`~fisher_optim.optim.FisherAdam` does.  The selection's moments pass computes the exact Fisher
:math:`\sum_m F(x_m)` anyway (:func:`~fisher_optim.variance.moments_from_probe`); :func:`run_selection` returns it as
:attr:`Selection.fisher`, scaled as :func:`estimate_plan` (mean over the inputs), so the refresh that follows a
selection needs no estimation pass of its own.  Past ``closed_form_seeds`` seeds per input (default
:data:`CLOSED_FORM_SEEDS`) the closed-form moments would cost an exact pass: the statistics then come from a few
probes per input (:mod:`fisher_optim.draws`, docs/fisher-math.md §14), and :attr:`Selection.fisher` is their unbiased
mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import check_n_samples
from .batch import OutputSpec
from .costs import COST_MODELS, SAMPLED, Costs, build_costs, exact_seeds, module_units  # noqa: F401 (re-exported)
from .decide import COST_TIE, Choice, decide  # noqa: F401 (re-exported)
from .draws import SampledMoments, probe_draws
from .engine import Probe
from .estimators import ESTIMATORS as PLAN_ESTIMATORS  # noqa: F401 (re-exported)
from .estimators import estimate_plan, plan_from_probe  # noqa: F401 (re-exported)
from .hessian import plan as hessian_plan
from .likelihoods import Categorical, Likelihood, get_likelihood
from .plan_search import (  # noqa: F401 (re-exported)
    BatchMoments,
    HutchMoments,
    PlanScorer,
    UnitStats,
    decode,
    joint_plan,
    tensor_sums,
    unit_stats,
)
from .seeds import target_mask
from .variance import OnlineVariance, factor_moments, moments_from_probe

#: default ``closed_form_seeds`` of :func:`run_selection`: past this many seeds per input (positions x classes) the
#: closed-form moments, which cost an exact pass, give way to per-probe draws
CLOSED_FORM_SEEDS = 1024

__all__ = [
    "CLOSED_FORM_SEEDS", "Choice", "Costs", "Selection", "select", "run_selection", "estimate_plan", "PLAN_ESTIMATORS",
]

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
    closed_form_seeds: int = CLOSED_FORM_SEEDS,
    hutchinson_variance: dict[str, Tensor] | None = None,
    online: dict[str, OnlineVariance] | None = None,
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

    Each layer takes exact or, with its own ``N``, Î₁, or (``hutchinson=True``) Hutchinson or hutchinson_batch,
    whichever plan predicts the lower error at equal time (:func:`~fisher_optim.decide.decide`; ``mc2`` costs the
    exact pass plus the Hessian residual, so it never pays: where the residual vanishes Î₂ *is* exact).  The
    variances, by ``closed_form_seeds`` (the most seeds per input, positions x classes, that the closed form may
    take; every :class:`Choice` says which in ``source``):

    * up to it, the closed forms: Î₁'s :math:`\tilde v_1`, Hutchinson's :math:`2(F^2-\sum_a A^4)` and
      hutchinson_batch's :math:`2((\sum A^2)^2 - \sum A^4)/M^2` (one more backward with the exact pass's seeds);
      ``hutchinson_variance`` (per parameter, summed over the inputs) replaces Hutchinson's when given (``"online"``);
    * past it (a language model: ``T*C`` seeds per input, the cost of an exact pass), no exact pass at all:
      :func:`~fisher_optim.draws.probe_draws` runs ``DRAW_PROBES`` probes per input of Î₁ and of Hutchinson; the
      Fisher, the input noise and the per-probe variances come from them (§14).  The variances are pooled in
      ``online`` (``{"mc1": OnlineVariance, "hutchinson": OnlineVariance}``, updated here; the optimizer keeps them
      across selections; ``"online"``), hutchinson_batch's follows from Hutchinson's, the input noise and the
      draws' unbiased :math:`S^2` (:class:`~fisher_optim.plan_search.BatchMoments`, ``"online"``), and
      :attr:`Selection.fisher` is the draws' unbiased mean.  The probes come
      from ``generator`` (the only case where it is advanced).
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
        lik = probe.lik
        mask = target_mask(probe, targets) if targets is not None and isinstance(lik, Categorical) else None
        units = [tuple(u) for u in module_units(probe)]
        exact_d = exact_seeds(probe)  # past CLOSED_FORM_SEEDS exact is out of reach: rse targets cap at max_samples
        closed = exact_d <= closed_form_seeds
        if closed:
            fams, sources = _closed_form(probe, mask, with_v2 and hp is not None and hp.route in ("chain", "zero"),
                                         hutchinson, hutchinson_variance)  # fmt: skip
        else:
            fams, sources = _from_draws(probe, mask, generator, hutchinson, online)
        if costs is None or tuple(costs.units) != tuple(units):  # new costs, or the layers used changed
            costs = build_costs(probe, units, cost_model, warm_exact=closed)  # the moments pass warmed it up
        unused = list(probe.unused)
        out_unit = set(probe.module_params(probe.output_index)) if probe.output_index is not None else set()
    out, opts, cur, summary = decide(
        units, fams, sources, m, costs, hp, phi, target_rse, max_samples, out_unit, current,
        cap_need=exact_d > CLOSED_FORM_SEEDS,
    )
    for n in unused:
        out[n] = Choice("exact", 1, 0.0, 0.0, "unused by the forward pass: zero Fisher", 0.0, 0.0, 0.0)
    fisher = {n: (f / m).detach() for n, f in fams["mc1" if "mc1" in fams else next(iter(fams))].fisher.items()}
    changed = cur is None or cur != opts
    if current is not None and not changed:  # the same layers, options and unused parameters as before
        changed = any((c.estimator, c.n_samples) != tuple(current.get(n, ("", 0))) for n, c in out.items())
    plan = [decode(o, max_samples) for o in opts]
    return Selection(out, fisher, costs, changed, costs.unit_refresh_cost(plan),
                     costs.unit_refresh_cost([0] * len(opts)), summary)  # fmt: skip


def _closed_form(probe: Probe, mask, with_v2: bool, hutchinson: bool, h_var) -> tuple[dict, dict[str, str]]:
    """Per family the moments whose ``v1`` is its one-probe variance (sums over inputs), from the closed forms: one
    backward with unit seeds (:func:`~fisher_optim.variance.moments_from_probe`) and, for the Hutchinson families,
    one with the columns of the factor (:func:`~fisher_optim.variance.factor_moments`)."""
    mom = moments_from_probe(probe, with_v2=with_v2, with_fisher_sq=True, mask=mask)
    fams, sources = {"mc1": mom}, {"mc1": "closed form"}
    if hutchinson:
        a4 = factor_moments(probe, mask=mask)["a4"]
        fams["hutchinson"] = HutchMoments(mom, None if h_var is not None else a4, h_var)
        fams["hutchinson_batch"] = BatchMoments(mom, a4)
        sources["hutchinson"] = "online" if h_var is not None else "closed form"
        sources["hutchinson_batch"] = "closed form"
    return fams, sources


def _from_draws(probe: Probe, mask, generator, hutchinson: bool, online) -> tuple[dict, dict[str, str]]:
    """:func:`_closed_form`'s moments from :func:`~fisher_optim.draws.probe_draws` (no exact pass): the Fisher is
    the draws' mean, ``fisher_sq`` the product of two Hutchinson probes, each family's variance pooled in
    ``online`` (fresh trackers when ``None``), hutchinson_batch's from Hutchinson's (:class:`BatchMoments`)."""
    draws = probe_draws(probe, generator, mask=mask)
    trackers = online if online is not None else {}
    var = {}
    for fam in ("mc1", "hutchinson"):
        tr = trackers.setdefault(fam, OnlineVariance())
        tr.update(draws.per_probe[fam])
        var[fam] = tr.variance()
    fisher = draws.fisher()
    mom = SampledMoments(fisher, draws.pair, var["mc1"], draws.cross())
    fams, sources = {"mc1": mom}, {"mc1": "online"}
    if hutchinson:
        fams["hutchinson"] = HutchMoments(mom, var=var["hutchinson"])
        fams["hutchinson_batch"] = BatchMoments(mom, hutchinson_var=var["hutchinson"])
        sources["hutchinson"], sources["hutchinson_batch"] = "online", "online"
    return fams, sources
