r"""Estimation-quality benchmark, part 3 of 4: predictions and summaries (predicted errors, break-even cost ratios,
the rules' choices, per-budget summaries, verdicts and regrets).  The study is described in
``benchmarks/estimation_quality.py``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

import numpy as np

from benchmarks.estimation_quality_problems import AUTO, Config
from benchmarks.estimation_quality_stream import (
    PLAN,
    SEL_CACHED,
    SEL_MEASURED,
    curve_of,
    ema_weight_ratio,
    refreshes_by,
)
from fisher_optim.selection import COST_TIE

#: budgets from this fraction of T on count in the regret summary (below it auto's first selection dominates)
REGRET_FROM = 0.1
TAU = 0.1  # fixed-schedule rule (not implemented in select): label noise at most TAU times the input noise


# -- predictions -------------------------------------------------------------------------------------------------
def predicted_error(ref: dict, names: list[str], cfg: Config, k: int, n_samples: float, label: str,
                    with_input: bool) -> np.ndarray:  # fmt: skip
    """Per tensor predicted RMS relative error after ``k`` refreshes (see the module docstring)."""
    m, P = cfg.m, ref["P"]
    fpc = (P - m) / (P - 1)
    q = ema_weight_ratio(cfg.defaults["beta2"], k)
    out = []
    for n in names:
        r = ref["per"][n]
        lab = 0.0 if n_samples == math.inf else r[label] / n_samples
        out.append(math.sqrt(q * ((fpc * r["A"] if with_input else 0.0) + lab) / m) / r["norm_F"])
    return np.array(out)


def break_even(ref: dict, names: list[str], n: int, m: int) -> list[float]:
    """Per tensor the cost ratio c_exact / c_mc1(N) above which Î₁ with N samples beats exact at equal time before
    the EMA plateau: there error² ∝ cost × (c_M A + L₁/N), so the break-even is 1 + L₁/(N c_M A)."""
    fpc = (ref["P"] - m) / (ref["P"] - 1)
    return [1.0 + ref["per"][nm]["L1"] / (n * fpc * ref["per"][nm]["A"]) for nm in names]


def rule_choices(ref: dict, names: list[str], costs: dict, cfg: Config) -> dict[str, tuple[str, str]]:
    """Per tensor, what two rules choose from the full-data A, L₁ and the measured mean CPU costs of whole calls
    (mc1 cost linear in N through the measured N=1 and N=4 costs), without ``select``'s ``target_rse`` floor on N:

    * equal time (the rule ``select`` applies, tie margin ``COST_TIE`` included): the Î₁ with N = 1..max_samples
      minimising cost × (c_M A + L₁/N), if that beats exact's cost × c_M A by more than the tie margin; else exact;
    * fixed schedule (not implemented): the cheapest Î₁ with L₁/N ≤ TAU c_M A, if cheaper than exact; else exact.
    """
    c_ex = costs["exact"]["cpu"]
    c1, c4 = costs["mc1 N=1"]["cpu"], costs["mc1 N=4"]["cpu"]

    def c_n(n: int) -> float:
        return c1 + (n - 1) * (c4 - c1) / 3

    fpc = (ref["P"] - cfg.m) / (ref["P"] - 1)
    n_max = cfg.defaults["max_samples"]
    out = {}
    for nm in names:
        a, l1 = fpc * ref["per"][nm]["A"], ref["per"][nm]["L1"]
        best, score = None, math.inf
        for n in range(1, n_max + 1):
            if c_n(n) * (a + l1 / n) < score:
                best, score = f"mc1 N={n}", c_n(n) * (a + l1 / n)
        equal_time = best if score * (1.0 + COST_TIE) < c_ex * a else "exact N=1"
        need = max(1, math.ceil(l1 / (TAU * a))) if a > 0 else n_max + 1
        fixed = f"mc1 N={need}" if need <= n_max and c_n(need) < c_ex else "exact N=1"
        out[nm] = (equal_time, fixed)
    return out


# -- summaries ---------------------------------------------------------------------------------------------------
def summarise(res: dict, clock: str = "wall") -> list[dict]:
    """Per checkpoint: curves on a common grid of budget fractions and the table values at ``cfg.fractions``.

    A fraction ``f`` means ``f`` times the stream's own budget ``T`` (the exact strategy's time for ``k_exact``
    refreshes on that clock); values are averaged over the streams at equal ``f`` and shown at ``f`` times the
    mean ``T``."""
    cfg = res["config"]
    rows = []
    for ck in res["checkpoints"]:
        streams = ck["streams"]
        Ts = [st["T"][clock] for st in streams]
        first = min(float(st["traces"][c].cum(clock)[0]) / st["T"][clock] for st in streams for c in cfg.curves)
        grid = np.geomspace(0.5 * first, 1.0, 200)
        fr = np.array(cfg.fractions)
        curves, table, layers, counts = {}, {}, {}, {}
        for c in cfg.curves:
            trs = [st["traces"][c] for st in streams]
            for which in cfg.references:
                g = [curve_of(tr, clock, which, grid * T).mean(1) for tr, T in zip(trs, Ts)]
                curves[(c, which)] = np.mean(g, axis=0)
                t = [curve_of(tr, clock, which, fr * T) for tr, T in zip(trs, Ts)]
                table[(c, which)] = np.mean([v.mean(1) for v in t], axis=0)
                table[(c, which, "sd")] = np.std([v.mean(1) for v in t], axis=0)
                layers[(c, which)] = np.mean([v[-1] for v in t], axis=0)
            counts[c] = [statistics.median(refreshes_by(tr, clock, f * T) for tr, T in zip(trs, Ts)) for f in fr]
        T = statistics.mean(Ts)
        rows.append({"epoch": ck["epoch"], "T": T, "grid": grid * T, "at": fr * T, "curves": curves, "table": table,
                     "layers": layers, "counts": counts})  # fmt: skip
    return rows


def errors_at_refresh(ck: dict, cfg: Config, ks: tuple[int, ...]) -> dict[str, list[float]]:
    """Full-data error (mean over tensors and streams) after ``k`` refreshes, whatever their time (nan where a
    stream did not get that far)."""
    out = {}
    for s in cfg.curves:
        vals = []
        for k in ks:
            trs = [st["traces"][s] for st in ck["streams"]]
            vals.append(float(np.mean([tr.err_full[k - 1].mean() for tr in trs])) if all(
                tr.refreshes >= k for tr in trs) else math.nan)  # fmt: skip
        out[s] = vals
    return out


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def cost_summary(ck: dict, cfg: Config) -> dict[str, dict[str, float]]:
    """Seconds per refresh pooled over the streams: mean and median wall, mean CPU; for auto also per kind of
    refresh (plan, selection with measured or cached costs) and the selections' share of its time."""
    out = {}
    for s in cfg.curves:
        trs = [st["traces"][s] for st in ck["streams"]]
        wall = [w for tr in trs for w in tr.wall]
        cpu = [c for tr in trs for c in tr.cpu]
        row = {"wall": statistics.mean(wall), "wall_median": statistics.median(wall), "cpu": statistics.mean(cpu)}
        if s == AUTO:
            by = {kd: [(w, c) for tr in trs for w, c, k in zip(tr.wall, tr.cpu, tr.kind) if k == kd]
                  for kd in (PLAN, SEL_MEASURED, SEL_CACHED)}  # fmt: skip
            sel = by[SEL_MEASURED] + by[SEL_CACHED]
            for kd, key in ((PLAN, "plan"), (SEL_MEASURED, "sel_measured"), (SEL_CACHED, "sel_cached")):
                row[f"{key}_wall"] = _mean([w for w, _ in by[kd]])
                row[f"{key}_cpu"] = _mean([c for _, c in by[kd]])
                row[f"{key}_n"] = len(by[kd])
            row["sel_share"] = sum(w for w, _ in sel) / sum(wall)
            row["sel_share_cpu"] = sum(c for _, c in sel) / sum(cpu)
        out[s] = row
    return out


