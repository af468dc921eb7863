r"""Estimation-quality benchmark, report part 2: the "Why" section (every number computed from the run) and the
figure.  The rest of the report is ``benchmarks/estimation_quality_report.py``; the study is described in
``benchmarks/estimation_quality.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from benchmarks.estimation_quality_prediction import (
    REGRET_FROM,
    TAU,
    auto_choices,
    break_even,
    goal_c,
    rule_choices,
    verdicts,
)
from benchmarks.estimation_quality_problems import AUTO, STYLE
from fisher_optim.selection import COST_TIE


# -- formatting --------------------------------------------------------------------------------------------------
def g3(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.3g}"


def ms(x: float) -> str:
    return f"{1e3 * x:.3g}"


def span(values) -> str:
    lo, hi = min(values), max(values)
    return g3(lo) if g3(lo) == g3(hi) else f"{g3(lo)}–{g3(hi)}"


def findings(res: dict, rows: list[dict], costs: dict) -> list[str]:
    """Why auto wins or loses, with the numbers computed from this run."""
    if not res["config"].exact_streams:
        return lm_findings(res, rows, costs)
    acc = SimpleNamespace(rhos=[], model_ratio=[], call_ratio=[], same_stream=[], mc2_vs_mc1=[], ef_bias=[],
                          be_all=[], mc2_cost=[], sel_meas=[], sel_cached=[], sel_share=[], auto_vs_exact=[], pays=0,
                          agree=0, fixed_rule=Counter(), n_cells=0)  # fmt: skip
    out = ["## Why", ""]
    cfg = res["config"]
    for v in (v for v in verdicts(rows, cfg) if v["frac"] == cfg.fractions[-1]):
        out.append(epoch_finding(res, rows, costs, v, acc))
    return out + reading(res, acc) + proposal(acc)


def epoch_finding(res: dict, rows: list[dict], costs: dict, v: dict, acc: SimpleNamespace) -> str:
    """One checkpoint's bullet at the budget T; adds its numbers to ``acc`` for the reading."""
    cfg = res["config"]
    names = res["checkpoints"][0]["ref"]["names"]
    ck = next(c for c in res["checkpoints"] if c["epoch"] == v["epoch"])
    r = next(r for r in rows if r["epoch"] == v["epoch"])
    cs = costs[v["epoch"]]
    a = cs[AUTO]
    rho = [ck["ref"]["per"][n]["L1"] / ck["ref"]["per"][n]["A"] for n in names]
    acc.rhos += rho
    ratio1 = cs["exact"]["cpu"] / cs["mc1 N=1"]["cpu"]
    ratio4 = cs["exact"]["cpu"] / cs["mc1 N=4"]["cpu"]
    acc.model_ratio.append(ck["cost_model"]["ratio"])
    acc.call_ratio.append(ratio1)
    acc.sel_meas.append(a["sel_measured_cpu"] / cs["exact"]["cpu"])
    if a["sel_cached_n"]:
        acc.sel_cached.append(a["sel_cached_cpu"] / cs["exact"]["cpu"])
    acc.sel_share.append(a["sel_share_cpu"])
    acc.auto_vs_exact.append(float(r["table"][(AUTO, "full")][-1] / r["table"][("exact", "full")][-1]))
    if cfg.stream_reference:
        acc.same_stream += list(r["layers"][(AUTO, "stream")])
    if "mc2 N=1" in cfg.fixed:
        hidden = [j for j, n in enumerate(names) if not n.startswith(names[-1].split(".")[0] + ".")]
        acc.mc2_vs_mc1 += [r["layers"][("mc2 N=1", "full")][j] / r["layers"][("mc1 N=1", "full")][j] for j in hidden]
        acc.mc2_cost.append(cs["mc2 N=1"]["cpu"] / cs["exact"]["cpu"])
    acc.ef_bias += [ck["ref"]["per"][n]["ef_bias"] for n in names]
    be1, be4 = break_even(ck["ref"], names, 1, cfg.m), break_even(ck["ref"], names, 4, cfg.m)
    acc.be_all += be1
    acc.pays += sum(ratio1 > b for b in be1)
    ch = auto_choices(ck, names)
    rules = rule_choices(ck["ref"], names, cs, cfg)
    acc.agree += sum(ch[n]["top"].split()[0] == rules[n][0].split()[0] for n in names)
    acc.fixed_rule.update(rules[n][1].split()[0] for n in names)
    acc.n_cells += len(names)
    sels, chosen, mixed = selection_counts(ck, names)
    return (
        f"- **Epoch {v['epoch']}**, budget T: best fixed = {v['best']} ({g3(v['best_err'])}); auto "
        f"{g3(v['auto'])} ({g3(v['auto'] / v['best_err'])}×). ρ₁ = L₁/A spans {span(rho)} across tensors, so Î₁ "
        "with N samples beats exact at equal time (before the EMA plateau) only where exact costs more than "
        f"1 + ρ₁/(c_M N) times as much: {span(be1)} for N=1, {span(be4)} for N=4. Measured (mean CPU per call): "
        f"exact costs {g3(ratio1)}× mc1 N=1 and {g3(ratio4)}× mc1 N=4; `run_selection`'s measured cost model "
        f"predicts {g3(ck['cost_model']['ratio'])}× for N=1. Auto's choices (tensors × its {len(sels)} "
        "selections): " + ", ".join(f"{k} {n}×" for k, n in chosen.most_common())
        + f" ({mixed} of {len(sels)} selections gave a mixed plan). " + auto_costs(a, "exact", cs["exact"]["cpu"])
        + f" ({len(sels) / max(1, len(ck['streams'])):.1f} selections per stream)."
    )  # fmt: skip


