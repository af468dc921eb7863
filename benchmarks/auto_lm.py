"""Auto selection on the char-level Transformer LM (issue 14 part 6, a first measurement).

Exact is infeasible at full size, so the reference is the exact Fisher of a small *validation subset*
(``--batch`` windows of ``--seq-len`` characters; one seed per position x class); every estimator is measured
against it on that same subset, so the numbers are label/probe noise only (no input noise).  For each choice --
exact, Î₁ N=1, Hutchinson N=1, hutchinson_batch N=1, and auto's plan (``run_selection``, flops costs) -- the
estimates of repeated refreshes are averaged for a wall-time budget of ``--budget`` exact refreshes, and the
relative L2 error of the average (mean over tensors) is reported, with the regret of auto against the best fixed
choice.

    OMP_NUM_THREADS=1 python benchmarks/auto_lm.py [--steps 150] [--budget 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.lm_data import VOCAB_SIZE, char_transformer, windows
from fisher_optim import diagonal_fisher
from fisher_optim.selection import estimate_plan, run_selection


def rel_err(est, ref):
    errs = [((est[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref if ref[n].norm() > 0]
    return sum(errs) / len(errs)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--budget", type=float, default=3.0, help="wall time in exact refreshes")
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
    sel = run_selection(model, xv, likelihood="categorical", cost_model="flops", target_rse=0.3)
    sel_b = run_selection(model, xv, likelihood="categorical", cost_model="flops", target_rse=0.3,
                          closed_form_seeds=1)  # fmt: skip
    auto_plan = {n: (c.estimator, c.n_samples) for n, c in sel.choices.items()}
    plans = {
        "exact": {n: ("exact", 1) for n in names},
        "mc1 N=1": {n: ("mc1", 1) for n in names},
        "hutchinson N=1": {n: ("hutchinson", 1) for n in names},
        "hutchinson_batch N=1": {n: ("hutchinson_batch", 1) for n in names},
        "auto": auto_plan,
    }
    budget = args.budget * t_ex
    rows = []
    for label, plan in plans.items():
        gen = torch.Generator().manual_seed(1)
        acc, k, spent = None, 0, 0.0
        while spent < budget or k == 0:
            t0 = time.perf_counter()
            est = estimate_plan(model, xv, likelihood="categorical", plan=plan, generator=gen)
            spent += time.perf_counter() - t0
            acc = est if acc is None else {n: acc[n] + est[n] for n in est}
            k += 1
            if label == "exact":
                break
        avg = {n: acc[n] / k for n in acc}
        rows.append((label, k, spent, rel_err(avg, ref)))
    best_fixed = min(r[3] for r in rows if r[0] not in ("auto", "exact"))
    best_any = min(r[3] for r in rows if r[0] != "auto")
    auto_err = next(r[3] for r in rows if r[0] == "auto")
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
        "| choice | refreshes | time (ms) | rel. error of the average |",
        "|---|---|---|---|",
        *[f"| {lab} | {k} | {1e3 * s:.0f} | {e:.3g} |" for lab, k, s, e in rows],
        "",
        f"Auto's regret vs the best sampled fixed choice: {auto_err / best_fixed:.3g}x; vs the best of all fixed "
        f"choices (exact included): {auto_err / best_any if best_any > 0 else float('inf'):.3g}x.",
        "",
        "Auto's plan (per layer: estimator, N, predicted rse, variance source, reason):",
        "",
        f"Summary: {sel.summary}",
        "",
        "| parameter | estimator | N | predicted rse | source | source with closed_form_seeds=1 |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {c.estimator} | {c.n_samples} | {c.rse:.3g} | {c.source} | {sel_b.choices[n].source} "
          f"({sel_b.choices[n].estimator} N={sel_b.choices[n].n_samples}) |" for n, c in sel.choices.items()],
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_lm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
