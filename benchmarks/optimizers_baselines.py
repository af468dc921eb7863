r"""The optimizers of the optimizer benchmark (``benchmarks/optimizers.py``): how each one is built and driven.

Every baseline comes from its authors' package or a well-kept library, never a hand-written copy:

=========================  ===============================================================================
key                        implementation and settings (everything not named is the package's default)
=========================  ===============================================================================
``sgd``                    ``torch.optim.SGD``, momentum 0.9
``adam``                   ``torch.optim.Adam``
``adamw``                  ``torch.optim.AdamW``, weight decay 0.01 (torch's default); the reference
``schedulefree_adamw``     ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024), weight decay 0.01;
                           ``opt.train()`` before training steps, ``opt.eval()`` around every evaluation
``muon``                   ``torch.optim.Muon`` on the 2-D weights of hidden layers, ``torch.optim.AdamW`` on
                           the rest (biases, the output layer, convolution filters), stepped together; Muon
                           with ``adjust_lr_fn="match_rms_adamw"`` (Moonlight, Liu et al. 2025) so that one lr
                           serves both; weight decay 0.01 on both
``soap``                   ``pytorch_optimizer.SOAP`` (Vyas et al. 2024)
``kron``                   ``pytorch_optimizer.Kron`` (PSGD Kron, Li; Evan Walters' design)
``adahessian``             ``pytorch_optimizer.AdaHessian``: ``backward(create_graph=True)`` every step
``sophiah``                ``pytorch_optimizer.SophiaH``: ``backward(create_graph=True)`` every 10th step
``sophiag``                ``sophia_opt.SophiaG`` (the authors' code, PyPI ``sophia-opt``), weight decay 0;
                           every ``k = 10`` steps labels are sampled from the model on the current batch, the
                           gradient of the sampled-label mean loss goes to ``update_hessian()`` and ``step(bs=B)``
                           scales it by the batch size, as the authors' training script does
``fisher_adam*``           ``fisher_optim.optim.FisherAdam`` with ``estimator`` auto / exact / mc1 (and mc2,
                           empirical, hutchinson_batch where ``fisher_optim.ESTIMATORS`` has it)
``sf_fisher_adam``         ``fisher_optim.optim.ScheduleFreeFisherAdam`` (auto), driven as Schedule-Free AdamW
``fisher_adam_010``        FisherAdam (auto) with 0.1.0's update (``V010``: per-input units, no signal term,
                           clip 1; grid centred on 0.1.0's lr 5e-3), kept for comparison
``natural_gradient``       ``fisher_optim.optim.NaturalGradient`` (auto)
=========================  ===============================================================================

Learning rates are tuned on a log grid (:mod:`benchmarks.tuning`) that starts at the half-decade value nearest
each optimizer's default (``OptSpec.default_lr``).  An optimizer whose package is missing is skipped with the
reason (``OptSpec.unavailable``), never silently.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisher_optim.likelihoods import get_likelihood

__all__ = ["Runner", "OptSpec", "make_optimizers", "OPTIMIZERS", "DEFAULT_OPTIMIZERS", "hidden_matrices"]


# -- how each optimizer is driven -------------------------------------------------------------------------
class Runner:
    """One training step of a model with an optimizer: ``loss.backward(); opt.step(); opt.zero_grad()``.

    ``train_mode`` / ``eval_mode`` are called before training steps and around every evaluation (a no-op except
    for Schedule-Free, whose evaluation point differs from its gradient point).
    """

    def __init__(self, model: nn.Module, opt, likelihood: str, seed: int):
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

    def train_mode(self) -> None:
        pass

    def eval_mode(self) -> None:
        pass

    def close(self) -> None:
        close = getattr(self.opt, "close", None)
        if close is not None:
            close()


class ScheduleFreeRunner(Runner):
    """Schedule-Free AdamW: the authors require ``opt.train()`` before steps and ``opt.eval()`` before evaluation."""

    def train_mode(self) -> None:
        self.opt.train()

    def eval_mode(self) -> None:
        self.opt.eval()


class HutchinsonRunner(Runner):
    """AdaHessian / SophiaH: ``backward(create_graph=True)`` on the steps that refresh the Hessian estimate.

    Attention runs on PyTorch's math kernel on those steps: the fused CPU kernel has no double backward (as a user of
    these optimizers must do on attention models)."""

    def step(self, x: Tensor, y: Tensor) -> float:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        refresh = self.t % self.opt.update_period == 0  # their rule: (step - 1) % update_period == 0
        with sdpa_kernel([SDPBackend.MATH]) if refresh else contextlib.nullcontext():
            return self._step(x, y, refresh)

    def _step(self, x: Tensor, y: Tensor, refresh: bool) -> float:
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
    """Sophia-G as the authors' training script drives ``sophia_opt.SophiaG``.

    Every ``k`` steps: labels sampled from the model's predictive distribution on the batch, the gradient of the
    sampled-label **mean** loss in ``p.grad``, ``opt.update_hessian()`` (EMA of ``p.grad**2``), ``zero_grad``;
    then the ordinary step with ``opt.step(bs=B)`` (the update divides by ``rho * B * hessian``: Gauss-Newton-
    Bartlett, ``B * mean_grad**2``).
    """

    k = 10

    def __init__(self, model, opt, likelihood, seed):
        super().__init__(model, opt, likelihood, seed)
        self.gen = torch.Generator().manual_seed(10_000 + seed)

    def step(self, x: Tensor, y: Tensor) -> float:
        loss, h = self.loss(x, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.t += 1
            return value
        if self.t % self.k == 0:
            y_hat = self.lik.sample(h.detach(), 1, generator=self.gen)[0]
            self.lik.nll(h, y_hat).mean().backward(retain_graph=True)
            self.opt.update_hessian()
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step(bs=h.shape[0])
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return value


class Chained:
    """Several optimizers over disjoint parameters, stepped together (Muon + AdamW), with one lr."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = [o for o in opts if o is not None]

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def hidden_matrices(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``(hidden, rest)``: the 2-D weights of every ``nn.Linear`` but the last one (the output layer), and all
    other parameters (biases, normalisation gains, convolution filters, the output layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for p in linears[-1].parameters()} if linears else set()
    hidden_ids = {id(m.weight) for m in linears[:-1]}
    hidden = [p for p in model.parameters() if id(p) in hidden_ids and p.ndim == 2 and id(p) not in head]
    rest = [p for p in model.parameters() if id(p) not in {id(q) for q in hidden}]
    return hidden, rest


# -- the table --------------------------------------------------------------------------------------------
@dataclass
class OptSpec:
    """One optimizer of the benchmark.

    ``default_lr`` centres the tuning grid; ``build(model, lr, likelihood, seed)`` returns a :class:`Runner`;
    ``requires``: the module it imports (the optimizer is skipped, with the reason, where it is missing);
    ``available``: an extra check returning a reason to skip, or ``""``.
    """

    key: str
    label: str
    default_lr: Callable[[], float]
    build: Callable[[nn.Module, float, str, int], Runner]
    family: str  # "first-order", "matrix", "curvature", "fisher_optim"
    requires: str = ""
    available: Callable[[], str] = lambda: ""
    note: str = ""

    @property
    def fisher(self) -> bool:
        return self.family == "fisher_optim"

    def unavailable(self) -> str:
        """Why this optimizer cannot run here, or ``""``."""
        if self.requires:
            try:
                importlib.import_module(self.requires)
            except ImportError as e:
                return f"{self.requires} is not importable ({e})"
        return self.available()


def fisher_classes() -> tuple[dict[str, type] | None, str]:
    """``({"FisherAdam": cls, ...}, "")`` or ``(None, reason)`` if fisher_optim.optim is missing."""
    try:
        from fisher_optim.optim import FisherAdam, NaturalGradient, ScheduleFreeFisherAdam
    except ImportError as e:
        return None, f"fisher_optim.optim is not importable ({e})"
    return {"FisherAdam": FisherAdam, "NaturalGradient": NaturalGradient,
            "ScheduleFreeFisherAdam": ScheduleFreeFisherAdam}, ""  # fmt: skip


def _signature_lr(cls: type) -> float:
    return float(inspect.signature(cls).parameters["lr"].default)


def _torch(cls, **kw):
    return lambda m, lr, lik, seed: Runner(m, cls(m.parameters(), lr=lr, **kw), lik, seed)


def _package(module: str, name: str, runner: type[Runner] = Runner, **kw):
    def build(m, lr, lik, seed):
        cls = getattr(importlib.import_module(module), name)
        return runner(m, cls(m.parameters(), lr=lr, **kw), lik, seed)

    return build


def _package_lr(module: str, name: str) -> Callable[[], float]:
    return lambda: _signature_lr(getattr(importlib.import_module(module), name))


def _muon(m: nn.Module, lr: float, lik: str, seed: int) -> Runner:
    hidden, rest = hidden_matrices(m)
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw") if hidden else None
    adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=0.01) if rest else None
    return Runner(m, Chained(muon, adamw), lik, seed)