def auto_costs(a: dict, ref: str, ref_cpu: float, measured_extra: str = "") -> str:
    """Auto's CPU cost per plan refresh (beside ``ref``'s) and per selection refresh, with measured and with cached
    costs, and the selections' share of its CPU time."""
    return (f"Its plan refreshes cost {ms(a['plan_cpu'])} ms (CPU; {ref}: {ms(ref_cpu)} ms), its selection refreshes "
            f"{ms(a['sel_measured_cpu'])} ms with measured costs ({a['sel_measured_n']}×{measured_extra})"
            + (f" and {ms(a['sel_cached_cpu'])} ms with cached costs ({a['sel_cached_n']}×)" if a["sel_cached_n"]
               else " (none with cached costs)")
            + f": {100 * a['sel_share_cpu']:.0f} % of auto's CPU time")  # fmt: skip


def selection_counts(ck: dict, names: list[str]) -> tuple[list[dict], Counter, int]:
    """All of auto's selections at a checkpoint, how often each (estimator, N) was chosen over tensors x
    selections, and how many selections gave a mixed plan."""
    sels = [sel for st in ck["streams"] for sel in st["selections"]]
    chosen = Counter(f"{sel[n]['estimator']} N={sel[n]['n_samples']}" for sel in sels for n in names)
    mixed = sum(len({c["estimator"] + str(c["n_samples"]) for c in sel.values()}) > 1 for sel in sels)
    return sels, chosen, mixed


def reading(res: dict, acc: SimpleNamespace) -> list[str]:
    """The paragraph that reads the checkpoints' numbers together."""
    cfg = res["config"]
    d = cfg.defaults
    off = max((m / c for m, c in zip(acc.model_ratio, acc.call_ratio)), key=lambda q: max(q, 1 / q))  # worst checkpoint
    off_text = (
        f" ({'over' if off > 1 else 'under'}estimated by up to {g3(max(off, 1 / off))}× at one checkpoint). "
        if max(off, 1 / off) > 1 + COST_TIE
        else f" (within the tie margin COST_TIE = {COST_TIE:g} at every checkpoint). "
    )
    return [
        "",
        f"Reading: over all checkpoints and tensors the one-label noise of Î₁ is {span(acc.rhos)} times the input "
        "noise of one input (ρ₁), so replacing the exact pass by Î₁ with N=1 pays at equal time only if it is at "
        f"least {g3(min(acc.be_all))}× cheaper (larger N lowers the bar but costs more); the measured whole-call ratio "
        f"exact/mc1 N=1 is {span(acc.call_ratio)} at M = {cfg.m}, so by this criterion Î₁ N=1 pays on {acc.pays} of "
        f"{acc.n_cells} (tensor, checkpoint) cells. `run_selection` costs whole-model passes (an exact, a one-sample "
        "and a four-sample pass over all layers, which scale the `flops` model's per-layer backward and "
        "reduction costs so that it prices mixed plans; the per-call overhead joins the forward pass shared by all "
        f"estimators); its predicted whole-refresh ratio is {span(acc.model_ratio)} against the measured "
        f"{span(acc.call_ratio)}"
        + off_text
        + "Auto's most frequent estimator per tensor agrees with the per-tensor equal-time rule evaluated on the "
        "full-data A "
        f"and L₁ with the measured call costs (last column of the per-tensor tables) on {acc.agree} of "
        f"{acc.n_cells} cells."
        + (
            f" Its target bounds the label noise of the running estimate (`target_rse` = {d['target_rse']}; auto's "
            f"measured same-stream error per tensor at T: {span(acc.same_stream)}, so the target "
            + ("is met)." if max(acc.same_stream) <= d["target_rse"] else "is not met everywhere).")
            if cfg.stream_reference
            else ""
        )
        + " A selection refresh is an exact refresh (its estimate is the exact Fisher of the batch) that also "
        f"computes the variances: it cost {span(acc.sel_meas)} exact refreshes (CPU) with measured costs"
        + (f" and {span(acc.sel_cached)} with cached costs" if acc.sel_cached else "")
        + f", {span([100 * s for s in acc.sel_share])} % of auto's CPU time. At T auto's error is "
        f"{span(acc.auto_vs_exact)}× exact's. Once the EMA has reached its plateau (after about (1+β)/(1−β) = "
        f"{(1 + d['beta2']) / (1 - d['beta2']):.0f} refreshes; exact made {cfg.k_exact} by T) more refreshes no "
        "longer reduce the error, whose square tends to (1−β)/(1+β)·(c_M A + L/N)/M: exact's (L = 0) is the "
        "lowest, "
        "whatever the cost ratio."
        + (
            f" Î₂ (mc2) has {span(acc.mc2_vs_mc1)}× the error of Î₁ N=1 at T on the tensors before the last layer (its "
            f"one-label variance is far larger there, as in the paper study) and costs {span(acc.mc2_cost)} exact "
            "refreshes (CPU)."
            if "mc2 N=1" in cfg.fixed
            else ""
        )
        + " The empirical Fisher is biased: its full-data bias ‖EF − F‖/‖F‖ per tensor is "
        f"{span(acc.ef_bias)}, a lower "
        "bound on its expected error, whatever the budget (per-tensor tables).",
        "",
    ]


