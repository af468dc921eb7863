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

from .costs import SAMPLED, Costs

__all__ = [
    "BatchMoments", "HutchMoments", "PlanScorer", "UnitStats", "decode", "encode", "joint_plan", "tensor_sums",
    "unit_stats",
]


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
    cross = getattr(mom, "cross", None)  # draws: an unbiased sum_i F_i^2 (the square of one estimate is biased up)
    if cross is not None:
        cols.append(torch.stack([cross[n].sum() for n in names]))
    vals = torch.stack([torch.stack([t.double() for t in c]) for c in cols]).tolist()  # dtypes may differ
    out = {}
    for j, n in enumerate(names):
        row = [vals[i][j] for i in range(len(cols))]
        row[1] = row[1] ** 2
        if cross is not None:
            row[1] = min(row[1], max(row.pop(), 1e-3 * row[1]))
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


def _families(stats) -> dict[str, list]:
    """``{family: per-unit stats}`` in :data:`~fisher_optim.costs.SAMPLED` order (a bare list: Î₁'s)."""
    if isinstance(stats, dict):
        bad = [f for f in stats if f not in SAMPLED]
        if bad:
            raise ValueError(f"Invalid family: {bad[0]!r}")
        return {f: stats[f] for f in SAMPLED if f in stats}
    return {"mc1": list(stats)}


