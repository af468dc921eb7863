r"""Which bound on FisherAdam's step: an lr-tuned ablation of the update rule on fast problems of the optimizer suite.

FisherAdam divides by :math:`\sqrt{F/B}` (the loss's units, docs/fisher-math.md §15).  Three ways keep every
coordinate's step bounded: the clip at 1 in those units (``signal=False, clip=1``), Adam's signal term
(``signal=True, clip=None``) and a floor relative to the tensor's Fisher with the clip (``floor=0.1``).  For
ScheduleFreeFisherAdam, the clip against the signal term.  Each variant and AdamW (and Schedule-Free AdamW) train
once (seed 0) at every lr of a fixed grid with the suite's protocol (``benchmarks.optimizers.train``: same data,
initial weights, batches and budgets); the cell is the fewest steps to the validation target over the grid and the
lr that gave it.  The ``fisher_interval=30`` rows ask what a third of the refreshes (about a third of their cost,
``benchmarks/results/step_cost.md``) does to the steps.  One seed: differences of one evaluation interval are
noise; the suite (``benchmarks/optimizers.py``, 5 seeds) is the measurement that counts.

Usage::

    python -m benchmarks.update_ablation                 # benchmarks/results/update_ablation.md
    python -m benchmarks.update_ablation --smoke         # two problems, two lrs, 3 steps: no file
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info  # noqa: E402
from benchmarks.optimizers import train  # noqa: E402
from benchmarks.optimizers_baselines import OptSpec, _fisher, _fisher_lr, make_optimizers  # noqa: E402
from benchmarks.optimizers_problems import make_problems  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "update_ablation.md"
PROBLEMS = ("logreg", "poisson", "mlp_relu", "autoencoder", "mnist1d")
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: (label, class, keyword arguments); class None: a baseline of benchmarks.optimizers_baselines by key
VARIANTS = (
    ("AdamW (wd 0.01)", None, "adamw"),
    ("FisherAdam clip=1 (default)", "FisherAdam", {}),
    ("FisherAdam signal=True, clip=None", "FisherAdam", {"signal": True, "clip": None}),
    ("FisherAdam floor=0.1, clip=1", "FisherAdam", {"floor": 0.1}),
    ("FisherAdam 0.1.0 (units=input)", "FisherAdam", {"units": "input"}),
    ("FisherAdam fisher_interval=30 (a third of the refreshes)", "FisherAdam", {"fisher_interval": 30}),
    ("Schedule-Free AdamW", None, "schedulefree_adamw"),
    ("ScheduleFreeFisherAdam clip=1 (default)", "ScheduleFreeFisherAdam", {}),
    ("ScheduleFreeFisherAdam signal=True, clip=None", "ScheduleFreeFisherAdam", {"signal": True, "clip": None}),
    ("ScheduleFreeFisherAdam fisher_interval=30", "ScheduleFreeFisherAdam", {"fisher_interval": 30}),
)


def spec_of(label, cls, kw) -> OptSpec:
    if cls is None:
        return make_optimizers()[kw]
    return OptSpec(label, label, _fisher_lr(cls), _fisher(cls, **kw), "fisher_optim")


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    problems = make_problems()
    keys = args.problems[:2] if args.smoke else args.problems
    lrs = LRS[1:3] if args.smoke else LRS
    t0 = time.perf_counter()
    cells: dict[tuple[str, str], str] = {}
    for key in keys:
        prob = problems[key]
        data = prob.data(args.smoke)
        for label, cls, kw in VARIANTS:
            best = (math.inf, math.nan, None)
            for lr in lrs:
                run = train(prob, data, spec_of(label, cls, kw), lr, 0, max_steps=3 if args.smoke else None)
                fin = run.final_val if math.isfinite(run.final_val) else math.nan
                if run.steps_to_target < best[0] or (best[0] == math.inf and best[2] is None):
                    best = (run.steps_to_target, lr, fin)
            steps, lr, _ = best
            cells[(label, key)] = f"{steps:.0f} (lr {lr:g})" if math.isfinite(steps) else "—"
    lines = [
        "# FisherAdam's update rule: which bound on the step (one seed, lr grid)",
        "",
        f"Made by `python -m benchmarks.update_ablation {' '.join(argv)}` (`benchmarks/update_ablation.py`), "
        f"{(time.perf_counter() - t0) / 60:.1f} min. Machine: {machine_info()}.",
        "",
        f"Cell: fewest steps to the problem's validation target over the lr grid {list(lrs)} (seed 0; the suite's "
        "problems, budgets and evaluation intervals), and the lr that gave it; —: never reached. One seed: a "
        "difference of one evaluation interval is noise.",
        "",
        "| variant | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    lines += [f"| {label} | " + " | ".join(cells[(label, k)] for k in keys) + " |" for label, _, _ in VARIANTS]
    text = "\n".join(lines) + "\n"
    if not args.smoke:
        RESULTS.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