def proposal(acc: SimpleNamespace) -> list[str]:
    """The open proposal: a rule for a fixed refresh schedule, evaluated on this run."""
    return [
        "## Open proposal: a rule for a fixed refresh schedule",
        "",
        "`select` minimises the error per unit of time: it assumes the time a cheaper estimator saves buys more "
        "refreshes. When the refresh schedule is fixed (`fisher_interval`) that time is not spent on estimation, and "
        "what matters is the error at an equal refresh count (table above). A rule for that case: the cheapest Î₁ "
        f"whose label noise stays under a fraction τ of the input noise, L₁/N ≤ τ·c_M A (τ = {TAU} adds at most "
        f"{100 * (math.sqrt(1 + TAU) - 1):.0f} % to the error), with exact as the fallback. Evaluated on this run "
        f"(last column of the per-tensor tables; {acc.n_cells} tensor × checkpoint cells): "
        + ", ".join(f"{k} in {v}" for k, v in sorted(acc.fixed_rule.items()))
        + ". Not implemented in `fisher_optim/selection.py`.",
    ]


def lm_findings(res: dict, rows: list[dict], costs: dict) -> list[str]:
    """The "Why" section where exact does not stream (``lm``): what auto chose, what its selections cost, and where
    it is behind the best fixed choice."""
    cfg = res["config"]
    d = cfg.defaults
    names = res["checkpoints"][0]["ref"]["names"]
    out = ["## Why", ""]
    for r, ck in zip(rows, res["checkpoints"]):
        out.append(lm_epoch_finding(cfg, r, ck, costs[ck["epoch"]], names))
    gc = goal_c(rows, cfg)
    hutch = [float(r["table"][("hutchinson N=1", "full")][-1] / r["table"][("mc1 N=1", "full")][-1]) for r in rows]
    plateau = (1 + d["beta2"]) / (1 - d["beta2"])
    out += [
        "",
        f"Reading: the budget T is {cfg.k_exact} refreshes of {cfg.budget_by}; the EMA (β₂ = {d['beta2']}) reaches "
        f"its plateau after about (1+β)/(1−β) = {plateau:.0f} refreshes, after which more refreshes no longer reduce "
        "the error, whose square tends to (1−β)/(1+β)·(c_M A + V/N)/M (V: one probe's variance): past it the "
        "strategy with the lowest variance per refresh wins whatever its cost, before it the one with the lowest "
        "variance × cost. Hutchinson N=1's error at T is "
        f"{span(hutch)}× Î₁ N=1's. Auto pays for its selections in its own time: a selection with measured costs "
        "times the exact pass on a subsample of its seeds (`measured_costs`), which on this output is worth many "
        f"Î₁ refreshes (cost table), so early budgets go to the first selection. Goal (c) "
        + ("holds" if gc["holds"] else "does not hold")
        + f" here: auto's worst ratio to the best fixed choice from {REGRET_FROM:g} T on is {g3(gc['worst'])}×"
        + (f"; it stays below every fixed choice from {g3(gc['first_win'])} T on." if math.isfinite(gc["first_win"])
           else "; it is not below every fixed choice at T.")  # fmt: skip
        + "",
        "",
    ]
    return out


