r"""Optimizer benchmark: fisher_optim's optimizers against today's strongest baselines, with a fair protocol.

Problems: ``benchmarks/optimizers_problems.py`` (a registry; all offline).  Optimizers and how each is driven:
``benchmarks/optimizers_baselines.py``.  Learning-rate grids: ``benchmarks/tuning.py``.  Statistics:
``benchmarks/stats.py``.  Report and plots: ``benchmarks/optimizers_report.py``.

Protocol (identical for every optimizer):

1. **Budget.**  Each problem has a fixed budget of steps (its epochs times the steps per epoch, times
   ``--epochs-scale``); every run takes exactly that many steps unless it diverges.  The time cap
   (``Problem.time_cap_s``) only guards against runaway runs: a run that reaches it is stopped, even inside a
   step (SIGALRM), marked ``capped``, and reported as such.
2. **Tuning.**  Per optimizer and problem, a log grid of learning rates half a decade apart (factor √10),
   starting with three values around the optimizer's default and extended one value at a time beyond the edge
   where the best value sits, until the best is interior (``benchmarks/tuning.py``; at most ``--max-grid``
   values).  Every value trains once with seed 0.  The choice is made on the **validation** split: fewest steps
   to the validation target, then the best final validation metric.  A choice still at an edge is flagged.
3. **Seeds.**  The chosen lr trains with seeds 0..S-1 (``--seeds``, 5 by default; seed 0 is the tuning run).
   The seed sets the initial parameters, the mini-batch order and the optimizer's own random draws, so seed s
   of two optimizers starts from the same parameters and sees the same batches: comparisons are **paired**.
4. **Metrics.**  Validation every ``eval_every`` steps (not timed).  Steps to target: the first evaluated step
   whose validation metric crosses the target; time to target: training wall-clock up to that step (forward,
   backward, optimizer step with every curvature pass, zero_grad; evaluation excluded).  Final validation
   metric: at the end of the budget.  ms/step: training wall-clock / steps.  Report: medians over seeds with
   95 % percentile-bootstrap intervals (numpy, seed 0), and per problem a paired comparison with AdamW (per-seed
   ratios of steps, of time to target and of ms/step, and per-seed differences of the final validation metric;
   median, bootstrap interval, sign test).  A run that never reaches the target counts as infinitely slow.
5. **Order and threads.**  Within a problem the runs go round-robin over the optimizers (one grid value of every
   optimizer in turn, then the seeds), so that a change of the machine's load hits every optimizer alike.
   torch uses one intra-op thread by default (``--threads``).
6. **mc1 versus exact.**  With ``fisher_adam_exact`` and ``fisher_adam_mc1`` in the run, the first refresh of
   both on the same parameters and batch is measured (:func:`fisher_scale`): the mean over coordinates of
   :math:`\sqrt{\tilde F}` for mc1 relative to exact.  Since :math:`E[\hat F_{mc}] = F`, Jensen gives
   :math:`E\sqrt{\hat F_{mc}} \le \sqrt F`: a noisier estimate gives a smaller denominator, hence a larger
   step at the same lr; the report gives the size of that effect.

Usage::

    python -m benchmarks.optimizers                      # full run: benchmarks/results/optimizers.{md,json}, PNGs
    python -m benchmarks.optimizers --smoke              # every problem and optimizer for a few steps, no files
    python -m benchmarks.optimizers --problems logreg cnn --optimizers adamw fisher_adam --seeds 5 --out /tmp/b
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, machine_info  # noqa: E402
from benchmarks.optimizers_baselines import (  # noqa: E402
    DEFAULT_OPTIMIZERS,
    OPTIMIZERS,
    REFERENCE,
    OptSpec,
    Runner,
    fisher_classes,
    make_optimizers,
)
from benchmarks.optimizers_problems import PROBLEMS, Data, Problem, evaluate, make_problems  # noqa: E402
from benchmarks.optimizers_runs import Run, runs_of  # noqa: E402, F401 (runs_of: re-exported)
from benchmarks.tuning import GridSearch, lr_of, selection_key  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "python -m benchmarks.optimizers"
__all__ = ["Run", "train", "run_benchmark", "runs_of", "fisher_scale", "main", "Runner", "OptSpec"]


# -- one training run ------------------------------------------------------------------------------------
class TimeCap(Exception):
    """A run's training wall-clock reached its problem's cap."""


@contextlib.contextmanager
def alarm(seconds: float | None):
    """Raise :class:`TimeCap` after ``seconds`` of wall-clock, even inside a long optimizer step (SIGALRM; a no-op
    where there is none or off the main thread, where the cap is then only checked between steps)."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TimeCap

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def train(problem: Problem, data: Data, spec: OptSpec, lr: float, seed: int, max_steps: int | None = None,
          epochs_scale: float = 1.0, batch_size: int | None = None, time_cap: float | None = None) -> Run:  # fmt: skip
    """Train once; never raises: an optimizer's error is recorded in the run.

    ``batch_size`` overrides the problem's; ``time_cap`` (default: the problem's ``time_cap_s``) stops the run, even
    in the middle of a step, once its training wall-clock reaches it: the run is then ``capped``, its curve ends
    with one more validation where it stopped, and the test metric is measured there.
    """
    run = Run(problem.key, spec.key, lr, seed)
    cap = problem.time_cap_s if time_cap is None else time_cap
    torch.manual_seed(seed)
    model = problem.model()
    order = torch.Generator().manual_seed(seed)
    n, bs = len(data.x_train), batch_size or problem.batch_size
    per_epoch = max(1, n // bs)  # the last partial batch is dropped
    budget = max(1, round(problem.epochs * epochs_scale * per_epoch))
    if max_steps is not None:
        budget = min(budget, max_steps)
    runner, t0 = None, None
    since: list[float] = []  # training losses since the last validation

    def validate():
        if since:
            run.losses.append((run.steps, math.fsum(since) / len(since)))
            since.clear()
        if runner is not None:
            runner.eval_mode()
        v = evaluate(problem, model, data.x_val, data.y_val)
        if runner is not None:
            runner.train_mode()
        run.curve.append((run.steps, run.train_s, v))
        if not math.isfinite(run.steps_to_target) and problem.reached(v):
            run.steps_to_target, run.time_to_target = run.steps, run.train_s
        return v

    try:
        runner = spec.build(model, lr, problem.likelihood, seed)
        validate()
        while run.steps < budget and not run.diverged:
            perm = torch.randperm(n, generator=order)
            for i in range(per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                x, y = data.x_train[idx], data.y_train[idx]
                left = None if cap is None else cap - run.train_s
                if left is not None and left <= 0:
                    raise TimeCap
                t0 = time.perf_counter()
                with alarm(left):
                    loss = runner.step(x, y)
                run.train_s += time.perf_counter() - t0
                t0 = None
                run.steps += 1
                since.append(loss)
                if not math.isfinite(loss):
                    run.diverged = True
                    break
                if run.steps % problem.eval_every == 0 or run.steps == budget:
                    validate()
                if run.steps >= budget:
                    break
    except TimeCap:
        if t0 is not None:
            run.train_s += time.perf_counter() - t0
        run.capped = True
        try:
            validate()
        except Exception as e:  # noqa: BLE001
            run.error = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 -- recorded and reported (the smoke test asserts there is none)
        run.error = f"{type(e).__name__}: {e}"
    finally:
        if runner is not None:
            runner.close()
    if not run.diverged and not run.error:
        run.final_val = run.curve[-1][2]
        if runner is not None:
            runner.eval_mode()
        run.test = evaluate(problem, model, data.x_test, data.y_test)
        run.diverged = not math.isfinite(run.test)
    return run


def run_key(problem: Problem, run: Run) -> tuple:
    """The tuning criterion of a run (``benchmarks.tuning.selection_key``: smaller is better)."""
    return selection_key(run.steps_to_target, run.final_val, problem.higher_is_better, bool(run.error or run.diverged))


# -- the benchmark ---------------------------------------------------------------------------------------
def run_benchmark(problems: list[Problem], specs: list[OptSpec], seeds: int, epochs_scale: float, smoke: bool,
                  max_steps: int | None, max_grid: int = 8) -> dict:  # fmt: skip
    """Tuning (grids extended until the best is interior), then seeds, for every (problem, optimizer).

    Returns everything the report needs (JSON-serialisable): per problem the tuning and seed runs, and per
    optimizer its grid (tried learning rates, the chosen one, and ``edge``: ``""`` when interior, ``"low"`` /
    ``"high"`` for an edge choice, ``"single"`` when only one value ran: smoke mode or a time cap).
    """
    from tqdm.auto import tqdm

    skipped = {s.key: r for s in specs if (r := s.unavailable())}
    active = [s for s in specs if s.key not in skipped]
    out: dict = {"problems": {}, "skipped": skipped, "reference": REFERENCE, "max_grid": max_grid}
    with tqdm(desc="runs", unit="run", dynamic_ncols=True) as bar:
        for prob in problems:
            data = prob.data(smoke)
            batch = prob.smoke_batch if smoke else None
            searches = {s.key: GridSearch(s.default_lr(), max_values=1 if smoke else max_grid,
                                          n_start=1 if smoke else 3) for s in active}  # fmt: skip
            tuning: dict[str, list[Run]] = {s.key: [] for s in active}
            notes: dict[str, str] = {}
            # round-robin over the optimizers, one grid value each in turn, so that a change of the machine's load
            # during the problem hits every optimizer alike
            while todo := [(s, e) for s in active if (e := searches[s.key].next()) is not None]:
                for spec, e in todo:
                    gs = searches[spec.key]
                    bar.set_postfix_str(f"{prob.key} {spec.key} lr={lr_of(e):.3g} seed=0 (tuning)")
                    run = train(prob, data, spec, lr_of(e), 0, max_steps, epochs_scale, batch)
                    tuning[spec.key].append(run)
                    gs.record(e, run_key(prob, run))
                    bar.update()
                    if run.capped and run.steps < prob.eval_every:  # too slow whatever the lr: stop tuning
                        notes[spec.key] = (f"lr {run.lr:.3g} hit the {prob.time_cap_s:g} s time cap after "
                                           f"{run.steps} steps; tuning and seeds stopped")  # fmt: skip
                        gs.stopped = notes[spec.key]
            final: dict[str, list[Run]] = {}
            grids: dict[str, dict] = {}
            for spec in active:
                gs = searches[spec.key]
                best = lr_of(gs.best())
                final[spec.key] = [next(r for r in tuning[spec.key] if r.lr == best)]
                grids[spec.key] = {"lrs": sorted(r.lr for r in tuning[spec.key]), "chosen": best,
                                   "edge": "single" if len(gs.keys) < 2 else gs.edge()}  # fmt: skip
                if spec.key not in notes and final[spec.key][0].capped and not math.isfinite(
                        final[spec.key][0].steps_to_target):  # fmt: skip
                    notes[spec.key] = (f"the chosen run hit the {prob.time_cap_s:g} s time cap after "
                                       f"{final[spec.key][0].steps} steps without reaching the target; seeds not run")
            seeded = [s for s in active if s.key not in notes]
            for seed in range(1, seeds):
                for spec in seeded:
                    lr = final[spec.key][0].lr
                    bar.set_postfix_str(f"{prob.key} {spec.key} lr={lr:.3g} seed={seed}")
                    final[spec.key].append(train(prob, data, spec, lr, seed, max_steps, epochs_scale, batch))
                    bar.update()
            for spec in active:
                runs = final[spec.key]
                reached = sum(math.isfinite(r.steps_to_target) for r in runs)
                bar.write(f"{prob.key:12s} {spec.key:28s} lr={runs[0].lr:<8.3g} grid {grids[spec.key]['lrs']} "
                          f"edge={grids[spec.key]['edge'] or 'no'} reached {reached}/{len(runs)}"
                          + "".join(f"  ERROR {r.error}" for r in runs if r.error))  # fmt: skip
            sys.stdout.flush()
            n_train = len(data.x_train)
            bs = batch or prob.batch_size
            budget = max(1, round(prob.epochs * epochs_scale * max(1, n_train // bs)))
            out["problems"][prob.key] = {
                "n_train": n_train,
                "batch_size": bs,
                "budget_steps": budget if max_steps is None else min(budget, max_steps),
                "grids": grids,
                "tuning": {k: [asdict(r) for r in v] for k, v in tuning.items()},
                "final": {k: [asdict(r) for r in v] for k, v in final.items()},
                "notes": notes,
            }
    return out


# -- mc1 versus exact: the size of the preconditioner at the first refresh ---------------------------------
def fisher_scale(problem: Problem, data: Data, seeds: int = 5, smoke: bool = False) -> dict | None:
    r"""Mean over coordinates of :math:`\sqrt{\tilde F}` after FisherAdam's first refresh, mc1 relative to exact.

    For each seed: the problem's model under that seed, one copy per estimator, the first mini-batch of that
    seed's order, one step of ``FisherAdam(estimator=...)``; the bias-corrected running Fisher of every
    parameter is read from ``opt.state[p]["fisher_ema"]`` (the first refresh sees the initial parameters, so the
    two estimators estimate the same Fisher).  Returns per-seed ratios of the means, and the median over
    coordinates (with exact > 0) of the per-coordinate ratio :math:`\sqrt{\hat F_{mc1} / F}`, or None when
    fisher_optim.optim is missing.
    """
    classes, _ = fisher_classes()
    if classes is None:
        return None
    bs = problem.smoke_batch if smoke else problem.batch_size
    out: dict = {"problem": problem.key, "mean_sqrt": {"exact": [], "mc1": []}, "ratio": [], "coord_median": []}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = problem.model()
        perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:bs]
        x, y = data.x_train[perm], data.y_train[perm]
        roots = {}
        for est in ("exact", "mc1"):
            m = copy.deepcopy(model)
            opt = classes["FisherAdam"](m, likelihood=problem.likelihood, estimator=est, seed=seed)
            runner = Runner(m, opt, problem.likelihood, seed)
            try:
                runner.step(x, y)
                beta2 = opt.param_groups[0]["betas"][1]
                roots[est] = torch.cat([
                    (opt.state[p]["fisher_ema"] / (1 - beta2 ** float(opt.state[p]["fisher_count"])))
                    .clamp_min(0).sqrt().reshape(-1) for p in m.parameters() if "fisher_ema" in opt.state[p]
                ])  # fmt: skip
            finally:
                runner.close()
        for est, r in roots.items():
            out["mean_sqrt"][est].append(float(r.mean()))
        out["ratio"].append(float(roots["mc1"].mean() / roots["exact"].mean()))
        pos = roots["exact"] > 0
        out["coord_median"].append(float((roots["mc1"][pos] / roots["exact"][pos]).median()))
    return out


# -- command line ----------------------------------------------------------------------------------------
def git_version() -> str:
    """``git describe --always --dirty`` of the checkout (the fisher_optim code that was benchmarked), or n/a."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return out.stdout.strip() or "n/a"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages the baselines come from (``n/a`` where missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "pytorch_optimizer", "schedulefree", "sophia-opt", "opt_einsum", "numpy", "fisher_optim"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "n/a"
    return out


def _as_list(fs: dict | list | None) -> list[dict]:
    return [] if fs is None else [fs] if isinstance(fs, dict) else list(fs)


def merge_results(results: list[dict]) -> dict:
    """One results dict from runs of the same protocol: problems joined; a problem in several files joins their
    optimizers (which must differ, with the same data and budget); commands listed."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    out["problems"], out["fisher_scale"] = {}, []
    for r in results:
        for key, prob in r["problems"].items():
            if key not in out["problems"]:
                out["problems"][key] = copy.deepcopy(prob)
                continue
            # the same problem run for different optimizers (e.g. the baselines, then fisher_optim's rows)
            have = out["problems"][key]
            if (have["n_train"], have["batch_size"], have["budget_steps"]) != (
                    prob["n_train"], prob["batch_size"], prob["budget_steps"]):  # fmt: skip
                raise ValueError(f"Invalid merge: problem {key!r} ran with different data or budgets")
            clash = set(have["final"]) & set(prob["final"])
            if clash:
                raise ValueError(f"Invalid merge: problem {key!r} has optimizers {sorted(clash)} in more than one file")
            for part in ("grids", "tuning", "final", "notes"):
                have[part].update(prob[part])
        out["skipped"] = {**out.get("skipped", {}), **r.get("skipped", {})}
        out["fisher_scale"] = [*_as_list(out.get("fisher_scale")), *_as_list(r.get("fisher_scale"))]
    out["command"] = " ; ".join(r["command"] for r in results)
    out["elapsed_s"] = sum(r["elapsed_s"] for r in results)
    out["git"] = ", ".join(dict.fromkeys(r.get("git", "n/a") for r in results))
    out["finished"] = max(r.get("finished", "n/a") for r in results)  # the last to finish
    return out


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.optimizers_report import plot, write_markdown

    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="problems: " + " ".join(PROBLEMS) + "\noptimizers: "
                                     + " ".join(OPTIMIZERS))  # fmt: skip
    parser.add_argument("--problems", nargs="+", default=None, metavar="P", help="problems to run (default: all)")
    parser.add_argument("--optimizers", nargs="+", default=None, metavar="O",
                        help="optimizers to run (default: all but fisher_adam_mc2 and fisher_adam_empirical)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the chosen lr (default 5; smoke 1)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every step budget (default 1)")
    parser.add_argument("--max-grid", type=int, default=8, help="most learning rates tried per optimizer (default 8)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data, the grid's centre lr only, one seed, a few steps; files only with --out")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on steps per run (smoke: 3)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the report (default benchmarks/results)")
    parser.add_argument("--name", default="optimizers", help="file stem of the report (default optimizers)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="JSON",
                        help="re-render the report and plots of saved runs into --out, without training (several "
                        "files: runs of different problems, merged into one report named by --name)")
    parser.add_argument("--note", default="", help="a sentence put at the top of the report (e.g. 'partial run')")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    problems, specs = make_problems(), make_optimizers()
    if args.from_json is not None:
        res = merge_results([json.loads(f.read_text()) for f in args.from_json])
        if args.note:
            res["note"] = args.note
        out = args.out if args.out is not None else args.from_json[0].parent
        out.mkdir(parents=True, exist_ok=True)
        stem = args.from_json[0].stem if len(args.from_json) == 1 else args.name
        write_markdown(problems, res, specs, out / f"{stem}.md", shlex.join([*COMMAND.split(), *argv]))
        plot(problems, res, specs, out, stem)
        if len(args.from_json) > 1:
            (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        log(f"re-rendered {out}/{stem}.md and its plots from {', '.join(map(str, args.from_json))}")
        return res
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 5)
    max_steps = args.max_steps if args.max_steps is not None else (3 if args.smoke else None)
    if seeds < 1:
        raise ValueError(f"Invalid seeds: {seeds}")
    if not args.epochs_scale > 0:
        raise ValueError(f"Invalid epochs_scale: {args.epochs_scale}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"Invalid max_steps: {max_steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"Invalid threads: {args.threads}")
    if args.max_grid < 3:
        raise ValueError(f"Invalid max_grid: {args.max_grid} (at least 3)")
    chosen_p = args.problems or list(problems)  # the built-in problems and every registered one
    chosen_o = args.optimizers or list(DEFAULT_OPTIMIZERS)
    if set(chosen_p) - set(problems):
        raise ValueError(f"Invalid problems: {sorted(set(chosen_p) - set(problems))}")
    if set(chosen_o) - set(specs):
        raise ValueError(f"Invalid optimizers: {sorted(set(chosen_o) - set(specs))}")
    out = args.out if args.out is not None or args.smoke else RESULTS
    threads_before = torch.get_num_threads()
    code = git_version()  # at the start: the code that runs (the checkout may change while it runs)
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(args.threads)
        info = machine_info()
        log(info)
        with warnings.catch_warnings():
            # pytorch_optimizer's Hutchinson step warns about backward(create_graph=True) reference cycles
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            res = run_benchmark([problems[k] for k in chosen_p], [specs[k] for k in chosen_o], seeds,
                                args.epochs_scale, args.smoke, max_steps, args.max_grid)  # fmt: skip
            if {"fisher_adam_exact", "fisher_adam_mc1"} <= set(chosen_o) - set(res["skipped"]):
                key = next((k for k in ("mlp_relu", "mlp_sigmoid", "cnn") if k in chosen_p), chosen_p[0])
                res["fisher_scale"] = fisher_scale(problems[key], problems[key].data(args.smoke),
                                                   1 if args.smoke else 5, args.smoke)  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)
    res["command"] = shlex.join([*COMMAND.split(), *argv])
    res["note"] = args.note
    res["machine"] = info
    res["elapsed_s"] = time.perf_counter() - t0
    res["seeds"] = seeds
    res["git"] = code
    res["versions"] = package_versions()
    res["epochs_scale"] = args.epochs_scale
    res["finished"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        res["load_at_end"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        res["load_at_end"] = "n/a"
    if res["skipped"]:
        log("skipped: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items()))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
        write_markdown(problems, res, specs, out / f"{args.name}.md")
        plot(problems, res, specs, out, args.name)
        log(f"wrote {out}/{args.name}.md, {args.name}.json and its plots")
    return res


if __name__ == "__main__":
    main()