def auto_choices(ck: dict, names: list[str]) -> dict[str, dict]:
    """Per tensor: how often each (estimator, N) was chosen, the mean predicted rse and one-sample rse."""
    sels = [sel for st in ck["streams"] for sel in st["selections"]]
    out = {}
    for n in names:
        cnt = Counter(f"{s[n]['estimator']} N={s[n]['n_samples']}" for s in sels)
        out[n] = {
            "choices": ", ".join(f"{k} ({v}/{len(sels)})" for k, v in cnt.most_common()),
            "top": cnt.most_common(1)[0][0],
            "rse": statistics.mean(s[n]["rse"] for s in sels),
            "rse_mc1": statistics.mean(s[n]["rse_mc1"] for s in sels),
            "cost_us": 1e6 * statistics.mean(s[n]["cost"] for s in sels),
        }
    return out


# -- verdicts and regrets ----------------------------------------------------------------------------------------
def verdicts(rows: list[dict], cfg: Config) -> list[dict]:
    """Per checkpoint and budget: the best fixed strategy and auto's error (full-data reference)."""
    out = []
    for r in rows:
        for j, frac in enumerate(cfg.fractions):
            fixed = {s: float(r["table"][(s, "full")][j]) for s in cfg.fixed}
            best = min(fixed, key=fixed.get)
            out.append({"epoch": r["epoch"], "frac": frac, "t": float(r["at"][j]), "best": best,
                        "best_err": fixed[best], "auto": float(r["table"][(AUTO, "full")][j])})  # fmt: skip
    return out


