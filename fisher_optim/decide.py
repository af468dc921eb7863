r"""The per-layer decision of auto mode: the joint plan over exact and every sampled family, its choices and reasons.

:func:`decide` takes per sampled family (Î₁, Hutchinson, hutchinson_batch; :data:`~fisher_optim.costs.SAMPLED`)
moments of the batch whose ``v1`` is that family's one-probe variance of the sum over inputs (the closed form,
tracked online, or a bound), and the source of each; it runs :func:`~fisher_optim.plan_search.joint_plan` over the
per-layer options (each layer its own family and ``N``), applies the tie rule and the hysteresis, and writes one
:class:`Choice` per parameter with the estimator, ``N``, the predicted error, the variance's source and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .costs import SAMPLED, Costs
from .plan_search import PlanScorer, decode, encode, joint_plan, tensor_sums, unit_stats

__all__ = ["COST_TIE", "LABEL", "Choice", "decide", "plan_summary"]

#: relative cost difference treated as a tie (timing noise); ties go to the zero-variance exact estimator
COST_TIE = 0.25
#: labels of the sampled estimators in reasons
LABEL = {"mc1": "Î₁", "hutchinson": "Hutchinson", "hutchinson_batch": "hutchinson_batch"}


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


def _current_codes(current, units, k: int) -> list[int] | None:
    try:
        ests = [current[u[0]] for u in units]
    except (KeyError, TypeError):
        return None
    if any(e not in ("exact",) + SAMPLED or (e != "exact" and not 1 <= int(n) <= k) for e, n in ests):
        return None
    return [encode(e, n, k) for e, n in ests]


def decide(
    units, fams: dict, sources: dict[str, str], m: int, costs: Costs, hp, phi: float, target_rse: float,
    max_samples: int, out_unit: set, current=None, cap_need: bool = False,
) -> tuple[dict[str, Choice], list[int], list[int] | None, str]:
    """Per-parameter :class:`Choice` of the joint plan, the plan's options (:func:`~fisher_optim.plan_search.decode`)
    and those of ``current`` (``None`` if not given or not a plan over these layers), and the summary line.

    ``fams``: ``{family: moments}`` (each with ``fisher``, ``fisher_sq``, ``v1``, ``v2``; sums over the ``M``
    inputs) for the families that may be chosen; ``sources``: where each family's ``v1`` came from.  A plan
    within ``COST_TIE`` of exact everywhere gives way to it, and ``current`` is kept unless the new optimum beats
    it by that margin (no flip-flopping on the noise of one batch).  ``cap_need`` (exact out of reach: more seeds
    per input than the closed form may take): a sampled family whose ``N`` would have to exceed ``max_samples``
    to meet ``target_rse`` stays a candidate with ``max_samples`` (the reason says so) instead of forcing exact."""
    k = max_samples
    first = next(iter(fams.values()))
    names_all = [n for u in units for n in u if n in first.fisher]
    numel = [sum(first.fisher[n].numel() for n in u if n in first.fisher) for u in units]

    def stats_of(mm):
        sums = tensor_sums(mm, names_all)
        return [unit_stats(u, sums, ne, m, phi, target_rse, mm.v2 is not None) for u, ne in zip(units, numel)]

    stats = {f: stats_of(mm) for f, mm in fams.items()}
    wanted = {}  # capped layers: the N the rse target would need
    if cap_need:  # exact is out of reach: a layer that misses the target with max_samples takes the most it can
        for f, fstats in stats.items():
            for i, st in enumerate(fstats):
                if st is not None and st.n_need > k:
                    wanted[(f, i)] = st.n_need
                    fstats[i] = replace(st, n_need=k)
    scorer = PlanScorer(stats, costs, k)
    opts, j = joint_plan(stats, costs, k, scorer=scorer)
    pref = ""
    if "mc1" in stats and len(stats) > 1 and any(o and decode(o, k)[0] != "mc1" for o in opts):
        # ties (within the timing-noise margin) go to the Î₁-only plan, the one the MLP defaults were tuned on
        opts_1, j_1 = joint_plan({"mc1": stats["mc1"]}, costs, k)
        if not j * (1.0 + COST_TIE) < j_1:
            pref = f"; Î₁ only: the mixed plan's predicted error at equal time would be {math.sqrt(j / j_1):.3g}x"
            opts, j = opts_1, j_1
    all_exact = [0] * len(units)
    j_ex = float(scorer.score(np.zeros((1, len(units)), dtype=np.int64))[0]) if units else 0.0
    if not j * (1.0 + COST_TIE) < j_ex:  # within the timing noise of exact: take the zero-variance estimator
        opts, j = all_exact, j_ex
    cur = _current_codes(current, units, k) if current is not None else None
    kept = ""
    if cur is not None and units:
        j_cur = float(scorer.score(np.asarray(cur, dtype=np.int64)[None, :])[0])
        if j_cur < math.inf and not j * (1.0 + COST_TIE) < j_cur:  # hysteresis: keep the plan in use
            if cur != opts and j_cur > 0:
                kept = (
                    f"kept the plan in use (the new optimum's predicted error at equal time is "
                    f"{math.sqrt(j / j_cur):.3g}x its, within the {COST_TIE:.0%} margin); "
                )
            opts, j = cur, j_cur
    plan_cost = costs.unit_refresh_cost([decode(o, k) for o in opts])
    costs_pp = costs.per_param
    mc1 = stats.get("mc1")
    out: dict[str, Choice] = {}
    for i, unit in enumerate(units):
        unit = [n for n in unit if n in first.fisher]
        est, n = decode(opts[i], k)
        st = stats[est][i] if est != "exact" else next(s[i] for s in stats.values())
        if st is None:
            for p in unit:
                out[p] = Choice("exact", 1, 0.0, 0.0, "empty parameter", 0.0, 0.0, 0.0)
            continue
        c_ex = sum(costs_pp.get(p, (0.0, 0.0))[0] for p in unit)
        c_1 = sum(costs_pp.get(p, (0.0, 0.0))[1] for p in unit)
        st1 = mc1[i] if mc1 is not None else None
        rse1 = math.sqrt(st1.v1) / st1.f if st1 is not None and st1.f > 0 else float("nan")
        rse2 = math.sqrt(st.v2) / st.f if st.f > 0 and st.v2 == st.v2 else float("nan")
        cand, js = scorer.alternatives(opts, i)  # exact for a sampled layer, every sampled option for an exact one
        alt_j, alt_o = (float(js.min()), int(cand[int(js.argmin())])) if len(cand) else (math.inf, None)
        if alt_j == math.inf:
            alt_o = None
        worse = math.sqrt(alt_j / j) if j > 0 and alt_j < math.inf else float("inf")
        alt_cost = (costs.unit_refresh_cost([decode(o, k) for o in opts[:i] + [alt_o] + opts[i + 1 :]])
                    if alt_o is not None else plan_cost)  # fmt: skip
        if st.f <= 0:
            ch = Choice(est, n, 0.0, c_1 if opts[i] else c_ex,
                        "zero Fisher on this batch: the cheapest option in the joint plan", 0.0, 0.0, st.f,
                        sources.get(est, "closed form"))  # fmt: skip
        elif opts[i]:
            lab = LABEL[est]
            reason = (
                f"{lab} with N={n} (rse target {target_rse:g} needs N>={st.n_need}): label noise L/N = "
                + (f"{st.l_mean / n / st.a_mean:.2g} x input noise" if st.a_mean > 0 else "> 0, input noise ~0")
                + "; exact here would make a refresh "
                f"{alt_cost / plan_cost:.3g}x as costly and the plan's predicted error at equal time {worse:.3g}x"
            )
            if (est, i) in wanted:
                reason = reason.replace(f"needs N>={st.n_need})", f"needs N>={wanted[(est, i)]} > max_samples: missed)")
            reason += _other_family(scorer, opts, i, j, k)
            if sources[est] != "closed form":
                reason += f" ({lab}'s variance: {sources[est]})"
            ch = Choice(est, n, math.sqrt(phi * st.v1 / n) / st.f, n * c_1, reason, rse1, rse2, st.f, sources[est])
        else:
            zero_res = hp is not None and all(p in hp.zero for p in unit)
            if zero_res and set(unit) <= out_unit:
                reason = "output layer: exact without seeds (Î₂ = exact here, d²h/dθ² = 0): zero variance"
            elif zero_res:
                reason = "Î₂ = exact here (d²h/dθ² = 0: piecewise-linear path): zero variance"
            else:
                reason = "exact: zero variance"
            if alt_o is None:
                reason += f"; no sampled estimator meets the rse target {target_rse:g} with N<={k}"
            else:
                a_est, a_n = decode(alt_o, k)
                reason += (
                    f"; {LABEL[a_est]} (best N={a_n}) would make a refresh {alt_cost / plan_cost:.3g}x as costly and "
                    f"the plan's predicted error at equal time {worse:.3g}x"
                )
            if opts == all_exact and j_ex > 0 and alt_o is not None and worse < 1.0:
                reason += f" (within the {COST_TIE:.0%} timing-noise margin: ties go to exact)"
            ch = Choice("exact", 1, 0.0, c_ex, reason, rse1, rse2, st.f, "exact")
        for p in unit:
            out[p] = ch
    return out, opts, cur, kept + plan_summary(scorer, opts, costs, k, sources) + pref


def _other_family(scorer: PlanScorer, opts: list[int], i: int, j: float, k: int) -> str:
    """``"; best other family: <label> N=<n> (...x)"`` for a sampled layer, or ``""``."""
    fam = (opts[i] - 1) // k
    cand = np.asarray([c for c in scorer.options(i) if (c - 1) // k != fam], dtype=np.int64)
    if not len(cand) or j <= 0:
        return ""
    plans = np.repeat(np.asarray(opts, dtype=np.int64)[None, :], len(cand), 0)
    plans[:, i] = cand
    js = scorer.score(plans)
    b = int(js.argmin())
    if not js[b] < math.inf:
        return ""
    est, n = decode(int(cand[b]), k)
    return f"; the best other family here, {LABEL[est]} N={n}, would make it {math.sqrt(js[b] / j):.3g}x"


def plan_summary(scorer: PlanScorer, opts: list[int], costs: Costs, k: int, sources: dict[str, str]) -> str:
    """The chosen plan against exact everywhere and against each family's best uniform plan (exact on the seedless
    output layer): predicted refresh cost and predicted error at equal time (``sqrt`` of the ratio of ``J``)."""
    n_units = len(opts)
    if n_units == 0:
        return "plan: 0 of 0 layers exact (no parameter used by the forward pass)"
    chosen = np.asarray(opts, dtype=np.int64)[None, :]
    j = scorer.score(chosen)[0]
    seedless = scorer.uc[:, 0] == 0.0

    def fmt(cost: float) -> str:
        return f"{1e3 * cost:.3g} ms" if costs.cost_model == "measured" else f"{cost:.3g} (flops units)"

    used: dict[str, list[int]] = {}
    for o in opts:
        if o:
            est, n = decode(o, k)
            used.setdefault(est, []).append(n)
    parts = [f"plan: {opts.count(0)} of {n_units} layers exact"]
    parts += [f"{len(ns)} {LABEL[e]} with N={'/'.join(map(str, sorted(set(ns))))}" for e, ns in used.items()]
    text = ", ".join(parts) + f", predicted refresh {fmt(costs.unit_refresh_cost([decode(o, k) for o in opts]))}"
    alts = [("exact everywhere", np.zeros(n_units, dtype=np.int64))]
    for f, est in enumerate(SAMPLED):
        need = scorer.need_f[f]
        if est not in sources or (need > k).all():
            continue
        uniform = np.stack([np.where(seedless | (need > k), 0, f * k + np.maximum(n, need)) for n in range(1, k + 1)])
        best = uniform[int(np.argmin(scorer.score(uniform)))]
        n_best = int((best.max() - 1) % k + 1) if best.max() > 0 else 0
        alts.append((f"{LABEL[est]} N={n_best} on every layer with seeds", best))
    rows = []
    for name, plan in alts:
        jj = scorer.score(plan[None, :])[0]
        if (plan == chosen[0]).all() or (name != "exact everywhere" and not plan.any()) or not jj < math.inf:
            continue
        ratio = f"{math.sqrt(j / jj):.3g}x" if jj > 0 else "inf x"
        rows.append(f"{name}: refresh {fmt(costs.unit_refresh_cost([decode(int(o), k) for o in plan]))}, this "
                    f"plan's predicted error at equal time {ratio} its")  # fmt: skip
    for est in used:
        if est != "mc1" and sources.get(est):
            rows.append(f"{LABEL[est]} over Î₁ ({LABEL[est]}'s variance: {sources[est]})")
    if list(used) == ["mc1"] and len(sources) > 1:
        rows.append("Î₁ over " + " and ".join(LABEL[e] for e in sources if e != "mc1"))
    return "; ".join([text, *rows])
