r"""Regret of auto and of every fixed estimator across the estimation-quality problems (issue 14, goal c).

Reads the results that ``benchmarks/estimation_quality.py`` saves (``--json``; by default
``benchmarks/results/estimation_quality{,_autoencoder,_cnn,_lm}.json``) and writes
``benchmarks/results/estimation_regret.md``:

* per problem and strategy, the ratio of its error (full-data reference, mean over tensors) to the best fixed
  strategy's error at equal estimation time, on the dense time grid of each checkpoint's summary (fractions of the
  stream budget T, errors averaged over the streams at equal fraction), worst case over every checkpoint and every
  time ``t >= 0.1 T``;
* per strategy, its regret across the problems: the worst of those ratios over the problems it ran on (the fixed
  strategies differ between problems; auto ran on all of them);
* whether goal (c) holds: on the LM, the autoencoder and the CNN auto's error is below every fixed choice's from
  0.1 T on (worst ratio < 1), and across all four problems auto has the lowest regret; where it falls short, the
  checkpoint, the time and the fixed strategy that beats it, and auto's selection costs there.

The best fixed strategy is chosen per problem among that problem's fixed strategies, pointwise in time (as in each
problem's report).  Usage::

    python benchmarks/estimation_regret.py [RESULT.json ...] [--out benchmarks/results/estimation_regret.md]
        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = [RESULTS / f"estimation_quality{s}.json" for s in ("", "_autoencoder", "_cnn", "_lm")]
#: the problems on which goal (c) asks auto to be below every fixed choice (the MLP only counts in the regret)
GOAL_PROBLEMS = ("lm", "autoencoder", "cnn")


def g3(x: float) -> str:
    return f"{x:.3g}"


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def ratios(res: dict, clock: str = "wall") -> dict:
    """Per strategy: the worst ratio to the best fixed error from ``regret_from`` T on, and where it occurs
    (checkpoint, fraction of T, the best fixed strategy there); for auto also the fraction of T from which it stays
    below every fixed choice at every checkpoint (inf: not at T)."""
    fixed, auto, start = res["fixed"], res["auto"], float(res["regret_from"])
    out = {s: {"worst": -np.inf} for s in [*fixed, auto]}
    first_win = 0.0
    for ck in res[clock]:
        frac = np.asarray(ck["grid_frac"])
        curves = {s: np.asarray(ck["curves"][s], dtype=float) for s in [*fixed, auto]}
        stack = np.stack([curves[f] for f in fixed])
        best, arg = stack.min(axis=0), stack.argmin(axis=0)
        keep = np.flatnonzero(frac >= start * (1 - 1e-12))
        for s, cur in curves.items():
            r = cur[keep] / best[keep]
            j = int(np.argmax(r))
            if r[j] > out[s]["worst"]:
                out[s] = {"worst": float(r[j]), "epoch": ck["epoch"], "frac": float(frac[keep][j]),
                          "best": fixed[int(arg[keep][j])], "best_err": float(best[keep][j]),
                          "err": float(cur[keep][j])}  # fmt: skip
        above = np.flatnonzero(curves[auto] >= best)
        if len(above) and above[-1] == len(frac) - 1:
            first_win = np.inf
        elif len(above):
            first_win = max(first_win, float(frac[above[-1] + 1]))
        else:
            first_win = max(first_win, float(frac[0]))
    out[auto]["first_win"] = first_win
    return out


def auto_detail(res: dict, epoch) -> dict:
    return next((a for a in res.get("auto_detail", []) if a["epoch"] == epoch), {})


def regret_table(results: list[dict], per: list[dict]) -> tuple[list[str], dict]:
    """The per-problem ratio table and, per strategy, its regret (worst over the problems it ran on)."""
    strategies = []
    for res in results:
        strategies += [s for s in [*res["fixed"], res["auto"]] if s not in strategies]
    auto = results[0]["auto"]
    strategies = [s for s in strategies if s != auto] + [auto]
    probs = [res["problem"] for res in results]
    lines = ["| strategy | " + " | ".join(probs) + " | regret (worst over the problems it ran on) | problems |",
             "|---" * (len(probs) + 3) + "|"]  # fmt: skip
    regret = {}
    for s in strategies:
        vals = [p[s]["worst"] if s in p else None for p in per]
        ran = [v for v in vals if v is not None]
        regret[s] = {"worst": max(ran), "n": len(ran), "all": len(ran) == len(results)}
        cells = [f"{g3(v)}×" if v is not None else "–" for v in vals]
        name = f"**{s}**" if s == auto else s
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {g3(regret[s]['worst'])}× | {len(ran)} of "
                     f"{len(results)} |")  # fmt: skip
    return lines, regret


def goal_lines(results: list[dict], per: list[dict], regret: dict) -> list[str]:
    """The verdict on goal (c), its two parts, and where it falls short."""
    auto = results[0]["auto"]
    by = {res["problem"]: (res, p) for res, p in zip(results, per)}
    lines, part1 = [], True
    for prob in GOAL_PROBLEMS:
        if prob not in by:
            lines.append(f"- {prob}: no results given.")
            part1 = False
            continue
        res, p = by[prob]
        a = p[auto]
        ok = a["worst"] < 1.0
        part1 &= ok
        fw = a["first_win"]
        text = (f"- **{prob}**: {'below' if ok else 'not below'} every fixed choice from {res['regret_from']:g} T on "
                f"(worst ratio {g3(a['worst'])}× at epoch {a['epoch']}, {g3(a['frac'])} T, against {a['best']}: "
                f"{g3(a['err'])} vs {g3(a['best_err'])}); ")  # fmt: skip
        text += (f"auto stays below every fixed choice from {g3(fw)} T on." if np.isfinite(fw)
                 else "auto is not below every fixed choice at T.")  # fmt: skip
        text += " At T: " + ", ".join(at_budget(res)) + "."
        if not ok:
            text += " " + why(res, a)
        lines.append(text)
    others = {s: v for s, v in regret.items() if s != auto}
    same = {s: same_problems(per, auto, s) for s in others}
    part2 = all(same[s] < others[s]["worst"] for s in others)
    lines.append(
        f"- **Regret across the {len(results)} problems**: auto {g3(regret[auto]['worst'])}×. Against each fixed "
        "strategy on the problems that strategy ran on (its regret vs auto's worst ratio there): "
        + "; ".join(f"{s} {g3(others[s]['worst'])}× vs auto {g3(same[s])}× ({others[s]['n']} of {len(results)})"
                    for s in sorted(others, key=lambda s: others[s]["worst"]))
        + f". Auto's regret is {'the lowest against every one' if part2 else 'not the lowest'}"
        + ("" if part2 else " (higher than " + ", ".join(s for s in others if same[s] >= others[s]["worst"]) + ")")
        + "."
    )  # fmt: skip
    verdict = "holds" if part1 and part2 else "does not hold"
    short = []
    if not part1:
        short.append("auto is not below every fixed choice from 0.1 T on on " + ", ".join(
            p for p in GOAL_PROBLEMS if p in by and by[p][1][auto]["worst"] >= 1.0))  # fmt: skip
    if not part2:
        short.append("auto's worst-case ratio to the best fixed choice is not the lowest")
    head = f"**Goal (c) {verdict}.**" + (" Where it falls short: " + "; ".join(short) + "." if short else "")
    worst_at = [by[p][1][auto]["frac"] for p in GOAL_PROBLEMS if p in by and by[p][1][auto]["worst"] >= 1.0]
    if worst_at:
        at_t = [float(x.split("×")[0]) for p in GOAL_PROBLEMS if p in by for x in at_budget(by[p][0])]
        shares = [selection_share(by[p][0], by[p][1][auto]["epoch"]) for p in GOAL_PROBLEMS
                  if p in by and by[p][1][auto]["worst"] >= 1.0]
        head += (f" Auto's worst case is at {g3(min(worst_at))}–{g3(max(worst_at))} T, the start of the window, "
                 "where one selection with measured costs alone takes "
                 + "–".join(f"{100 * v:.0f} %" for v in sorted({min(shares), max(shares)}))
                 + f" of the {results[0]['regret_from']:g} T budget (CPU clock); at T its error is "
                 f"{g3(min(at_t))}–{g3(max(at_t))}× the best fixed choice's on these problems.")  # fmt: skip
    return [head, "", *lines]


def same_problems(per: list[dict], auto: str, s: str) -> float:
    """Auto's worst ratio over the problems on which strategy ``s`` ran."""
    return max(p[auto]["worst"] for p in per if s in p)


