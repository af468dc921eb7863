r"""Estimation-quality benchmark, part 2 of 4: the refresh stream (the running estimate, one stream of all
strategies in lockstep, and the whole study over the checkpoints).  The study is described in
``benchmarks/estimation_quality.py``.

Auto's stream runs what ``FisherAdam(estimator="auto")`` runs at its refreshes, with the optimizer's own schedule
object (:class:`fisher_optim.schedule.Schedule`, one refresh per batch), not a copy of it: the first refresh's plan
from :func:`fisher_optim.optim.auto.start_plan` (exact; Hutchinson with one probe per input on outputs with more
than ``CLOSED_FORM_SEEDS`` positions x classes, the LM), and at a selection refresh the call that
:func:`fisher_optim.optim.auto.select` makes: ``run_selection`` with the schedule's cached costs, the plan in use as
``current=`` and the stream's online variance trackers (used past ``CLOSED_FORM_SEEDS``), whose ``fisher`` is that
refresh's estimate.  (``auto.select`` itself returns the choices without Î₁'s one-sample rse, which the report
prints, hence the direct call.)
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks._common import log
from benchmarks.estimation_quality_problems import (
    AUTO,
    FIXED,
    SEED_INDEX,
    Config,
    full_data_references,
    load_data,
    load_pool,
    make_model,
    train_accuracy,
    train_epoch,
)
from fisher_optim import estimate_plan
from fisher_optim.optim.auto import start_plan
from fisher_optim.schedule import Schedule
from fisher_optim.selection import run_selection

COST_KEY = "stream"  # the schedule's cost-cache key: every batch of a stream has the same shape
#: what one of auto's refreshes was
PLAN, SEL_MEASURED, SEL_CACHED = "plan", "selection, measured costs", "selection, cached costs"


# -- running estimate and errors ---------------------------------------------------------------------------------
class RunningFisher:
    r"""``FisherAdam``'s running Fisher: :math:`S_k = \beta S_{k-1} + (1-\beta)\hat F_k`, value
    :math:`S_k/(1-\beta^k)` (bias-corrected), accumulated in float64."""

    def __init__(self, beta: float):
        self.beta = beta
        self.count = 0
        self.s: dict[str, Tensor] = {}

    def update(self, est: dict[str, Tensor]) -> None:
        self.count += 1
        for n, e in est.items():
            e = e.detach().to(torch.float64)
            if n not in self.s:
                self.s[n] = (1.0 - self.beta) * e
            else:
                self.s[n].mul_(self.beta).add_(e, alpha=1.0 - self.beta)

    def value(self) -> dict[str, Tensor]:
        bc = 1.0 - self.beta**self.count
        return {n: s / bc for n, s in self.s.items()}


def ema_weight_ratio(beta: float, k: int) -> float:
    r""":math:`q_k=\sum_j w_j^2/(\sum_j w_j)^2` of the bias-corrected EMA after ``k`` refreshes (1 at ``k=1``)."""
    return (1 - beta) * (1 + beta**k) / ((1 + beta) * (1 - beta**k))


def rel_errors(est: dict[str, Tensor], ref: dict[str, Tensor], names: list[str]) -> np.ndarray:
    """Per tensor ``||est - ref||_2 / ||ref||_2``."""
    return np.array([float((est[n] - ref[n]).norm() / ref[n].norm()) for n in names])


def step_values(cum_times: np.ndarray, values: np.ndarray, at: np.ndarray, before: float = 1.0) -> np.ndarray:
    """The value after the last refresh completed by each time in ``at`` (``before`` where none has)."""
    idx = np.searchsorted(cum_times, at, side="right") - 1
    out = np.where(idx >= 0, values[np.clip(idx, 0, None)], before)
    return out


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


# -- cost measurements -------------------------------------------------------------------------------------------
def select_cost_model(model: nn.Module, x: Tensor, cfg: Config, seed: int) -> dict[str, float]:
    """What ``run_selection``'s measured cost model predicts for whole refreshes: per random batch of ``M`` inputs,
    the costs it measures (``fisher_optim.selection.build_costs``, the function ``run_selection`` calls when it has no
    cached costs: an exact, a one-sample and a four-sample pass over all layers; the forward pass and the per-call
    overhead are the shared part).  A
    plan's refresh costs ``Costs.refresh_cost`` (the mixed-plan model ``select`` uses); medians over
    ``cfg.cost_batches`` batches of the exact and one-sample refresh costs and of their ratio, and the ratio's
    range."""
    from fisher_optim.engine import Probe
    from fisher_optim.likelihoods import get_likelihood
    from fisher_optim.selection import build_costs, module_units

    g = torch.Generator().manual_seed(seed)
    ex, one, ratio = [], [], []
    for _ in range(cfg.cost_batches):
        xb = x[torch.randperm(len(x), generator=g)[: cfg.m]]
        with Probe(model, xb, get_likelihood(cfg.likelihood)) as probe:
            costs = build_costs(probe, module_units(probe), "measured", warm_exact=False)
        names = [n for unit in costs.units for n in unit]
        ex.append(costs.refresh_cost({n: ("exact", 1) for n in names}))
        one.append(costs.refresh_cost({n: ("mc1", 1) for n in names}))
        ratio.append(ex[-1] / one[-1])
    return {"exact": statistics.median(ex), "mc1": statistics.median(one), "ratio": statistics.median(ratio),
            "ratio_min": min(ratio), "ratio_max": max(ratio)}  # fmt: skip


def cost_vs_batch(model: nn.Module, x: Tensor, cfg: Config) -> list[dict]:
    """Median CPU milliseconds of ``estimate_plan`` with exact, mc1 N=1 and mc1 N=4 everywhere for each number of
    inputs per refresh in ``cfg.sweep_m`` (random inputs of the training set; ``cfg.sweep_rounds`` timed calls
    after one untimed call): does the exact / Î₁ cost ratio depend on the refresh size?"""
    g = torch.Generator().manual_seed(cfg.seed + 99)
    names = [n for n, _ in model.named_parameters()]
    out = []
    for m in cfg.sweep_m:
        xb = x[torch.randperm(len(x), generator=g)[:m]]
        row = {"M": len(xb)}
        for label, plan in (("exact", ("exact", 1)), ("mc1 N=1", ("mc1", 1)), ("mc1 N=4", ("mc1", 4))):
            full = {n: plan for n in names}

            def call(full=full, xb=xb):
                estimate_plan(model, xb, likelihood=cfg.likelihood, plan=full, generator=g)

            call()
            row[label] = 1e3 * statistics.median(timed(call)[2] for _ in range(cfg.sweep_rounds))
        out.append(row)
    return out


# -- one stream --------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One strategy on one stream: per refresh the estimation seconds (wall and CPU), what the refresh was (auto:
    ``PLAN``, ``SEL_MEASURED`` or ``SEL_CACHED``; fixed strategies: ``PLAN``) and the errors."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    err_full: list[np.ndarray] = field(default_factory=list)
    err_stream: list[np.ndarray] = field(default_factory=list)

    def add(self, wall: float, cpu: float, kind: str, err_full: np.ndarray, err_stream: np.ndarray | None) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.kind.append(kind)
        self.err_full.append(err_full)
        if err_stream is not None:
            self.err_stream.append(err_stream)

    def cum(self, clock: str) -> np.ndarray:
        return np.cumsum(np.asarray(self.wall if clock == "wall" else self.cpu))

    @property
    def refreshes(self) -> int:
        return len(self.wall)


class _Stream:
    """The state of one stream: every strategy's running estimate, trace and time spent, the budget once the
    budget strategy has made its ``k_exact`` refreshes, and auto's schedule, online variances and selections."""

    def __init__(self, model: nn.Module, ref: dict, cfg: Config, seed: int, output_size: int):
        d = cfg.defaults
        self.model, self.cfg, self.names, self.full = model, cfg, ref["names"], ref["fisher"]
        self.strategies = list(cfg.curves)
        self.gens = {s: torch.Generator().manual_seed(seed * 100 + SEED_INDEX[s]) for s in self.strategies}
        self.run = {s: RunningFisher(d["beta2"]) for s in self.strategies}
        self.traces = {s: Trace() for s in self.strategies}
        self.spent = {s: {"wall": 0.0, "cpu": 0.0} for s in self.strategies}  # estimation s (auto: selections in)
        self.budget: dict[str, float] = {}
        self.plans = {s: {n: FIXED[s] for n in self.names} for s in cfg.fixed}
        self.schedule = Schedule(fisher_interval=1, select_interval=d["variance_interval"])  # one refresh a batch
        self.start = start_plan(self.names, output_size)  # auto's first plan: exact, Hutchinson on long outputs
        self.online: dict = {}  # auto's online variance trackers (as the optimizer's, kept across selections)
        self.selections: list[dict] = []
        self.reference = RunningFisher(d["beta2"]) if cfg.stream_reference else None
        self.select_kw = dict(likelihood=cfg.likelihood, target_rse=d["target_rse"], ema_decay=d["beta2"],
                              max_samples=d["max_samples"], names=self.names, cost_model=d["cost_model"])  # fmt: skip

    def active(self, s: str) -> bool:
        if s == self.cfg.budget_by:
            return self.traces[s].refreshes < self.cfg.k_exact
        return not self.budget or any(self.spent[s][c] < self.budget[c] for c in self.budget)

    def fold(self, s: str, est: dict, w: float, c: float, kind: str, ref_now: dict | None, zero: bool = False):
        """Fold a refresh into strategy ``s``: running estimate, trace, time; the budget once ``budget_by`` is done."""
        self.run[s].update(est)
        now = self.run[s].value()
        stream_err = None if ref_now is None else (np.zeros(len(self.names)) if zero else
                                                     rel_errors(now, ref_now, self.names))  # fmt: skip
        self.traces[s].add(w, c, kind, rel_errors(now, self.full, self.names), stream_err)
        self.spent[s]["wall"] += w
        self.spent[s]["cpu"] += c
        if s == self.cfg.budget_by and not self.active(s):
            self.budget = dict(self.spent[s])

    def exact_pass(self, xb: Tensor) -> dict | None:
        """The exact Fisher of the batch: the exact strategy's refresh and the same-stream reference (either one
        may be off); returns the reference's running value."""
        exact_plan = {n: FIXED["exact"] for n in self.names}
        est, w, c = timed(lambda: estimate_plan(self.model, xb, likelihood=self.cfg.likelihood, plan=exact_plan))
        ref_now = None
        if self.reference is not None:
            self.reference.update(est)
            ref_now = self.reference.value()
        if "exact" in self.strategies and self.active("exact"):
            self.fold("exact", est, w, c, PLAN, ref_now, zero=True)
        return ref_now

    def auto_refresh(self, xb: Tensor) -> tuple[dict, float, float, str]:
        """Auto's refresh, as ``FisherAdam(estimator="auto")`` makes it: a selection when the schedule says so,
        else ``estimate_plan`` with the plan in use (before any selection: ``start_plan``)."""
        sch = self.schedule
        if sch.select_due(self.names):
            cached = sch.cached_costs(COST_KEY)
            sel, w, c = timed(lambda: run_selection(
                self.model, xb, generator=self.gens[AUTO], costs=cached, current=sch.plan, online=self.online,
                **self.select_kw))  # fmt: skip
            sch.remember_costs(COST_KEY, sel.costs, reused=cached is not None)
            chosen = {n: ch.as_dict() for n, ch in sel.choices.items()}
            sch.after_selection(chosen, sel.changed, sel.plan_cost, sel.exact_cost, sel.summary)
            self.selections.append(chosen)
            est, kind = sel.fisher, (SEL_MEASURED if cached is None else SEL_CACHED)
        else:
            plan = self.start if sch.plan is None else sch.plan_for(self.names)
            est, w, c = timed(lambda: estimate_plan(self.model, xb, likelihood=self.cfg.likelihood, plan=plan,
                                                    generator=self.gens[AUTO]))  # fmt: skip
            kind = PLAN
        sch.after_refresh()
        return est, w, c, kind

    def fixed_refresh(self, s: str, xb: Tensor, yb: Tensor) -> tuple[dict, float, float]:
        plan = self.plans[s]
        t = yb if any(e == "empirical" for e, _ in plan.values()) else None
        return timed(lambda: estimate_plan(self.model, xb, likelihood=self.cfg.likelihood, plan=plan,
                                           generator=self.gens[s], targets=t))  # fmt: skip


