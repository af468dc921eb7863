"""Auto selection on the char-level Transformer LM (issue 14 part 6, a first measurement).

Exact is infeasible at full size, so the reference is the exact Fisher of a small *validation subset*
(``--batch`` windows of ``--seq-len`` characters; one seed per position x class); every estimator is measured
against it on that same subset, so the numbers are label/probe noise only (no input noise).  For each choice --
exact, Î₁ and Hutchinson with N=1 and N=8, hutchinson_batch N=1, and auto's plan (``run_selection`` with measured
costs; past ``CLOSED_FORM_SEEDS`` seeds per input its statistics come from per-probe draws, no exact pass) -- the
estimates of
repeated refreshes are averaged for a wall-time budget of ``--budget`` exact refreshes, and the relative L2 error of
the average (mean over tensors) is reported, with the regret of auto against the best fixed choice; auto is
reported with and without its selection's time charged to its budget.

Then the time per optimizer step on the LM (``--step-batch`` windows, 1 thread): AdamW, FisherAdam(mc1) and
FisherAdam(auto), default settings (a refresh every 10 steps; auto's first refresh Hutchinson N=1, its first
selection at the second refresh).

    OMP_NUM_THREADS=1 python benchmarks/auto_lm.py [--steps 150] [--budget 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.lm_data import VOCAB_SIZE, char_transformer, windows
from fisher_optim import FisherAdam, diagonal_fisher
from fisher_optim.selection import estimate_plan, run_selection


def rel_err(est, ref):
    errs = [((est[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref if ref[n].norm() > 0]
    return sum(errs) / len(errs)


def step_times(batch: int, seq_len: int, n_steps: int) -> list[tuple[str, float, float, str]]:
    """``(label, steady-state ms/step, first step ms, selection step ms)`` for AdamW, FisherAdam(mc1) and
    FisherAdam(auto) (default settings, a refresh every 10 steps) on the same windows."""
    out = []
    for label in ("AdamW", "FisherAdam(mc1)", "FisherAdam(auto)"):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model = char_transformer(d_model=32, n_heads=4, n_layers=2, max_len=seq_len)
        if label == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        else:
            opt = FisherAdam(model, lr=3e-3, estimator="mc1" if "mc1" in label else "auto", seed=0)
        ts = []
        for _ in range(n_steps):
            x, y = windows("train", batch, seq_len, generator=g)
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        steady = ts[11:]
        sel_ms = f"{1e3 * ts[10]:.0f}" if "auto" in label else "-"
        out.append((label, 1e3 * sum(steady) / len(steady), 1e3 * ts[0], sel_ms))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--budget", type=float, default=3.0, help="wall time in exact refreshes")
    ap.add_argument("--reps", type=int, default=3, help="runs per sampled choice (label/probe streams)")
    ap.add_argument("--step-batch", type=int, default=16)
    ap.add_argument("--step-count", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = char_transformer(d_model=32, n_heads=4, n_layers=2, max_len=args.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.steps):  # a little training, so the softmax is confident on frequent characters
        x, y = windows("train", 16, args.seq_len, generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    xv, _ = windows("validation", args.batch, args.seq_len, generator=g)
    names = [n for n, p in model.named_parameters()]
    t0 = time.perf_counter()
    ref = diagonal_fisher(model, xv, likelihood="categorical", estimator="exact")
    t_ex = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = run_selection(model, xv, likelihood="categorical", cost_model="measured", target_rse=0.3,
                        generator=torch.Generator().manual_seed(2))  # fmt: skip
    t_sel = time.perf_counter() - t0
    sel_cf = run_selection(model, xv, likelihood="categorical", cost_model="measured", target_rse=0.3,
                           closed_form_seeds=10**9)  # fmt: skip
    auto_plan = {n: (c.estimator, c.n_samples) for n, c in sel.choices.items()}
    plans = {
        "exact": {n: ("exact", 1) for n in names},
        "mc1 N=1": {n: ("mc1", 1) for n in names},
        "hutchinson N=1": {n: ("hutchinson", 1) for n in names},
        "hutchinson_batch N=1": {n: ("hutchinson_batch", 1) for n in names},
        "mc1 N=8": {n: ("mc1", 8) for n in names},  # more samples per forward pass: the per-call cost amortised
        "hutchinson N=8": {n: ("hutchinson", 8) for n in names},
        "auto": auto_plan,
        "auto (selection time charged)": auto_plan,
    }
    budget = args.budget * t_ex
    rows = []
    for label, plan in plans.items():
        ks, times, errs = [], [], []
        for rep in range(1 if label == "exact" else args.reps):  # label/probe streams 1, 2, ...: the same per choice
            gen = torch.Generator().manual_seed(1 + rep)
            acc, k, spent = None, 0, t_sel if label.startswith("auto (") else 0.0
            while spent < budget or k == 0:
                t0 = time.perf_counter()
                est = estimate_plan(model, xv, likelihood="categorical", plan=plan, generator=gen)
                spent += time.perf_counter() - t0
                acc = est if acc is None else {n: acc[n] + est[n] for n in est}
                k += 1
                if label == "exact":
                    break
            ks.append(k)
            times.append(spent)
            errs.append(rel_err({n: acc[n] / k for n in acc}, ref))
        rms = (sum(e * e for e in errs) / len(errs)) ** 0.5
        rows.append((label, sum(ks) / len(ks), sum(times) / len(times), rms, min(errs), max(errs)))
    best_fixed = min(r[3] for r in rows if not r[0].startswith("auto") and r[0] != "exact")
    best_any = min(r[3] for r in rows if not r[0].startswith("auto"))
    auto_err = next(r[3] for r in rows if r[0] == "auto")
    auto_charged = next(r[3] for r in rows if r[0].startswith("auto ("))
    steps = step_times(args.step_batch, args.seq_len, args.step_count)
    lines = [
        "# Auto on the char Transformer LM (validation subset reference)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python {' '.join(['benchmarks/auto_lm.py', *sys.argv[1:]])}`",
        "",
        f"Model: char_transformer(d=32, 2 layers, 4 heads), {args.steps} AdamW steps; subset {args.batch} "
        f"windows x {args.seq_len} chars, {args.seq_len * VOCAB_SIZE} seeds per input.  "
        "Reference: the exact Fisher of the subset (sampling noise only).  "
        f"Budget {args.budget:g} exact refreshes = {budget * 1e3:.0f} ms wall (1 CPU thread);"
        " exact gets one refresh (zero error) at 1x budget.",
        "",
        f"Each sampled choice is run {args.reps} times (label/probe streams 1..{args.reps}, the same for every "
        "choice): mean refreshes and time per run, the root mean square of the runs' relative errors, and their range.",
        "",
        "| choice | refreshes | time (ms) | rel. error of the average (RMS over runs) | min - max |",
        "|---|---|---|---|---|",
        *[f"| {lab} | {k:.0f} | {1e3 * s:.0f} | {e:.3g} | {lo:.3g} - {hi:.3g} |" for lab, k, s, e, lo, hi in rows],
        "",
        f"Auto's regret vs the best sampled fixed choice: {auto_err / best_fixed:.3g}x "
        f"({auto_charged / best_fixed:.3g}x with its selection's {1e3 * t_sel:.0f} ms charged); vs the best of all "
        f"fixed choices (exact included): {auto_err / best_any if best_any > 0 else float('inf'):.3g}x.",
        "",
        "Auto's plan (per layer: estimator, N, predicted rse, variance source; the last column: the plan and source "
        "with the closed-form moments, which cost an exact pass here):",
        "",
        f"Summary: {sel.summary}",
        "",
        f"Closed-form summary: {sel_cf.summary}",
        "",
        "| parameter | estimator | N | predicted rse | source | with closed-form moments |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {c.estimator} | {c.n_samples} | {c.rse:.3g} | {c.source} | {sel_cf.choices[n].estimator} "
          f"N={sel_cf.choices[n].n_samples} ({sel_cf.choices[n].source}) |" for n, c in sel.choices.items()],
        "",
        f"## Time per optimizer step ({args.step_batch} windows x {args.seq_len} chars, 1 thread, "
        f"{args.step_count} steps)",
        "",
        "Steady state: the mean over the steps after step 11 (auto's first selection is the second refresh, step 11); "
        "first: the first step (auto: its Hutchinson N=1 refresh); selection: auto's first selection step (measures "
        "costs, 8 probes per input).",
        "",
        "| optimizer | steady-state mean (ms/step) | first step (ms) | selection step (ms) |",
        "|---|---|---|---|",
        *[f"| {lab} | {mean:.1f} | {first:.0f} | {sel_ms} |" for lab, mean, first, sel_ms in steps],
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_lm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