def at_budget(res: dict, clock: str = "wall") -> list[str]:
    """Auto's error over the best fixed error at the full budget T, per checkpoint."""
    out = []
    for ck in res[clock]:
        best = min(ck["table"][f][-1] for f in res["fixed"])
        out.append(f"{g3(ck['table'][res['auto']][-1] / best)}× (epoch {ck['epoch']})")
    return out


def selection_share(res: dict, epoch) -> float:
    """One selection with measured costs (CPU seconds) over the ``regret_from`` T budget (CPU clock) at a checkpoint."""
    d = auto_detail(res, epoch)
    ck = next(c for c in res["cpu"] if c["epoch"] == epoch)
    return d["sel_measured_cpu_s"] / (float(res["regret_from"]) * ck["T"]) if d else float("nan")


def why(res: dict, a: dict) -> str:
    """Auto's selection costs at the checkpoint where it does worst (from the saved results)."""
    d = auto_detail(res, a["epoch"])
    if not d:
        return ""
    cpu = d["cpu_s_per_refresh"]
    cheapest = min((s for s in cpu if s != res["auto"]), key=cpu.get)
    top = ", ".join(f"{k} {v}×" for k, v in list(d["choices"].items())[:3])
    share = selection_share(res, a["epoch"])
    return (f"A selection with measured costs (its cost timing included) is {100 * share:.0f} % of the "
            f"{res['regret_from']:g} T budget there (CPU clock). "
            f"At that checkpoint auto made {g3(d['selections_per_stream'])} selections per stream, "
            f"{100 * d['sel_share_cpu']:.0f} % of its CPU time; a selection with measured costs took "
            f"{g3(1e3 * d['sel_measured_cpu_s'])} ms, {g3(d['sel_measured_cpu_s'] / cpu[cheapest])} refreshes of the "
            f"cheapest fixed strategy ({cheapest}); its choices (tensors × selections): {top}.")  # fmt: skip