def run_stream(model: nn.Module, x: Tensor, y: Tensor, ref: dict, cfg: Config, seed: int) -> dict:
    """All strategies in lockstep on one input stream.

    The budget strategy (``cfg.budget_by``: exact, or Î₁ N=1 on ``lm``) makes ``k_exact`` refreshes; its cumulative
    wall and CPU times are this stream's budgets ``T``; every other strategy runs until its estimation time (auto:
    selection refreshes included) reaches ``T`` on both clocks.  With ``cfg.stream_reference`` the exact Fisher of
    every batch is computed anyway: it is the same-stream reference.

    Auto runs as ``FisherAdam(estimator="auto")``, driven by the optimizer's schedule
    (:class:`fisher_optim.schedule.Schedule`, every batch one refresh): the first refresh with ``start_plan``'s plan
    (exact; Hutchinson N=1 past ``CLOSED_FORM_SEEDS`` seeds per input), then a selection at the second and after
    every ``variance_interval`` refreshes (grown while the plan holds), whose estimate is ``run_selection``'s
    ``fisher`` (timed: the ``run_selection`` call; the exact Fisher of the batch, or past ``CLOSED_FORM_SEEDS`` the
    unbiased mean of its probe draws), with the schedule's cached costs (one key: every batch has the same shape)
    and the stream's online variance trackers; ``estimate_plan`` with the plan in use in between.
    """
    with torch.no_grad():
        output_size = model(x[:1]).numel()  # positions x classes per input: the exact pass's seeds
    st = _Stream(model, ref, cfg, seed, output_size)
    gin = torch.Generator().manual_seed(seed)
    # untimed warm-up of every call on a batch outside the stream (one-time allocations and lazy set-up); the
    # warm-up selection's costs and draws are not kept (the stream's first selection measures, as the optimizer's)
    gw = torch.Generator().manual_seed(seed + 7)
    iw = torch.randperm(len(y), generator=gw)[: cfg.m]
    for plan in st.plans.values():
        estimate_plan(model, x[iw], likelihood=cfg.likelihood, plan=plan, generator=gw, targets=y[iw])
    run_selection(model, x[iw], generator=gw, **st.select_kw)
    order = [s for s in st.strategies if s != "exact"]  # exact (if run) goes first: it shares the reference pass
    k = 0
    max_refreshes = 10_000 * cfg.k_exact
    while any(st.active(s) for s in st.strategies):
        if k >= max_refreshes:
            raise RuntimeError(f"a strategy did not reach the budget strategy's budget in {max_refreshes} refreshes")
        idx = torch.randperm(len(y), generator=gin)[: cfg.m]
        xb, yb = x[idx], y[idx]
        ref_now = None
        if ("exact" in st.strategies and st.active("exact")) or st.reference is not None:
            ref_now = st.exact_pass(xb)
        shift = k % len(order)
        for s in order[shift:] + order[:shift]:
            if not st.active(s):
                continue
            if s == AUTO:
                est, w, c, kind = st.auto_refresh(xb)
            else:
                (est, w, c), kind = st.fixed_refresh(s, xb, yb), PLAN
            st.fold(s, est, w, c, kind, ref_now)
        k += 1
    return {"traces": st.traces, "selections": st.selections, "stream_refreshes": k, "T": st.budget}


