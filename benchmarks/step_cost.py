r"""Where a Fisher optimizer's training step spends its time, next to AdamW's, on problems of the optimizer suite.

For each problem, each optimizer trains ``--steps`` steps (default 200) at its default settings on random
mini-batches of the suite's data (``benchmarks.optimizers_problems``), and every step is timed in two parts:
forward + backward (which include the Fisher optimizers' input-capture hooks) and ``opt.step()``.  The Fisher
optimizers' steps are split by kind from their public schedule (``opt.schedule``): plain steps, refresh steps (an
estimation pass) and selection steps (auto mode's per-layer choice, with its variance pass and, on a new input
shape, cost timing).  The table gives the total of each part in milliseconds and the ratio of the whole to AdamW's:
what the suite's "per-step cost x AdamW" is made of.  One thread, one run per optimizer and problem; absolute
times depend on the machine's load.

Usage::

    python -m benchmarks.step_cost                                   # benchmarks/results/step_cost.md
    python -m benchmarks.step_cost --problems logreg --steps 20 --out ''   # a quick look, no file
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info  # noqa: E402
from benchmarks.optimizers_problems import make_problems  # noqa: E402
from fisher_optim.likelihoods import get_likelihood  # noqa: E402
from fisher_optim.optim import FisherAdam, ScheduleFreeFisherAdam  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_cost.md"
PROBLEMS = ("logreg", "mlp_relu", "cnn", "autoencoder", "lm_transformer", "lm_lstm")
OPTIMIZERS = {
    "AdamW": lambda m, lik: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "FisherAdam": lambda m, lik: FisherAdam(m, likelihood=lik),
    "ScheduleFreeFisherAdam": lambda m, lik: ScheduleFreeFisherAdam(m, likelihood=lik),
}


def run(prob, data, name: str, steps: int, seed: int = 0) -> dict:
    lik = get_likelihood(prob.likelihood)
    torch.manual_seed(seed)
    model = prob.model()
    opt = OPTIMIZERS[name](model, prob.likelihood)
    g = torch.Generator().manual_seed(seed)
    parts = {"fwd+bwd": 0.0, "plain": 0.0, "refresh": 0.0, "select": 0.0}
    counts = {"plain": 0, "refresh": 0, "select": 0}
    fb = []
    for _ in range(steps):
        idx = torch.randint(0, len(data.x_train), (prob.batch_size,), generator=g)
        x, y = data.x_train[idx], data.y_train[idx]
        t0 = time.perf_counter()
        lik.nll(lik.flatten(model(x)), y).mean().backward()
        t1 = time.perf_counter()
        sch = getattr(opt, "schedule", None)
        r0, s0 = (sch.refreshes, sch.selections) if sch is not None else (0, 0)
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        kind = "plain"
        if sch is not None:
            kind = "select" if sch.selections > s0 else "refresh" if sch.refreshes > r0 else "plain"
        parts["fwd+bwd"] += t1 - t0
        fb.append(t1 - t0)
        parts[kind] += t2 - t1
        counts[kind] += 1
    if hasattr(opt, "close"):
        opt.close()
    return {"parts": {k: 1e3 * v for k, v in parts.items()}, "counts": counts, "total": 1e3 * sum(parts.values()),
            "fb_median": 1e3 * statistics.median(fb)}  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS), help="report path ('' for none)")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"Invalid steps: {args.steps}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        problems = make_problems()
        lines = [
            "# Where the time of a training step goes: Fisher optimizers next to AdamW",
            "",
            f"Made by `python -m benchmarks.step_cost {' '.join(argv)}` (`benchmarks/step_cost.py`). "
            f"Machine: {machine_info()}.",
            "",
            f"{args.steps} steps per optimizer and problem at the default settings (AdamW lr 1e-3), random "
            "mini-batches of the suite's data, one thread. Milliseconds in all over the steps: forward + backward "
            "(with the capture hooks), then `opt.step()` split by kind (n: how many steps of that kind). Ratio: "
            "the whole against AdamW's.",
            "",
            "| problem | optimizer | fwd+bwd ms | plain steps ms (n) | refresh steps ms (n) | selection steps ms (n) "
            "| total ms | × AdamW |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key in args.problems:
            prob = problems[key]
            data = prob.data(False)
            res = {name: run(prob, data, name, args.steps) for name in OPTIMIZERS}
            base = res["AdamW"]["total"]
            for name, r in res.items():
                pt, c = r["parts"], r["counts"]
                lines.append(f"| {key} | {name} | {pt['fwd+bwd']:.1f} | {pt['plain']:.1f} ({c['plain']}) | "
                             f"{pt['refresh']:.1f} ({c['refresh']}) | {pt['select']:.1f} ({c['select']}) | "
                             f"{r['total']:.1f} | {r['total'] / base:.2f} |")  # fmt: skip
                print(lines[-1], flush=True)
        text = "\n".join(lines) + "\n"
        if args.out:
            Path(args.out).write_text(text)
        return text
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