def write(results: list[dict], paths: list[Path], out: Path, command: str, clock: str) -> dict:
    per = [ratios(res, clock) for res in results]
    table, regret = regret_table(results, per)
    frm = results[0]["regret_from"]
    lines = [
        "# Regret across the estimation-quality problems: auto vs fixed estimators (issue 14, goal c)",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()} from the saved results of:",
        "",
        *[f"- `{res['command']}` ({res['problem']}: {res['model']}; {res['seconds']:.0f} s; machine: "
          f"{res['machine']})" for res in results],  # fmt: skip
        "",
        "Every number below is computed by `benchmarks/estimation_regret.py` from those files "
        f"({', '.join(f'`{p}`' for p in paths)}).",
        "",
        "## Goal (c)",
        "",
        *goal_lines(results, per, regret),
        "",
        "## Ratio to the best fixed choice at equal estimation time",
        "",
        f"Per problem and strategy: the worst, over every checkpoint and every time t ≥ {frm:g} T of the dense time "
        f"grid ({clock} clock), of its error (full-data reference, mean over tensors, averaged over the streams at "
        "equal fraction of each stream's budget T) over the best fixed strategy's error at the same time (the best "
        "among that problem's fixed strategies, pointwise). A fixed strategy scores at least 1× (1×: it is the best "
        "fixed one at every such time); auto can score below 1×: below every fixed choice at every such time. "
        "–: not run on that problem. Regret: the worst over the problems the strategy ran on.",
        "",
        *table,
        "",
        "Where each worst case occurs (checkpoint epoch, fraction of T, the best fixed strategy there):",
        "",
        "| problem | strategy | worst ratio | epoch | t / T | best fixed there |",
        "|---|---|---|---|---|---|",
    ]
    for res, p in zip(results, per):
        for s, v in p.items():
            lines.append(f"| {res['problem']} | {s} | {g3(v['worst'])}× | {v['epoch']} | {g3(v['frac'])} | "
                         f"{v['best']} |")  # fmt: skip
    lines += [
        "",
        "Notes: the fixed strategies differ between problems (exact is not a streaming strategy on the LM, whose "
        "reference is the exact Fisher of a pool of held-out windows; Hutchinson and mc1 N=8 run on the LM only), "
        "so a fixed strategy's regret covers only the problems it ran on. The budgets T differ too: on the MNIST "
        "problems T is a number of exact refreshes, on the LM a number of mc1 N=1 refreshes (each report's Setup).",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return {"per": per, "regret": regret}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="saved results (default: the four in "
                        "benchmarks/results)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "estimation_regret.md")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    paths = args.results or DEFAULT
    results = [load(p) for p in paths]
    command = shlex.join(["python", "benchmarks/estimation_regret.py", *argv])
    shown = [p.relative_to(RESULTS.parents[1]) if p.resolve().is_relative_to(RESULTS.parents[1]) else p
             for p in (Path(q).resolve() for q in paths)]  # fmt: skip
    out = write(results, shown, args.out, command, args.clock)
    print(f"wrote {args.out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