def curve_of(trace: Trace, clock: str, which: str, at: np.ndarray) -> np.ndarray:
    """(len(at), tensors) errors of one strategy at the common times ``at`` (step rule)."""
    cum = trace.cum(clock)
    errs = np.stack(trace.err_full if which == "full" else trace.err_stream)
    out = np.empty((len(at), errs.shape[1]))
    for j in range(errs.shape[1]):
        out[:, j] = step_values(cum, errs[:, j], at)
    return out


def refreshes_by(trace: Trace, clock: str, t: float) -> int:
    return int(np.searchsorted(trace.cum(clock), t, side="right"))


# -- the whole study ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Train to each checkpoint, compute the references, run the streams (torch threads set to 1 meanwhile)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    x, y = load_data(cfg)
    xs, ys = load_pool(cfg, x, y)  # what the stream draws from and the reference covers (lm: held-out windows)
    model = make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    epoch, losses, out = 0, {}, []
    for ckpt in cfg.checkpoints:
        while epoch < ckpt:
            losses[epoch + 1] = train_epoch(model, opt, x, y, cfg, gen)
            epoch += 1
        model.eval()
        frozen = copy.deepcopy(model)
        for p in frozen.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            acc = train_accuracy(cfg, frozen(x), y)
        t0 = time.perf_counter()
        ref = full_data_references(frozen, xs, ys, cfg)
        t_ref = time.perf_counter() - t0
        cost_model = select_cost_model(frozen, xs, cfg, seed=cfg.seed + ckpt)
        log(f"epoch {ckpt}: train acc {acc:.3f}, references {t_ref:.1f} s; select's cost model: exact/mc1 "
            f"{cost_model['ratio']:.2f}")  # fmt: skip
        streams = []
        for r in range(cfg.repeats):
            t0 = time.perf_counter()
            streams.append(run_stream(frozen, xs, ys, ref, cfg, seed=cfg.seed + 1000 * (ckpt + 1) + r))
            st = streams[-1]
            log(f"  stream {r}: T = {1e3 * st['T']['wall']:.0f} ms wall / {1e3 * st['T']['cpu']:.0f} ms CPU, "
                f"{st['stream_refreshes']} batches, {time.perf_counter() - t0:.1f} s; refreshes: "
                + ", ".join(f"{s} {tr.refreshes}" for s, tr in st["traces"].items()))  # fmt: skip
        out.append({"epoch": ckpt, "train_acc": acc, "loss": losses.get(ckpt, math.nan), "ref": ref,
                    "cost_model": cost_model, "streams": streams})  # fmt: skip
    sweep = cost_vs_batch(frozen, xs, cfg)  # the last checkpoint's weights
    log("cost vs inputs per refresh: " + "; ".join(f"M={r['M']}: exact/mc1 N=1 {r['exact'] / r['mc1 N=1']:.2f}"
                                                   for r in sweep))  # fmt: skip
    return {"config": cfg, "checkpoints": out, "seconds": time.perf_counter() - t_start, "cost_vs_m": sweep}
