r"""What a refresh costs: measured (timings of the very calls a refresh makes) or in parameter-count units.

:class:`Costs` prices a mixed plan (:meth:`Costs.refresh_cost`) from per-layer backward and reduction costs; it is
measured once per input shape and reused by the optimizers' schedule (:mod:`fisher_optim.schedule`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .engine import Probe, reduce_records
from .estimators import plan_from_probe
from .seeds import sum_of_squares

__all__ = [
    "Costs",
    "COST_MODELS",
    "COST_PROBE_SAMPLES",
    "COST_PROBE_SAMPLES_LONG",
    "EXACT_TIMING_SEEDS",
    "exact_seeds",
    "family_scales",
    "SAMPLED",
    "build_costs",
    "flops_costs",
    "measured_costs",
    "module_units",
    "unit_flops",
]

#: the sampled estimators a plan may give a layer besides exact: Î₁ and Hutchinson (one seeded backward of ``N``
#: seeds per input per group, per-input squares) and hutchinson_batch (``N`` ordinary backward passes of one seed for
#: the whole batch); each family runs its own group's backward, priced alike (:meth:`Costs.unit_refresh_cost`)
SAMPLED = ("mc1", "hutchinson", "hutchinson_batch")


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
    #: per sampled family, the factor on ``(b_1, r_1)`` (measured: its one-probe pass over Î₁'s; flops: 1)
    family_scale: tuple[float, ...] = (1.0, 1.0, 1.0)

    def matches(self, inputs: Tensor, names, cost_model: str) -> bool:
        """Whether these costs hold for ``inputs`` (shape and dtype), the parameters ``names`` and ``cost_model``."""
        return (
            self.cost_model == cost_model
            and self.input_shape == tuple(inputs.shape)
            and self.input_dtype == inputs.dtype
            and self.names == tuple(sorted(names))
        )

    def unit_refresh_cost(self, options: list) -> float:
        """:meth:`refresh_cost` of a plan given per unit (in ``units`` order): ``0`` for exact, ``N`` for Î₁ with
        ``N`` samples, or ``(estimator, N)`` for any estimator of :data:`SAMPLED` (or ``("exact", 1)``).

        Each group (exact; each sampled family) runs one backward as deep as its deepest layer, with as many seeds
        as its largest ``N`` (exact: the seeds of :func:`unit_flops`, priced in ``b_ex``), plus reductions: ``r_ex``
        per exact layer and, per family, for each distinct ``N`` among its layers, ``N r_1`` over *every* layer of
        the family (the mixed-plan estimation, :func:`~fisher_optim.estimators.plan_from_probe`, reduces the family's
        records once per distinct ``N``: a plan with one ``N`` per family is the cheapest to reduce)."""
        b_ex = r_ex = 0.0
        fam_b = [0.0] * len(SAMPLED)
        fam_n = [0] * len(SAMPLED)
        fam_r = [0.0] * len(SAMPLED)
        fam_ns: list[set[int]] = [set() for _ in SAMPLED]
        for opt, (bex, rex, b1, r1) in zip(options, self.unit_costs):
            est, n = ("exact", 1) if opt == 0 else ("mc1", int(opt)) if isinstance(opt, (int, np.integer)) else opt
            if est == "exact":
                b_ex = max(b_ex, bex)
                r_ex += rex
                continue
            f = SAMPLED.index(est)
            fam_n[f] = max(fam_n[f], int(n))
            fam_b[f] = max(fam_b[f], b1 * self.family_scale[f])
            fam_r[f] += r1 * self.family_scale[f]
            fam_ns[f].add(int(n))
        # per distinct N of a family, one reduction of its first N seeds over every layer of the family's backward
        r_1 = sum(sum(ns) * r for ns, r in zip(fam_ns, fam_r))
        return self.shared + b_ex + r_ex + sum(n * b for n, b in zip(fam_n, fam_b)) + r_1

    def refresh_cost(self, plan: dict[str, tuple[str, int]]) -> float:
        """Predicted seconds of one refresh with ``plan`` (``name -> (estimator, n_samples)``, estimators ``exact``
        or one of :data:`SAMPLED`; a layer takes the estimator of its first listed parameter, exact if absent)."""
        options = []
        for unit in self.units:
            est, n = plan.get(unit[0], ("exact", 1))
            if est not in ("exact",) + SAMPLED:
                raise ValueError(f"Invalid estimator: {est!r} (refresh_cost models 'exact' and {SAMPLED})")
            options.append((est, int(n)))
        return self.unit_refresh_cost(options)


def module_units(probe: Probe) -> list[list[str]]:
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
#: ... past ``EXACT_TIMING_SEEDS`` seeds per input, where exact is out of reach and plans take many samples: on a CPU
#: a sample costs more in a large batch than the marginal cost of four suggests (the LM: a 16-sample pass cost 3x an
#: 8-sample one), so the marginal cost is measured up to this many samples
COST_PROBE_SAMPLES_LONG = 16
#: exact seeds per input (positions x classes) past which the measured model times a subsample of the exact pass
EXACT_TIMING_SEEDS = 1024
#: seeds per input of the smaller of the two subsample timings (the larger has twice as many).  Past
#: ``EXACT_TIMING_SEEDS`` exact costs hundreds of sampled refreshes, so a rough price decides as well as a fine one,
#: and on a layer without a ``vmap`` rule (an LSTM: a loop over inputs and seeds) every timed seed is dear
EXACT_SUBSAMPLE = 8


def exact_seeds(probe: Probe) -> int:
    """Seeds per input of an exact pass below the output layer: one per output coordinate, ``D = T*C`` for a
    sequence of ``T`` positions with ``C`` classes (the flattened natural parameters), ``C`` otherwise."""
    return int(probe.h.shape[1])


def _time_exact(probe: Probe, names: list[str], gen: torch.Generator, warm: bool) -> float:
    """Seconds of the exact pass over ``names``: the whole pass (:func:`plan_from_probe`) when it has at most
    :data:`EXACT_TIMING_SEEDS` seeds per input, else extrapolated from two seeded backward passes of ``k`` and
    ``2k`` random seeds (``k = EXACT_SUBSAMPLE``) with the exact pass's reduction: the second timing plus
    ``D - 2k`` times the larger of the marginal and the average cost of a seed (``D``: :func:`exact_seeds`), plus
    the seedless output layer's closed
    form.  The exact pass on a language model (``T*C`` seeds per input) takes seconds; this takes milliseconds."""
    d = exact_seeds(probe)
    if d <= EXACT_TIMING_SEEDS:
        plan = {n: ("exact", 1) for n in names}
        if not warm:
            plan_from_probe(probe, plan, generator=gen.manual_seed(0))
        return _time(lambda: plan_from_probe(probe, plan, generator=gen.manual_seed(0)))
    _, done = probe.exact_output_layer(names)
    rest = [n for n in names if n not in done]
    k = EXACT_SUBSAMPLE
    h = probe.h.detach()
    seeds = torch.randn((2 * k, *h.shape), generator=gen.manual_seed(0), dtype=h.dtype, device=h.device)

    def run(s):
        if rest:
            reduce_records(probe.seeded(s, names=rest), sum_of_squares(), 2, probe.params, rest)
        probe.exact_output_layer(names)

    run(seeds[:k])
    t_a = _time(lambda: run(seeds[:k]))
    t_b = _time(lambda: run(seeds))
    # per seed: the larger of the marginal and the average cost (on a CPU a seed costs more in a large batch of
    # seeds than the marginal cost of a small one suggests; the average includes the per-call overhead)
    per_seed = max((t_b - t_a) / k, t_b / (2 * k))
    return t_b + (d - 2 * k) * per_seed


def measured_costs(
    probe: Probe, units, warm_exact: bool = False
) -> tuple[dict[str, tuple[float, float]], float, tuple[float, float]]:
    """Per parameter (seconds of the exact pass, seconds per Î₁ sample) for its layer, the per-call overhead, and the
    seconds per flops unit of the exact and of the one-sample pass (scales of :func:`unit_flops`).

    Three whole-model timings of the calls a refresh makes (:func:`plan_from_probe`): an exact pass (past
    :data:`EXACT_TIMING_SEEDS` seeds per input, a subsample of its seeds scaled by the seed count,
    :func:`_time_exact`), a one-sample and a ``COST_PROBE_SAMPLES``-sample Î₁ pass over every layer in ``units``
    (``COST_PROBE_SAMPLES_LONG`` past ``EXACT_TIMING_SEEDS``).
    Their difference gives the marginal
    cost of one sample; the rest of the one-sample call is per-call overhead (label draw, hooks, reductions' set-up),
    returned apart so that the caller adds it to the shared part (it is paid once per refresh, whatever the plan).
    The exact pass less that overhead, and the per-sample cost, are split over the parameters in proportion to
    :func:`flops_costs` (see the module docstring).  The sampled passes get one untimed warm-up each, the exact pass
    too unless ``warm_exact`` (a batched-seed backward on this probe already ran: the first one pays a one-off vmap
    setup).  The scales make :func:`unit_flops`'s whole-plan costs of the exact and of the one-sample pass equal the
    measured ones, so :meth:`Costs.refresh_cost` prices a mixed plan from the same three timings."""
    names = [n for unit in units for n in unit]
    if not names:
        return {}, 0.0, (0.0, 0.0)
    gen = torch.Generator(device=probe.h.device)  # private: the caller's label stream is never advanced
    one_plan = {n: ("mc1", 1) for n in names}
    k_many = COST_PROBE_SAMPLES if exact_seeds(probe) <= EXACT_TIMING_SEEDS else COST_PROBE_SAMPLES_LONG
    many_plan = {n: ("mc1", k_many) for n in names}

    def run(plan):  # the very calls a refresh makes (plan_from_probe), output-layer shortcut included
        plan_from_probe(probe, plan, generator=gen.manual_seed(0))

    run(one_plan)
    run(many_plan)
    t_ex = _time_exact(probe, names, gen, warm_exact)
    t_1 = _time(lambda: run(one_plan))
    t_many = _time(lambda: run(many_plan))
    per_sample = max((t_many - t_1) / (k_many - 1), 0.05 * t_1)  # timing noise can make it <= 0
    overhead = max(t_1 - per_sample, 0.0)
    exact_work = max(t_ex - overhead, per_sample)
    flops = flops_costs(probe, units)
    tot_ex = sum(c for c, _ in flops.values()) or 1.0
    tot_1 = sum(c for _, c in flops.values()) or 1.0
    per_param = {n: (exact_work * c_ex / tot_ex, per_sample * c_1 / tot_1) for n, (c_ex, c_1) in flops.items()}
    uf = unit_flops(probe, units)
    plan_ex = max(c[0] for c in uf) + sum(c[1] for c in uf)
    plan_1 = max(c[2] for c in uf) + sum(c[3] for c in uf)
    return per_param, overhead, (exact_work / max(plan_ex, 1e-300), per_sample / max(plan_1, 1e-300))


def family_scales(probe: Probe, units) -> tuple[float, ...]:
    """Seconds of a one-probe pass of each :data:`SAMPLED` family over every layer in ``units`` over Î₁'s (both timed
    here, best of two after a warm-up): Hutchinson builds its seeds from the per-position factor, hutchinson_batch
    runs one ordinary backward for the whole batch."""
    names = [n for unit in units for n in unit]
    gen = torch.Generator(device=probe.h.device)
    times = []
    for est in SAMPLED:
        plan = {n: (est, 1) for n in names}
        plan_from_probe(probe, plan, generator=gen.manual_seed(0))
        times.append(_time(lambda plan=plan: plan_from_probe(probe, plan, generator=gen.manual_seed(0)), repeats=2))
    return tuple(t / times[0] if times[0] > 0 else 1.0 for t in times)


def flops_costs(probe: Probe, units) -> dict[str, tuple[float, float]]:
    """Deterministic per-parameter costs ``(c_exact, c_one_sample)`` (for reports and the measured model's split): the
    layer's exact or one-sample pass on its own, ``b + r`` of :func:`unit_flops`, shared by size within the layer."""
    out = {}
    for names, (b_ex, r_ex, b_1, r_1) in zip(units, unit_flops(probe, units)):
        size = sum(probe.params[n].numel() for n in names)
        for n in names:
            share = probe.params[n].numel() / max(1, size)
            out[n] = ((b_ex + r_ex) * share, (b_1 + r_1) * share)
    return out


def unit_flops(probe: Probe, units) -> list[tuple[float, float, float, float]]:
    """Per layer ``(b_ex, r_ex, b_1, r_1)`` of :class:`Costs` in parameter-count units: a seed's backward down to
    and through layer ``u`` crosses every later layer (``b = sum of their sizes and its own``; a ``torch.func``-route
    parameter crosses the whole model, whatever its place: ``vmap`` of a ``vjp`` per seed) and its reduction costs the
    layer's size; exact takes :func:`exact_seeds` seeds per input (``T*C`` for ``T`` positions of ``C`` classes, ``C``
    otherwise), none on the output layer (its reduction only, :meth:`~fisher_optim.engine.Probe.exact_output_layer`).
    The one-sample costs ``b_1, r_1`` are those of one seed per input."""
    c = exact_seeds(probe)
    sizes = [sum(probe.params[n].numel() for n in names) for names in units]
    out = []
    for i, size in enumerate(sizes):
        back = float(sum(sizes[i:]) if i < len(probe.fast) else sum(sizes))
        if i == probe.output_index:
            out.append((0.0, float(size), back, float(size)))
        else:
            out.append((c * back, c * float(size), back, float(size)))
    return out


def build_costs(probe: Probe, units, cost_model: str, warm_exact: bool) -> Costs:
    """Fresh :class:`Costs` for this probe's batch and parameters."""
    uf = unit_flops(probe, units)
    if cost_model == "measured":
        per_param, overhead, (k_ex, k_1) = measured_costs(probe, units, warm_exact=warm_exact)
        # the part of a refresh every estimator pays once: the forward pass and the per-call overhead
        with torch.enable_grad():
            shared = _time(lambda: probe.outputs_of(probe.batch), repeats=2) + overhead
        uf = [(k_ex * bex, k_ex * rex, k_1 * b1, k_1 * r1) for bex, rex, b1, r1 in uf]
        scales = family_scales(probe, units)
    else:
        per_param = flops_costs(probe, units)
        shared = float(sum(p.numel() for p in probe.params.values()))
        scales = (1.0,) * len(SAMPLED)
    x = probe.inputs
    return Costs(
        cost_model, tuple(x.shape), x.dtype, tuple(sorted(probe.params)), per_param, shared,
        tuple(tuple(u) for u in units), tuple(uf), scales,
    )  # fmt: skip


