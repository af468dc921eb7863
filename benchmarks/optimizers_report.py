"""The optimizer benchmark's report: Markdown tables, a findings section computed from the numbers, and plots.

Everything here reads the saved results (``run_benchmark``'s dict, or its JSON) and nothing else, so a report
can be re-rendered (``python -m benchmarks.optimizers --from-json FILE``).  No sentence of the findings is
written by hand: each is a template filled from the paired statistics of :mod:`benchmarks.stats`.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.optimizers_baselines import OptSpec, hidden_matrices
from benchmarks.optimizers_problems import Problem
from benchmarks.optimizers_runs import Run, runs_of
from benchmarks.stats import Paired, median_ci, paired_difference, paired_ratio

__all__ = ["write_markdown", "plot", "problem_stats"]

MAIN = "fisher_adam"
GOAL_STEPS, GOAL_TIME = 2 / 3, 1 / 2  # issue 15's goal: fewer steps on 2/3 of the problems, less time on half
#: issue 19: FisherAdam or its Schedule-Free form against AdamW on 8 of 11 (steps) and 6 of 11 (time), and the
#: Schedule-Free form against Schedule-Free AdamW on 6 of 11 (steps)
SF_MAIN, SF_REF = "sf_fisher_adam", "schedulefree_adamw"
GOAL19_STEPS, GOAL19_TIME, GOAL19_SF = 8 / 11, 6 / 11, 6 / 11


# -- numbers ---------------------------------------------------------------------------------------------
def _by_seed(runs: list[Run], attr: str) -> dict[int, float]:
    out = {}
    for r in runs:
        if r.error:
            continue
        v = getattr(r, attr)
        if attr == "final_val" and r.diverged:
            v = math.nan
        out[r.seed] = v
    return out


def problem_stats(prob: Problem, res: dict, key: str) -> dict[str, dict]:
    """Per optimizer on one problem: medians with bootstrap intervals and the paired comparison with the reference."""
    pr = res["problems"][key]
    ref = res.get("reference", "adamw")
    runs = {o: runs_of(res, key, "final", o) for o in pr["final"]}
    out = {}
    for o, rs in runs.items():
        ok = [r for r in rs if not r.error]
        s = {
            "n": len(rs),
            "reached": sum(math.isfinite(r.steps_to_target) for r in ok),
            "steps": median_ci([r.steps_to_target for r in ok]),
            "time": median_ci([r.time_to_target for r in ok]),
            "final": median_ci([math.nan if r.diverged else r.final_val for r in ok]),
            "test": median_ci([r.test for r in ok if math.isfinite(r.test)]),
            "ms": median_ci([r.ms_per_step for r in ok if r.steps]),
            "diverged": sum(r.diverged for r in ok),
            "capped": sum(r.capped for r in ok),
            "errors": sorted({r.error for r in rs if r.error}),
        }
        if ref in runs and o != ref:
            b = runs[ref]
            s["vs_ref"] = {
                "steps": paired_ratio(_by_seed(rs, "steps_to_target"), _by_seed(b, "steps_to_target")),
                "time": paired_ratio(_by_seed(rs, "time_to_target"), _by_seed(b, "time_to_target")),
                "ms": paired_ratio(_by_seed(rs, "ms_per_step"), _by_seed(b, "ms_per_step")),
                "final": paired_difference(_by_seed(rs, "final_val"), _by_seed(b, "final_val")),
            }
        if o == SF_MAIN and SF_REF in runs:  # the Schedule-Free form against its first-order counterpart
            s["vs_sf"] = paired_ratio(_by_seed(rs, "steps_to_target"), _by_seed(runs[SF_REF], "steps_to_target"))
        out[o] = s
    return out


def _better(prob: Problem, p: Paired, what: str) -> str:
    """``"better"`` / ``"worse"`` / ``"unclear"`` for ``a`` against ``b`` from a paired comparison."""
    v = p.verdict
    if v == "unclear":
        return "unclear"
    if what == "final":
        good = "more" if prob.higher_is_better else "less"
        return "better" if v == good else "worse"
    return "better" if v == "less" else "worse"


def _outcome(prob: Problem, st: dict, what: str) -> str:
    """Against the reference, on steps or time: decided by the target when either reaches it, else by the final
    validation metric (both missed the target: the one closer to it is better)."""
    vs = st["vs_ref"]
    if vs[what].n:
        return _better(prob, vs[what], what)
    return _better(prob, vs["final"], "final")


# -- formatting ------------------------------------------------------------------------------------------
def _num(v: float, fmt: str = ".3g") -> str:
    return "—" if math.isinf(v) else "n/a" if math.isnan(v) else format(v, fmt)


def _ci(t: tuple[float, float, float], fmt: str = ".3g") -> str:
    m, lo, hi = t
    if math.isnan(m):
        return "n/a"
    if lo == hi == m:
        return _num(m, fmt)
    return f"{_num(m, fmt)} [{_num(lo, fmt)}, {_num(hi, fmt)}]"


def _metric_fmt(prob: Problem) -> str:
    return ".4f" if prob.metric == "accuracy" else ".3f"


def _paired(p: Paired, fmt: str = ".2f") -> str:
    if not p.n:
        return "n/a"
    return f"{_ci((p.median, p.low, p.high), fmt)} ({p.n_less}/{p.n_more} of {p.n}, p={p.p:.2g})"


def _edge_flag(grid: dict) -> str:
    return {"": "", "low": " **EDGE (low)**", "high": " **EDGE (high)**", "single": " (one value)"}[grid["edge"]]


# -- the report ------------------------------------------------------------------------------------------
def write_markdown(problems: dict[str, Problem], res: dict, specs: dict[str, OptSpec], path: Path,
                   rendered_by: str | None = None) -> None:  # fmt: skip
    """The report; every number and every finding comes from ``res``."""
    stem = path.stem
    keys = list(res["problems"])
    stats = {k: problem_stats(problems[k], res, k) for k in keys}
    ref = res.get("reference", "adamw")
    label = lambda o: specs[o].label if o in specs else o  # noqa: E731
    L: list[str] = ["# Optimizer benchmark: fisher_optim against today's baselines (issue 15 protocol)", ""]
    if res.get("note"):
        L += [f"**{res['note']}**", ""]
    how = f" Rendered by `{rendered_by}` from the saved results." if rendered_by else ""
    how += f" Code: git `{res['git']}`." if "git" in res else ""
    L += [f"Produced by `{res['command']}` (run from the repository root), finished {res.get('finished', 'n/a')}, in "
          f"{res['elapsed_s'] / 60:.1f} min.{how}", "",
          f"Machine: {res['machine']}; load average at the end: {res.get('load_at_end', 'n/a')}. Shared machine:",
          "wall-clock carries noise of tens of percent; steps do not depend on the load.", ""]  # fmt: skip
    if res.get("versions"):
        L += ["Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", ""]
    L += ["Protocol (module docstring of `benchmarks/optimizers.py`): per optimizer and problem a learning-rate grid",
          "half a decade apart (×√10), started at three values around the optimizer's default and extended until",
          f"the best value on the validation split is interior (at most {res.get('max_grid', 8)} values), seed 0;",
          f"the chosen lr then runs with seeds 0..{res['seeds'] - 1}. Budgets are fixed in steps "
          f"(`--epochs-scale {res.get('epochs_scale', 1):g}`); the",
          "time cap only stops runaway runs. Cells: median over seeds [95 % bootstrap interval]; '—': not reached",
          f"by half or more of the seeds. Paired columns compare each seed with {label(ref)}'s same seed:",
          "median per-seed ratio [interval] (seeds with fewer / more, of n, sign-test p); a seed's steps ratio",
          "is 0 where only the optimizer reached the target in that seed, ∞ (shown —) where only the reference did.",
          ""]  # fmt: skip
    L += ["Optimizers (`benchmarks/optimizers_baselines.py`): "
          + "; ".join(f"{label(o)} ({specs[o].family}{', ' + specs[o].note if specs[o].note else ''})"
                      for o in dict.fromkeys(o for k in keys for o in res["problems"][k]["final"]) if o in specs)
          + ".", ""]  # fmt: skip
    if res["skipped"]:
        L += ["**Not run**: " + "; ".join(f"`{k}` ({v})" for k, v in res["skipped"].items()), ""]
    L += _edges(res, keys, label)
    L += _findings(problems, res, stats, keys, label)
    L += _summary(problems, stats, keys, label, ref)
    L += _fisher_scale(res, stats, problems)
    for k in keys:
        L += _problem_section(problems[k], res, stats[k], k, label, ref)
    L += ["## Plots", "", f"Per problem: median validation metric and training loss over seeds against steps "
          f"(`{stem}_<problem>.png`); summary of paired ratios to {label(ref)} (`{stem}_ratios.png`).", "",
          f"![ratios]({stem}_ratios.png)", ""] + [f"![{k}]({stem}_{k}.png)" for k in keys] + [""]  # fmt: skip
    path.write_text("\n".join(L))


def _edges(res: dict, keys: list[str], label) -> list[str]:
    grids = [(k, o, g) for k in keys for o, g in res["problems"][k]["grids"].items()]
    edges = [(k, o, g) for k, o, g in grids if g["edge"] in ("low", "high")]
    single = [(k, o) for k, o, g in grids if g["edge"] == "single"]
    L = [f"**Edge choices: {len(edges) or 'none'}**" + (" (every chosen learning rate has a tried neighbour on both "
         "sides)" if not edges and not single else ":" if edges else ".")]  # fmt: skip
    L += [f"- {k} / {label(o)}: chose {g['chosen']:.3g} of {', '.join(f'{v:.3g}' for v in g['lrs'])} ({g['edge']} "
          "edge; the grid reached its size limit)" for k, o, g in edges]  # fmt: skip
    if single:
        L += ["", f"A single learning rate was tried in {len(single)} cells (smoke mode, or a run stopped by the time "
              "cap): " + ", ".join(f"{k}/{o}" for k, o in single[:12]) + (" ..." if len(single) > 12 else "") + "."]
    return L + [""]


def _findings(problems, res, stats, keys, label) -> list[str]:
    ref = res.get("reference", "adamw")
    opts = [o for o in dict.fromkeys(o for k in keys for o in stats[k]) if o != ref]
    L = ["## Findings (generated from the numbers below)", ""]
    if not keys or not any("vs_ref" in stats[k].get(o, {}) for k in keys for o in opts):
        return L + [f"No paired comparison: {label(ref)} was not run.", ""]
    rows = []
    for o in opts:
        have = [k for k in keys if "vs_ref" in stats[k].get(o, {})]
        if not have:
            continue
        steps = {k: _outcome(problems[k], stats[k][o], "steps") for k in have}
        times = {k: _outcome(problems[k], stats[k][o], "time") for k in have}
        ms = [stats[k][o]["vs_ref"]["ms"].median for k in have if stats[k][o]["vs_ref"]["ms"].n]
        cost = median_ci(ms)[0] if ms else math.nan
        fewer = [k for k in have if stats[k][o]["vs_ref"]["steps"].median < 1]
        rows.append((o, steps, times, cost, fewer, have))
    L += [f"Against {label(ref)}, per problem (\"better\": the paired interval excludes no difference; when neither",
          "reached the target, the final validation metric decides):", "",
          "| optimizer | fewer steps (better/worse/unclear) | less time (better/worse/unclear) "
          "| median steps ratio < 1 on | per-step cost × ref (median over problems) |",
          "|---|---|---|---|---|"]  # fmt: skip
    for o, steps, times, cost, fewer, have in rows:
        c = lambda d, v: sum(x == v for x in d.values())  # noqa: E731
        L.append(f"| {label(o)} | {c(steps, 'better')}/{c(steps, 'worse')}/{c(steps, 'unclear')} | "
                 f"{c(times, 'better')}/{c(times, 'worse')}/{c(times, 'unclear')} | {len(fewer)} of {len(have)} | "
                 f"{_num(cost, '.2f')} |")  # fmt: skip
    L.append("")
    main = next((r for r in rows if r[0] == MAIN), None)
    if main is not None:
        o, steps, times, cost, fewer, have = main
        vs = {k: stats[k][o]["vs_ref"] for k in have}
        defined = [k for k in have if vs[k]["steps"].n]
        ftime = [k for k in have if vs[k]["time"].median < 1]
        ok_s, ok_t = len(fewer) >= GOAL_STEPS * len(have), len(ftime) >= GOAL_TIME * len(have)
        sure = lambda what: [k for k in defined if vs[k][what].verdict == "less"]  # noqa: E731
        L += [f"**Goal** (issue 15): {label(o)} needs fewer steps than {label(ref)} on at least two thirds of the "
              f"problems and less wall-clock on at least half. Measured (median paired ratio < 1): fewer steps on "
              f"{len(fewer)} of {len(have)} ({'met' if ok_s else 'not met'}), less wall-clock on {len(ftime)} of "
              f"{len(have)} ({'met' if ok_t else 'not met'}); with the whole paired interval below 1: "
              f"{len(sure('steps'))} and {len(sure('time'))}."
              + (f" On {len(have) - len(defined)} problem(s) neither reached the target in any seed, so no steps "
                 "ratio exists there." if len(defined) < len(have) else "")
              + ("" if any(k.startswith("lm") for k in have) else " The LM part of the goal (within 10 % of the best "
                 "baseline's steps on the language model) needs the LM problems, not in this run."), ""]  # fmt: skip
        L += lm_goal(stats, [k for k in have if k.startswith("lm")], label)
        if not (ok_s and ok_t):
            L += goal_needs(stats, have, o, label(o), label(ref))
        wins = [k for k in have if steps[k] == "better"]
        losses = [k for k in have if steps[k] == "worse"]
        L.append(f"Where {label(o)} is clearly ahead of {label(ref)} (paired interval; final validation metric where "
                 f"neither reached the target): {', '.join(wins) or 'nowhere'}; clearly behind: "
                 f"{', '.join(losses) or 'nowhere'}; unclear: "
                 f"{', '.join(k for k in have if steps[k] == 'unclear') or 'nowhere'}.")  # fmt: skip
        slow = [k for k in have if vs[k]["steps"].median < 1 <= vs[k]["time"].median]
        if slow:
            L.append(f"Fewer steps but not less time on {', '.join(slow)}: its per-step cost there is "
                     + ", ".join(f"{vs[k]['ms'].median:.2f}×" for k in slow)
                     + f" {label(ref)}'s, more than the step saving.")  # fmt: skip
        L.append("")
    L += issue19_goals(stats, keys, label, ref)
    best = []
    for k in keys:
        cand = {o: s["steps"][0] for o, s in stats[k].items()}
        finite = {o: v for o, v in cand.items() if math.isfinite(v)}
        if finite:
            b = min(finite, key=finite.get)
            f = finite.get(MAIN, math.inf)
            best.append(f"{k}: {label(b)} ({finite[b]:.0f} steps" + (f"; {label(MAIN)} {f / finite[b]:.2f}× that)"
                        if MAIN in cand and math.isfinite(f) and finite[b] > 0 else ")"))  # fmt: skip
        else:
            best.append(f"{k}: no optimizer reached the target in half its seeds")
    L += ["Fewest median steps to target per problem: " + "; ".join(best) + ".", ""]
    return L


def goal_needs(stats, have: list[str], o: str, name: str, ref_name: str) -> list[str]:
    """What the goal would need, from the paired medians: the problems where the steps ratio is still >= 1 (sorted,
    closest first), and the per-step cost at which the measured steps ratio would turn into less wall-clock
    (``1 / steps ratio`` times the reference's per-step cost) against the cost measured."""
    vs = {k: stats[k][o]["vs_ref"] for k in have}
    steps = {k: vs[k]["steps"].median for k in have if vs[k]["steps"].n}
    need_s = max(0, math.ceil(GOAL_STEPS * len(have)) - sum(r < 1 for r in steps.values()))
    need_t = max(0, math.ceil(GOAL_TIME * len(have)) - sum(vs[k]["time"].median < 1 for k in have))
    behind = sorted((r, k) for k, r in steps.items() if r >= 1)
    L = [f"What the goal would need: fewer steps than {ref_name} on {need_s} more problem(s); its median paired "
         "steps ratio where it is not below 1, closest first: "
         + (", ".join(f"{k} {r:.2f}×" for r, k in behind) or "none") + "."]  # fmt: skip
    if need_t:
        rows = [(k, steps[k], vs[k]["ms"].median) for k in have if k in steps and vs[k]["ms"].n]
        rows = [(k, 1 / r, c) for k, r, c in rows if r > 0]
        ok = [k for k, allow, c in rows if c < allow]
        dear = [k for k, allow, c in rows if 1 < allow <= c]
        L.append(f"Less wall-clock on {need_t} more problem(s): at the measured steps ratio r it needs a per-step "
                 f"cost below 1/r × {ref_name}'s; allowed / measured per problem: "
                 + ", ".join(f"{k} {allow:.2f}/{c:.2f}×" for k, allow, c in sorted(rows, key=lambda t: t[2] - t[1]))
                 + f". The cost is within the allowance on {len(ok)} problem(s)"
                 + (f"; fewer steps but a step too dear on {', '.join(dear)}" if dear else "")
                 + "; elsewhere the steps ratio itself is at or above 1, so a cheaper step alone cannot meet it.")
    return L + [""]


#: the LM part of the goal: FisherAdam (auto)'s median steps within this factor of the best baseline's
LM_GOAL = 1.10


def _is_baseline(o: str) -> bool:
    return not o.startswith(("fisher_", "natural_", "sf_fisher"))


def lm_goal(stats, lm_keys: list[str], label, main=(MAIN,)) -> list[str]:
    """The LM part of the goal: median steps of ``main`` (the fewest of its optimizers) against the fewest median
    steps of any baseline (an optimizer not from fisher_optim), per LM problem."""
    L = []
    for k in lm_keys:
        base = {o: s["steps"][0] for o, s in stats[k].items() if _is_baseline(o)}
        finite = {o: v for o, v in base.items() if math.isfinite(v)}
        ours = {o: stats[k][o]["steps"][0] for o in main if o in stats[k]}
        mine_o = min(ours, key=lambda o: ours[o] if math.isfinite(ours[o]) else math.inf) if ours else main[0]
        mine = ours.get(mine_o, math.nan)
        if not finite:
            L.append(f"LM goal on {k}: no baseline reached the target in half its seeds; not decidable.")
            continue
        b = min(finite, key=finite.get)
        if finite[b] <= 0:  # the target was met before the first step (smoke budgets): no ratio exists
            L.append(f"LM goal on {k}: {label(b)} met the target at step 0; not decidable.")
            continue
        ratio = mine / finite[b] if math.isfinite(mine) else math.inf
        verdict = "met" if ratio <= LM_GOAL else "not met"
        L.append(f"LM goal on {k} ({label(mine_o)} within {LM_GOAL - 1:.0%} of the best baseline's median steps): "
                 f"{verdict}: {_num(mine, '.0f')} steps against {label(b)}'s {finite[b]:.0f} "
                 f"({_num(ratio, '.2f')}×).")  # fmt: skip
    return L + ([""] if L else [])


def issue19_goals(stats, keys: list[str], label, ref: str) -> list[str]:
    """Issue 19's goals, from the paired medians: FisherAdam or ScheduleFreeFisherAdam (whichever is better per
    problem) against the reference in steps and wall-clock, ScheduleFreeFisherAdam against Schedule-Free AdamW in
    steps, and both LMs within 10 % of the best baseline; what each would need where it is missed."""
    ours = [o for o in (MAIN, SF_MAIN) if any("vs_ref" in stats[k].get(o, {}) for k in keys)]
    if not ours:
        return []
    n = len(keys)

    def ratio(k, o, what):
        v = stats[k].get(o, {}).get("vs_ref")
        return v[what].median if v is not None and v[what].n else math.inf

    best_s = {k: min(ratio(k, o, "steps") for o in ours) for k in keys}
    best_t = {k: min(ratio(k, o, "time") for o in ours) for k in keys}
    fs, ft = [k for k in keys if best_s[k] < 1], [k for k in keys if best_t[k] < 1]
    names = " or ".join(label(o) for o in ours)
    need_s, need_t = math.ceil(GOAL19_STEPS * n - 1e-9), math.ceil(GOAL19_TIME * n - 1e-9)
    L = [f"**Goal** (issue 19): {names} (defaults except lr) needs fewer steps than {label(ref)} on at least "
         f"{need_s} of {n} problems and less wall-clock on at least {need_t}. Measured (the better of the two per "
         f"problem, median paired ratio < 1): fewer steps on {len(fs)} of {n} "
         f"({'met' if len(fs) >= need_s else 'not met'}: {', '.join(fs) or 'none'}), less wall-clock on {len(ft)} "
         f"of {n} ({'met' if len(ft) >= need_t else 'not met'}: {', '.join(ft) or 'none'})."]  # fmt: skip
    if len(fs) < need_s:
        behind = sorted((r, k) for k, r in best_s.items() if r >= 1)
        L.append(f"Steps: {need_s - len(fs)} more problem(s) needed; the best ratio where it is not below 1, closest "
                 "first: " + ", ".join(f"{k} {_num(r, '.2f')}×" for r, k in behind) + ".")  # fmt: skip
    if len(ft) < need_t:
        behind = sorted((r, k) for k, r in best_t.items() if r >= 1)
        L.append(f"Wall-clock: {need_t - len(ft)} more problem(s) needed; the best time ratio where it is not below "
                 "1, closest first: " + ", ".join(f"{k} {_num(r, '.2f')}×" for r, k in behind) + ".")  # fmt: skip
    have_sf = [k for k in keys if stats[k].get(SF_MAIN, {}).get("vs_sf") is not None]
    if have_sf:
        sf = {k: stats[k][SF_MAIN]["vs_sf"].median if stats[k][SF_MAIN]["vs_sf"].n else math.inf for k in have_sf}
        wins = [k for k in have_sf if sf[k] < 1]
        need = math.ceil(GOAL19_SF * n - 1e-9)
        L.append(f"{label(SF_MAIN)} against {label(SF_REF)} (median paired steps ratio < 1): fewer steps on "
                 f"{len(wins)} of {len(have_sf)} ({'met' if len(wins) >= need else 'not met'}, goal {need} of {n}); "
                 "ratios: " + ", ".join(f"{k} {_num(sf[k], '.2f')}×" for k in have_sf) + ".")  # fmt: skip
    L.append("")
    lm = [k for k in keys if k.startswith("lm")]
    L += lm_goal(stats, lm, label, tuple(ours)) if lm else []
    return L


def _summary(problems, stats, keys, label, ref) -> list[str]:
    opts = list(dict.fromkeys(o for k in keys for o in stats[k]))
    L = [f"## Summary: median steps to target (paired ratio of steps to {label(ref)})", "",
         "| optimizer | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]  # fmt: skip
    for o in opts:
        cells = []
        for k in keys:
            s = stats[k].get(o)
            if s is None:
                cells.append("not run")
                continue
            cell = _num(s["steps"][0], ".0f")
            if "vs_ref" in s and s["vs_ref"]["steps"].n:
                r = s["vs_ref"]["steps"].median
                cell += f" ({_num(r, '.2f')}×)" if math.isfinite(r) else " (—)"
            cells.append(cell)
        L.append(f"| {label(o)} | " + " | ".join(cells) + " |")
    return L + [""]


def _fisher_scale(res, stats, problems) -> list[str]:
    fs_list = res.get("fisher_scale") or []
    fs_list = [fs_list] if isinstance(fs_list, dict) else [f for f in fs_list if f]
    if not fs_list:
        return []
    L = ["## mc1 versus exact: the size of the Fisher at the first refresh, and what it does to the steps", "",
         "Same initial parameters and first batch for both estimators, per seed (`fisher_scale` in "
         "`benchmarks/optimizers.py`). Columns: the mean over coordinates of √F̃ from mc1 ÷ exact's; the median over "
         "coordinates of the per-coordinate ratio; then, from the tuned runs, each one's lr and median steps to "
         "target, and the paired ratio of steps mc1 ÷ exact (same seeds).", "",
         "| problem | seeds | mean √F̃ mc1 ÷ exact | per-coordinate median ratio | lr mc1 / exact | steps mc1 / exact "
         "| steps mc1 ÷ exact (paired; 0: only mc1 reached the target in that seed) |",
         "|---|---|---|---|---|---|---|"]  # fmt: skip
    ratios = []
    for fs in fs_list:
        k = fs["problem"]
        r, c = median_ci(fs["ratio"]), median_ci(fs["coord_median"])
        ratios.append(r[0])
        row = [k, str(len(fs["ratio"])), _ci(r, ".3f"), _ci(c, ".3f")]
        if k in stats and {"fisher_adam_mc1", "fisher_adam_exact"} <= set(stats[k]):
            g = res["problems"][k]["grids"]
            sm, se = stats[k]["fisher_adam_mc1"], stats[k]["fisher_adam_exact"]
            p = paired_ratio(_by_seed(runs_of(res, k, "final", "fisher_adam_mc1"), "steps_to_target"),
                             _by_seed(runs_of(res, k, "final", "fisher_adam_exact"), "steps_to_target"))  # fmt: skip
            row += [f"{g['fisher_adam_mc1']['chosen']:.3g} / {g['fisher_adam_exact']['chosen']:.3g}",
                    f"{_num(sm['steps'][0], '.0f')} / {_num(se['steps'][0], '.0f')}", _paired(p)]  # fmt: skip
        else:
            row += ["not run"] * 3
        L.append("| " + " | ".join(row) + " |")
    span = lambda a, b: f"{a:.2f}" if f"{a:.2f}" == f"{b:.2f}" else f"{a:.2f}–{b:.2f}"  # noqa: E731
    lo, hi = min(ratios), max(ratios)
    L += ["", f"mc1's mean √F̃ is {span(lo, hi)}× exact's: E[F̂] = F but E[√F̂] ≤ √F (Jensen), so the noisier "
          f"estimate divides the momentum by less and, at the same lr, takes steps about {span(1 / hi, 1 / lo)}× "
          "larger on average (before the clip). Tuning each on its own grid absorbs a constant factor; what remains "
          "in the paired steps column is the effect of the noise itself.", ""]  # fmt: skip
    return L


def _problem_section(prob: Problem, res: dict, st: dict, key: str, label, ref: str) -> list[str]:
    pr = res["problems"][key]
    goal = "≥" if prob.higher_is_better else "≤"
    mf = _metric_fmt(prob)
    L = [f"## {key}: {prob.title}", "",
         f"Likelihood `{prob.likelihood}`; target: validation {prob.metric} {goal} {prob.target:g}; budget "
         f"{pr['budget_steps']} steps (batch {pr['batch_size']}, {pr['n_train']} training inputs); validation every "
         f"{prob.eval_every} steps. {prob.notes}", "",
         f"| optimizer | lr (tried) | reached | steps to target | s to target | final val {prob.metric} | ms/step | "
         f"steps ÷ {label(ref)} | ms/step ÷ {label(ref)} | Δ final val vs {label(ref)} |",
         "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for o, s in st.items():
        g = pr["grids"][o]
        extra = f" ({s['diverged']} diverged)" if s["diverged"] else ""
        extra += f" ({s['capped']} capped)" if s["capped"] else ""
        extra += f" (errors: {'; '.join(s['errors'])})" if s["errors"] else ""
        vs = s.get("vs_ref")
        paired = [_paired(vs["steps"]), _paired(vs["ms"]), _paired(vs["final"], "+.4f")] if vs else ["ref"] * 3
        L.append(f"| {label(o)} | {g['chosen']:.3g} ({', '.join(f'{v:.3g}' for v in g['lrs'])}){_edge_flag(g)} | "
                 f"{s['reached']}/{s['n']}{extra} | {_ci(s['steps'], '.0f')} | {_ci(s['time'], '.2f')} | "
                 f"{_ci(s['final'], mf)} | {_ci(s['ms'], '.2f')} | " + " | ".join(paired) + " |")  # fmt: skip
    for o, note in pr.get("notes", {}).items():
        L.append(f"\n{label(o)}: {note}.")
    if "muon" in st:
        hidden = hidden_matrices(prob.model())[0]
        L.append(f"\n{label('muon')}: " + (f"Muon on {len(hidden)} hidden weight matrices ("
                 + ", ".join("×".join(map(str, p.shape)) for p in hidden) + "), AdamW on the rest." if hidden else
                 "this model has no 2-D hidden weight (one linear layer, or convolutions and a linear head), so it "
                 "is AdamW with Muon's lr grid."))  # fmt: skip
    L += ["", "<details><summary>tuning runs (seed 0): lr: steps to target / final validation metric</summary>", ""]
    for o in pr["tuning"]:
        cells = []
        for r in sorted(runs_of(res, key, "tuning", o), key=lambda r: r.lr):
            state = "error" if r.error else "diverged" if r.diverged else _num(r.final_val, mf)
            state += f" (capped at step {r.steps})" if r.capped else ""
            cells.append(f"{r.lr:.3g}: {_num(r.steps_to_target, '.0f')} / {state}")
        L.append(f"- {label(o)}: " + "; ".join(cells))
    return L + ["", "</details>", ""]


# -- plots -----------------------------------------------------------------------------------------------
def _median_curve(points: list[list[tuple]]) -> tuple[list[float], list[float]]:
    """Median over runs of ``(step, value)`` curves, at steps a majority of the runs reached."""
    by: dict[float, list[float]] = {}
    for pts in points:
        for s, v in pts:
            by.setdefault(s, []).append(v)
    keep = [s for s in sorted(by) if len(by[s]) * 2 > len(points)]
    return keep, [float(sorted(by[s])[len(by[s]) // 2]) if len(by[s]) % 2 else
                  0.5 * sum(sorted(by[s])[len(by[s]) // 2 - 1: len(by[s]) // 2 + 1]) for s in keep]  # fmt: skip


LIMITS = {"steps": (0.1, 10.0), "ms": (0.1, 100.0)}  # ratios outside are drawn at the limit ("never" ends there)
_STYLE = {"first-order": ":", "matrix": "-.", "curvature": "--", "fisher_optim": "-"}


def plot(problems: dict[str, Problem], res: dict, specs: dict[str, OptSpec], out: Path, stem: str) -> list[Path]:
    """``{stem}_<problem>.png`` (validation metric and training loss against steps) and ``{stem}_ratios.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = list(res["problems"])
    opts = list(dict.fromkeys(o for k in keys for o in res["problems"][k]["final"]))
    cmap = plt.get_cmap("tab20")
    color = {o: cmap(i % 20) for i, o in enumerate(opts)}
    color[MAIN] = "black"  # the optimizer the goal is about
    fam = lambda o: specs[o].family if o in specs else "first-order"  # noqa: E731
    label = lambda o: specs[o].label if o in specs else o  # noqa: E731
    paths = []
    for k in keys:
        prob = problems[k]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for o in res["problems"][k]["final"]:
            runs = runs_of(res, k, "final", o)
            s, v = _median_curve([[(c[0], c[2]) for c in r.curve] for r in runs])
            kw = dict(color=color[o], ls=_STYLE[fam(o)], lw=2.2 if o == MAIN else 1.2, label=label(o))
            a1.plot(s, v, **kw)
            s, v = _median_curve([r.losses for r in runs])
            a2.plot(s, v, **kw)
        a1.axhline(prob.target, color="k", ls="--", lw=0.8)
        a1.set(xlabel="step", ylabel=f"validation {prob.metric}", title=f"{k}: validation (median over seeds)")
        positive = all(v > 0 for ln in a2.get_lines() for v in ln.get_ydata() if math.isfinite(v))
        a2.set(xlabel="step", ylabel="training loss (mean since last eval)", title=f"{k}: training loss",
               yscale="log" if positive else "linear")  # a Poisson NLL without log y! can be negative
        if prob.higher_is_better:
            a1.set_ylim(max(0.0, prob.target - 0.3), 1.0)
        else:  # NLL: from just below the best value to a few times the target (early spikes cut off)
            finite = [v for ln in a1.get_lines() for v in ln.get_ydata() if math.isfinite(v)]
            a1.set_ylim(0.97 * min(finite + [prob.target]), 2.5 * prob.target)
        first = sorted(ln.get_ydata()[0] for ln in a2.get_lines() if len(ln.get_ydata()))
        if first and first[len(first) // 2] > 0:  # cut a diverging run's spike off: 3x the typical first loss
            a2.set_ylim(top=3 * first[len(first) // 2])
        a2.legend(fontsize=7, loc="upper right", ncol=2)
        fig.tight_layout()
        path = out / f"{stem}_{k}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    ref = res.get("reference", "adamw")
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(opts) * max(1, len(keys)) ** 0.5 + 2.5))
    for ax, what in zip(axes, ("steps", "ms")):
        for j, k in enumerate(keys):
            st = problem_stats(problems[k], res, k)
            for i, o in enumerate(opts):
                p = st.get(o, {}).get("vs_ref", {}).get(what)
                if p is None or not p.n or not (0 < p.median < math.inf):
                    continue
                y = i + (j - (len(keys) - 1) / 2) * 0.8 / max(1, len(keys))
                a, b = LIMITS[what]
                m = min(max(p.median, a), b)
                lo, hi = min(max(p.low, a), m), max(min(p.high, b), m)
                ax.errorbar(m, y, xerr=[[m - lo], [hi - m]], fmt="o", ms=4,
                            color=plt.get_cmap("tab10")(j % 10))  # fmt: skip
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(LIMITS[what][0] / 1.2, LIMITS[what][1] * 1.2)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(opts)), [label(o) for o in opts], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{'steps to target' if what == 'steps' else 'ms per step'} ÷ {label(ref)} (paired, 95 % CI)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=plt.get_cmap("tab10")(j % 10)) for j in range(len(keys))]
    axes[1].legend(handles, keys, fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / f"{stem}_ratios.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return paths + [path]
