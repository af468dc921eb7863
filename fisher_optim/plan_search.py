r"""The joint plan search: per layer exact or a sampled estimator with ``N`` samples, chosen together.

A plan's score is its predicted refresh cost times the squared predicted relative error at equal time,
:math:`\mathrm{cost} \cdot (\sum_t \sqrt{a_t + l_t/N_t})^2` (docs/fisher-math.md §2.3 b), evaluated for many plans at
once with numpy (:class:`PlanScorer`); :func:`joint_plan` searches from uniform starts by single-layer moves.
The per-layer noise statistics come from the closed-form moments (:func:`unit_stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .costs import Costs

__all__ = ["HutchMoments", "PlanScorer", "UnitStats", "joint_plan", "tensor_sums", "unit_stats"]


@dataclass
class UnitStats:
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


def tensor_sums(mom, names: list[str]) -> dict[str, list[float]]:
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


def unit_stats(unit, sums: dict, numel: int, m: int, phi: float, target_rse: float, has_v2: bool):
    """:class:`UnitStats` of the layer ``unit`` (``None``: empty layer) from the per-tensor sums of the moments of
    an ``M``-input batch (:func:`tensor_sums`).

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
    return UnitStats(tuple(unit), a_t, l_t, n_need, f, v1, v2, a_mean, tot[3] / numel)


class PlanScorer:
    r"""``score(plans)`` is ``J = cost * (sum_t sqrt(a_t + l_t/N_t))^2`` of every row of ``plans`` (``(R, U)``
    options: ``0`` exact, ``N`` Î₁; ``inf`` where an option is infeasible), ``cost`` as :meth:`Costs.refresh_cost`.

    Before the running estimate's plateau a time budget ``T`` buys ``T / cost`` refreshes, so tensor ``t``'s expected
    relative error is about :math:`\sqrt{\mathrm{cost}\,(a_t + l_t/N_t)/(M T)}`: the mean over tensors at equal time
    is proportional to ``sqrt(J)``."""

    def __init__(self, stats: list[UnitStats | None], costs: Costs, max_samples: int):
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
    stats: list[UnitStats | None], costs: Costs, max_samples: int, max_steps: int | None = None,
    scorer: PlanScorer | None = None,
) -> tuple[list[int], float]:
    r"""The plan (per unit ``0`` = exact or ``N`` = Î₁ with ``N`` samples, ``N >= n_need``) minimising the predicted
    mean relative error at equal time, :math:`J = \mathrm{cost} \cdot (\sum_t \sqrt{a_t + l_t/N_t})^2`
    (:class:`PlanScorer`), and its ``J``.

    The layers are coupled: every layer's refresh rate is set by the whole plan's cost, and a group's backward
    is as deep as its deepest layer, so one exact layer deep down costs nearly a whole exact pass.  Steepest descent
    from all exact and from the four best structured starts (Î₁ with one sample count everywhere, or everywhere but
    the seedless output layer, or above / below a split layer with exact on the other side); a step is the best of
    every single-layer change and every common sample count of the Î₁ layers (all of them, or those at the largest
    ``N``), all candidate plans scored at once (numpy).  Empty layers stay exact (no cost, no error)."""  # fmt: skip
    n_units, k = len(stats), max_samples
    if n_units == 0:
        return [], 0.0
    sc = scorer if scorer is not None else PlanScorer(stats, costs, max_samples)
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


class HutchMoments:
    """The moments of :class:`~fisher_optim.variance.FisherMoments` with Hutchinson's per-input variance,
    ``sum_m 2 (F_i(x_m)^2 - sum_a A_{m,ia}^4)`` (docs/fisher-math.md §13,
    :func:`~fisher_optim.variance.factor_moments`), in
    place of Î₁'s ``v1``, so :func:`unit_stats` prices Hutchinson with the same formulas."""

    def __init__(self, mom, a4: dict[str, Tensor] | None = None, var: dict[str, Tensor] | None = None):
        self.fisher, self.fisher_sq, self.v2 = mom.fisher, mom.fisher_sq, None
        if var is not None:  # tracked online (summed over the inputs)
            self.v1 = {n: var[n] if n in var else 2 * mom.fisher_sq[n] for n in mom.fisher}
        elif a4 is not None:
            self.v1 = {n: (mom.fisher_sq[n] - a4[n]).clamp_min(0).mul_(2) for n in mom.fisher}
        else:  # the bound: sum_a A^4 >= 0, so the variance is at most 2 F(x)^2 (relative error sqrt(2/N))
            self.v1 = {n: 2 * mom.fisher_sq[n] for n in mom.fisher}