def lm_epoch_finding(cfg, r: dict, ck: dict, cs: dict, names: list[str]) -> str:
    """One checkpoint's bullet on ``lm``."""
    from benchmarks.estimation_quality_prediction import first_win

    a = cs[AUTO]
    one = cs["mc1 N=1"]["cpu"]
    j = cfg.fractions.index(REGRET_FROM) if REGRET_FROM in cfg.fractions else 0
    fixed = {s: float(r["table"][(s, "full")][-1]) for s in cfg.fixed}
    early = {s: float(r["table"][(s, "full")][j]) for s in cfg.fixed}
    best, best_early = min(fixed, key=fixed.get), min(early, key=early.get)
    auto_t, auto_early = float(r["table"][(AUTO, "full")][-1]), float(r["table"][(AUTO, "full")][j])
    sels, chosen, mixed = selection_counts(ck, names)
    fw = first_win(r, cfg)
    return (
        f"- **Epoch {ck['epoch']}**: at T best fixed = {best} ({g3(fixed[best])}), auto {g3(auto_t)} "
        f"({g3(auto_t / fixed[best])}×); at {cfg.fractions[j]:g} T best fixed = {best_early} "
        f"({g3(early[best_early])}), auto {g3(auto_early)} ({g3(auto_early / early[best_early])}×, after "
        f"{r['counts'][AUTO][j]:g} refreshes against {r['counts'][best_early][j]:g}). "
        + (f"Auto stays below every fixed choice from {g3(fw)} T on." if math.isfinite(fw)
           else "Auto is not below every fixed choice at T.")
        + f" Its choices (tensors × its {len(sels)} selections): "
        + ", ".join(f"{k} {n}×" for k, n in chosen.most_common())
        + f" ({mixed} of {len(sels)} selections gave a mixed plan). "
        + auto_costs(a, "mc1 N=1", one, f", {g3(a['sel_measured_cpu'] / one)} Î₁ N=1 refreshes")
        + ". `run_selection`'s cost model predicts an exact "
        f"refresh at {ms(ck['cost_model']['exact'])} ms, {g3(ck['cost_model']['ratio'])}× an Î₁ N=1 refresh."
    )  # fmt: skip


# -- figure ------------------------------------------------------------------------------------------------------
def plot(res: dict, rows: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    n = len(rows)
    refs = cfg.references
    fig, axes = plt.subplots(len(refs), n, figsize=(5.2 * n, 0.6 + 4.0 * len(refs)), squeeze=False)
    for col, r in enumerate(rows):
        for row, which in enumerate(refs):
            ax = axes[row][col]
            for c in cfg.curves:
                if which == "stream" and c == "exact":
                    continue  # identically zero
                color, ls = STYLE[c]
                ax.plot(1e3 * r["grid"], r["curves"][(c, which)], ls, color=color, lw=1.6, label=c)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_xlabel("cumulative estimation time (ms, wall)")
            ref = "full-data exact Fisher" if which == "full" else "exact Fisher of the same stream (EMA)"
            ref = f"exact Fisher of the {cfg.n_pool}-window pool" if cfg.problem == "lm" else ref
            ax.set_title(f"epoch {r['epoch']}: error vs {ref}", fontsize=9)
        axes[0][col].axvline(1e3 * r["T"], color="gray", lw=0.8, ls=":")
    axes[0][0].set_ylabel("mean over tensors of ||F̃ − F|| / ||F||")
    if len(refs) > 1:
        axes[1][0].set_ylabel("same, label noise + bias only (exact = 0)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.02), ncol=len(cfg.curves), fontsize=8)
    fig.suptitle(
        f"Running diagonal Fisher (EMA β₂={cfg.defaults['beta2']}, M={cfg.m}) at equal estimation time "
        f"(auto: selections included)\n{cfg.describe_model()}, {cfg.likelihood}, "
        f"{'pydoc_data text' if cfg.problem == 'lm' else 'synthetic' if cfg.synthetic else 'MNIST'}, "
        f"{chr(10) if cfg.problem == 'lm' else ''}mean of {cfg.repeats} stream{'s' if cfg.repeats > 1 else ''} "
        "(time f·T of each stream shown at f·mean T; dotted: T)",
        fontsize=9,
    )
    fig.text(0.005, 0.004, f"made by: {command}", ha="left", fontsize=7, color="gray")
    top = (0.93 if len(refs) == 1 else 0.95) - (0.04 if cfg.problem == "lm" else 0.0)  # lm: a three-line title
    fig.tight_layout(rect=(0, 0.11 if len(refs) == 1 else 0.06, 1, top))
    fig.savefig(path, dpi=100)
    plt.close(fig)