def _sophiag(m: nn.Module, lr: float, lik: str, seed: int) -> Runner:
    from sophia_opt import SophiaG

    return SophiaGRunner(m, SophiaG(m.parameters(), lr=lr, weight_decay=0.0), lik, seed)


def _fisher(cls_name: str, **kw):
    runner = TargetsRunner if kw.get("estimator") == "empirical" else Runner
    if cls_name == "ScheduleFreeFisherAdam":
        runner = ScheduleFreeRunner

    def build(m, lr, lik, seed):
        classes, reason = fisher_classes()
        if classes is None:
            raise RuntimeError(reason)
        return runner(m, classes[cls_name](m, likelihood=lik, lr=lr, seed=seed, **kw), lik, seed)

    return build


def _fisher_lr(cls_name: str, fixed: float | None = None) -> Callable[[], float]:
    def lr():
        if fixed is not None:
            return fixed
        classes, reason = fisher_classes()
        if classes is None:
            raise RuntimeError(reason)
        return _signature_lr(classes[cls_name])

    return lr


def _fisher_available(estimator: str | None = None) -> Callable[[], str]:
    def check():
        classes, reason = fisher_classes()
        if classes is None:
            return reason
        if estimator is not None:
            import fisher_optim

            if estimator not in fisher_optim.ESTIMATORS:
                return f"{estimator!r} is not in fisher_optim.ESTIMATORS {fisher_optim.ESTIMATORS}"
        return ""

    return check