def decode(code: int, max_samples: int) -> tuple[str, int]:
    """``(estimator, N)`` of a plan option: ``0`` exact, ``f * max_samples + N`` the ``f``-th family of
    :data:`~fisher_optim.costs.SAMPLED` with ``N`` samples (so Î₁'s options are ``N`` itself)."""
    if code == 0:
        return "exact", 1
    return SAMPLED[(code - 1) // max_samples], (code - 1) % max_samples + 1


def encode(estimator: str, n: int, max_samples: int) -> int:
    """Inverse of :func:`decode`."""
    return 0 if estimator == "exact" else SAMPLED.index(estimator) * max_samples + int(n)


class PlanScorer:
    r"""``score(plans)`` is ``J = cost * (sum_t sqrt(a_t + l_t/N_t))^2`` of every row of ``plans`` (``(R, U)``
    options, :func:`decode`: ``0`` exact, ``f k + N`` family ``f`` with ``N`` samples; ``inf`` where an option is
    infeasible), ``cost`` as :meth:`Costs.unit_refresh_cost` (each family its own backward group).

    ``stats``: per-unit :class:`UnitStats` of Î₁ (a list), or ``{family: list}`` with each family's label/probe noise
    ``l_t`` and ``n_need`` (the input noise ``a_t`` is the same for all).  Before the running estimate's plateau a
    time budget ``T`` buys ``T / cost`` refreshes, so tensor ``t``'s expected relative error is about
    :math:`\sqrt{\mathrm{cost}\,(a_t + l_t/N_t)/(M T)}`: the mean over tensors at equal time is proportional to
    ``sqrt(J)``."""

    def __init__(self, stats, costs: Costs, max_samples: int):
        fams = _families(stats)
        n_units, k = len(next(iter(fams.values()))), max_samples
        self.k, self.n_fam = k, len(SAMPLED)
        table = np.full((n_units, 1 + self.n_fam * k), np.inf)  # sum_t sqrt(a_t + l_t/N) per layer and option
        need = np.full((self.n_fam, n_units), k + 1)
        for fam, fstats in fams.items():
            f = SAMPLED.index(fam)
            for u, st in enumerate(fstats):
                if st is None:
                    table[u, 0] = 0.0
                    continue
                a, lab = np.asarray(st.a, dtype=float), np.asarray(st.l, dtype=float)
                table[u, 0] = np.sqrt(a).sum()
                if st.n_need <= k:
                    ns = np.arange(st.n_need, k + 1, dtype=float)
                    err = np.sqrt(a[None, :] + lab[None, :] / ns[:, None]).sum(1)
                    table[u, f * k + st.n_need : (f + 1) * k + 1] = err
                    need[f, u] = st.n_need
        self.table, self.need_f, self.shared = table, need, costs.shared
        self.need = need.min(0)  # the smallest feasible N of any family (k + 1: exact only)
        self.uc = np.asarray(costs.unit_costs, dtype=float).reshape(n_units, 4)
        self.scale = np.asarray(costs.family_scale, dtype=float)
        self.rows = np.arange(n_units)[None, :]

    def score(self, plans: np.ndarray) -> np.ndarray:
        uc, k, ex = self.uc, self.k, plans == 0  # costs are >= 0, so masking by a product keeps the maxima
        err = self.table[self.rows, plans].sum(1)
        cost = self.shared + (ex * uc[:, 0]).max(1, initial=0.0) + ex @ uc[:, 1]
        fam = np.where(ex, -1, (plans - 1) // k)
        n = np.where(ex, 0, (plans - 1) % k + 1)
        for f in range(self.n_fam):
            nf = n * (fam == f)
            cost = cost + nf.max(1, initial=0) * ((nf > 0) * uc[:, 2]).max(1, initial=0.0) * self.scale[f]
            # one reduction over every layer of the family per distinct N (Costs.unit_refresh_cost)
            distinct = sum(v * (nf == v).any(1) for v in range(1, k + 1))
            cost = cost + distinct * ((nf > 0) @ uc[:, 3]) * self.scale[f]
        with np.errstate(invalid="ignore"):
            return np.where(err < np.inf, cost * err * err, np.inf)  # inf where an option is infeasible

    def options(self, i: int) -> np.ndarray:
        """Every feasible sampled option of layer ``i`` (all families)."""
        k = self.k
        return np.array([f * k + n for f in range(self.n_fam) for n in range(self.need_f[f, i], k + 1)], dtype=np.int64)

    def alternatives(self, opts: list[int], i: int) -> tuple[np.ndarray, np.ndarray]:
        """Every feasible option of layer ``i`` with the others as in ``opts`` (exact for a sampled layer, the
        sampled options for an exact one), and their ``J``."""
        cand = np.array([0], dtype=np.int64) if opts[i] else self.options(i)
        plans = np.repeat(np.asarray(opts, dtype=np.int64)[None, :], len(cand), 0)
        plans[:, i] = cand
        return cand, self.score(plans)


def joint_plan(
    stats, costs: Costs, max_samples: int, max_steps: int | None = None, scorer: PlanScorer | None = None,
) -> tuple[list[int], float]:
    r"""The plan (per unit an option of :func:`decode`: ``0`` = exact or family ``f`` with ``N >= n_need`` samples)
    minimising the predicted mean relative error at equal time,
    :math:`J = \mathrm{cost} \cdot (\sum_t \sqrt{a_t + l_t/N_t})^2` (:class:`PlanScorer`), and its ``J``.

    The layers are coupled: every layer's refresh rate is set by the whole plan's cost, and a group's backward
    is as deep as its deepest layer, so one exact layer deep down costs nearly a whole exact pass.  Steepest descent
    from all exact and from the four best structured starts (one family with one sample count everywhere, or
    everywhere but the seedless output layer, or above / below a split layer with exact on the other side); a step is
    the best of every single-layer change (any family, any ``N``), every common sample count of a family's layers
    (all of them, or those at its largest ``N``) and every switch of a family's layers to another family, all
    candidate plans scored at once (numpy).  Empty layers stay exact (no cost, no error)."""  # fmt: skip
    sc = scorer if scorer is not None else PlanScorer(stats, costs, max_samples)
    n_units, k, n_fam = sc.table.shape[0], max_samples, sc.n_fam
    if n_units == 0:
        return [], 0.0
    need, uc, score = sc.need_f, sc.uc, sc.score
    n_opt = 1 + n_fam * k

    def uniform(f: int, n: int, exact_mask: np.ndarray) -> np.ndarray:
        return np.where(exact_mask | (need[f] > k), 0, f * k + np.maximum(n, need[f]))

    def moves(opts: np.ndarray) -> np.ndarray:
        single = np.repeat(opts[None, :], n_units * n_opt, 0)
        single[np.arange(n_units * n_opt), np.repeat(np.arange(n_units), n_opt)] = np.tile(np.arange(n_opt), n_units)
        out = [single]
        fam = np.where(opts > 0, (opts - 1) // k, -1)
        n_of = np.where(opts > 0, (opts - 1) % k + 1, 0)
        ns = np.arange(1, k + 1)[:, None]

        def to(f: int, n: np.ndarray, where: np.ndarray) -> np.ndarray:  # family f with n >= need, where feasible
            n = np.maximum(n, need[f])
            return np.where(where & (n <= k), f * k + n, opts)

        for f in range(n_fam):
            on = fam == f
            if not on.any():
                continue
            # a family's layers share one backward of N_max seeds: move their sample counts together
            out.append(to(f, ns, on[None, :]))
            out.append(to(f, ns, (on & (n_of == n_of[on].max()))[None, :]))
            for g in range(n_fam):  # the family's layers switch to another family, sample counts kept
                if g != f:
                    out.append(to(g, n_of, on)[None, :])
        return np.concatenate(out)

    none = np.zeros(n_units, dtype=bool)
    seedless = uc[:, 0] == 0.0
    starts = [uniform(f, n, m) for f in range(n_fam) for m in (none, seedless) for n in range(1, k + 1)]
    best_start = starts[int(np.argmin(score(np.stack(starts))))]
    f0 = int((best_start.max() - 1) // k) if best_start.max() > 0 else 0
    n0 = int((best_start.max() - 1) % k + 1) if best_start.max() > 0 else 1
    split = np.arange(n_units)
    for s in range(1, n_units):  # exact above layer s and sampled below, and the reverse
        starts += [uniform(f0, n0, split >= s), uniform(f0, n0, split < s)]
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
        self.cross = getattr(mom, "cross", None)
        if var is not None:  # tracked online (summed over the inputs)
            self.v1 = {n: var[n] if n in var else 2 * mom.fisher_sq[n] for n in mom.fisher}
        elif a4 is not None:
            self.v1 = {n: (mom.fisher_sq[n] - a4[n]).clamp_min(0).mul_(2) for n in mom.fisher}
        else:  # the bound: sum_a A^4 >= 0, so the variance is at most 2 F(x)^2 (relative error sqrt(2/N))
            self.v1 = {n: 2 * mom.fisher_sq[n] for n in mom.fisher}


class BatchMoments:
    r"""The moments of :class:`~fisher_optim.variance.FisherMoments` with hutchinson_batch's variance in place of
    Î₁'s ``v1``, so :func:`unit_stats` prices it with the same formulas: one probe of the whole batch estimates the
    mean Fisher with :math:`\mathrm{Var} = 2((\sum_{m,a} A^2)^2 - \sum_{m,a} A^4)/M^2` per coordinate
    (docs/fisher-math.md §13), so ``v1`` holds :math:`2(S_i^2 - \sum_{m,a} A_{m,ia}^4)` with
    :math:`S_i = \sum_m F_i(x_m)` (``unit_stats`` divides by ``M^2`` as for a per-input variance summed over
    inputs).  Without ``a4``, from Hutchinson's per-input variance summed over inputs, ``hutchinson_var``
    :math:`= 2(\sum_m F_i(x_m)^2 - \sum_{m,a} A^4)` (tracked online from its draws): then
    :math:`2(S_i^2 - \sum_m F_i(x_m)^2) +` ``hutchinson_var``, every term unbiased (:math:`S_i^2` from ``cross``
    where the moments have it), clamped to :math:`[0, 2 S_i^2]`.  Without either, the bound :math:`2 S_i^2`
    (relative std at most :math:`\sqrt2`)."""

    def __init__(self, mom, a4: dict[str, Tensor] | None = None, hutchinson_var: dict[str, Tensor] | None = None):
        self.fisher, self.fisher_sq, self.v2 = mom.fisher, mom.fisher_sq, None
        self.cross = getattr(mom, "cross", None)
        if a4 is not None:
            self.v1 = {n: (mom.fisher[n].square() - a4[n]).clamp_min(0).mul_(2) for n in mom.fisher}
        elif hutchinson_var is not None:
            s2 = self.cross if self.cross is not None else {n: f.square() for n, f in mom.fisher.items()}
            self.v1 = {
                n: torch.minimum((2 * (s2[n] - mom.fisher_sq[n]) + hutchinson_var[n]).clamp_min(0), 2 * s2[n].abs())
                for n in mom.fisher
            }
        else:
            self.v1 = {n: 2 * mom.fisher[n].square() for n in mom.fisher}