def regrets(rows: list[dict], cfg: Config) -> dict[str, dict[str, float]]:
    """Per strategy, its error over the best fixed strategy's error in every (checkpoint, budget) cell (full-data
    reference): the worst and the median over the cells with a budget of at least ``REGRET_FROM`` T, and the worst
    over all cells.  A strategy that is the best fixed one in a cell scores 1 there; auto can score below 1."""
    out = {}
    for s in cfg.curves:
        late, every = [], []
        for r in rows:
            for j, frac in enumerate(cfg.fractions):
                best = min(float(r["table"][(f, "full")][j]) for f in cfg.fixed)
                ratio = float(r["table"][(s, "full")][j]) / best
                every.append(ratio)
                if frac >= REGRET_FROM:
                    late.append(ratio)
        out[s] = {"worst": max(late), "median": statistics.median(late), "worst_all": max(every)}
    return out


def grid_ratios(rows: list[dict], cfg: Config, from_frac: float = REGRET_FROM) -> dict[str, np.ndarray]:
    """Per strategy, its error over the best fixed strategy's error at every point of the summaries' dense time
    grid from ``from_frac`` T on, all checkpoints concatenated (full-data reference): the curve form of
    :func:`regrets`."""
    out = {s: [] for s in cfg.curves}
    for r in rows:
        keep = r["grid"] >= from_frac * r["T"] * (1 - 1e-12)
        best = np.min([r["curves"][(f, "full")][keep] for f in cfg.fixed], axis=0)
        for s in cfg.curves:
            out[s].append(r["curves"][(s, "full")][keep] / best)
    return {s: np.concatenate(v) for s, v in out.items()}


def goal_c(rows: list[dict], cfg: Config) -> dict:
    """Issue 14's goal (c) on this problem: is auto's error below every fixed choice's at every point of the dense
    time grid from ``REGRET_FROM`` T on (wall clock)?  ``worst``: the largest ratio of auto's error to the best fixed
    one's there; ``first_win``: the fraction of T from which auto stays below it at every checkpoint (inf: not even
    at T)."""
    worst = float(grid_ratios(rows, cfg)[AUTO].max())
    return {"holds": worst < 1.0, "worst": worst, "first_win": max(first_win(r, cfg) for r in rows)}


def first_win(r: dict, cfg: Config) -> float:
    """The smallest fraction of T from which auto's error stays below the best fixed one's on a summary row's grid
    (inf: auto is not below it at T)."""
    above = np.flatnonzero(r["curves"][(AUTO, "full")] >= min_fixed(r, cfg))
    if not len(above):
        return float(r["grid"][0] / r["T"])
    if above[-1] == len(r["grid"]) - 1:
        return math.inf
    return float(r["grid"][above[-1] + 1] / r["T"])


def min_fixed(r: dict, cfg: Config) -> np.ndarray:
    """The best fixed strategy's error on the dense time grid of a summary row."""
    return np.min([r["curves"][(f, "full")] for f in cfg.fixed], axis=0)