#: FisherAdam's 0.1.0 update: per-input units (divide by sqrt(F)), no signal term, clip 1, lr 5e-3 (the grid's centre)
V010 = dict(units="input", signal=False, clip=1.0)


def make_optimizers() -> dict[str, OptSpec]:
    """Every optimizer of the benchmark, keyed (see the module docstring)."""
    po = "pytorch_optimizer"

    def fisher_adam(key, label, estimator=None):
        kw = {} if estimator is None else {"estimator": estimator}
        return OptSpec(key, label, _fisher_lr("FisherAdam"), _fisher("FisherAdam", **kw), "fisher_optim",
                       available=_fisher_available(estimator))  # fmt: skip

    specs = [
        OptSpec("sgd", "SGD (momentum 0.9)", lambda: 0.03, _torch(torch.optim.SGD, momentum=0.9), "first-order"),
        OptSpec("adam", "Adam", lambda: 1e-3, _torch(torch.optim.Adam), "first-order"),
        OptSpec("adamw", "AdamW (wd 0.01)", lambda: 1e-3, _torch(torch.optim.AdamW), "first-order"),
        OptSpec("schedulefree_adamw", "Schedule-Free AdamW", _package_lr("schedulefree", "AdamWScheduleFree"),
                _package("schedulefree", "AdamWScheduleFree", ScheduleFreeRunner, weight_decay=0.01), "first-order",
                requires="schedulefree"),
        OptSpec("muon", "Muon (+AdamW)", lambda: 1e-3, _muon, "matrix",
                available=lambda: "" if hasattr(torch.optim, "Muon") else "torch.optim.Muon needs torch >= 2.9",
                note="Muon on the 2-D hidden weights, AdamW on the rest (conv filters included: torch's Muon "
                "takes 2-D parameters only)"),
        OptSpec("soap", "SOAP", _package_lr(po, "SOAP"), _package(po, "SOAP"), "matrix", requires=po),
        OptSpec("kron", "PSGD Kron", _package_lr(po, "Kron"), _package(po, "Kron"), "matrix", requires=po),
        OptSpec("adahessian", "AdaHessian", _package_lr(po, "AdaHessian"),
                _package(po, "AdaHessian", HutchinsonRunner), "curvature", requires=po),
        OptSpec("sophiah", "SophiaH", _package_lr(po, "SophiaH"), _package(po, "SophiaH", HutchinsonRunner),
                "curvature", requires=po),
        OptSpec("sophiag", "Sophia-G (GNB)", lambda: 1e-3, _sophiag, "curvature", requires="sophia_opt"),
        fisher_adam("fisher_adam", "FisherAdam auto"),
        OptSpec("sf_fisher_adam", "ScheduleFreeFisherAdam auto", _fisher_lr("ScheduleFreeFisherAdam"),
                _fisher("ScheduleFreeFisherAdam"), "fisher_optim", available=_fisher_available()),
        OptSpec("fisher_adam_010", "FisherAdam auto (0.1.0 units)", _fisher_lr("FisherAdam", 5e-3),
                _fisher("FisherAdam", **V010), "fisher_optim", available=_fisher_available()),
        fisher_adam("fisher_adam_exact", "FisherAdam exact", "exact"),
        fisher_adam("fisher_adam_mc1", "FisherAdam mc1", "mc1"),
        fisher_adam("fisher_adam_hutchinson_batch", "FisherAdam hutchinson_batch", "hutchinson_batch"),
        fisher_adam("fisher_adam_mc2", "FisherAdam mc2", "mc2"),
        OptSpec("fisher_adam_empirical", "FisherAdam empirical", _fisher_lr("FisherAdam"),
                _fisher("FisherAdam", estimator="empirical"), "fisher_optim",
                available=_fisher_available("empirical")),
        OptSpec("natural_gradient", "NaturalGradient auto", _fisher_lr("NaturalGradient"), _fisher("NaturalGradient"),
                "fisher_optim", available=_fisher_available()),
    ]  # fmt: skip
    return {s.key: s for s in specs}


OPTIMIZERS = tuple(make_optimizers())
DEFAULT_OPTIMIZERS = tuple(k for k in OPTIMIZERS if k not in ("fisher_adam_mc2", "fisher_adam_empirical"))
REFERENCE = "adamw"
