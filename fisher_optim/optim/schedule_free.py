r"""ScheduleFreeFisherAdam: Schedule-Free iterates (Defazio et al., NeurIPS 2024) with FisherAdam's denominator."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._checks import check_clip
from ..likelihoods import Likelihood
from ..settings import FisherSettings
from ._functional import schedule_free_swap, schedule_free_update
from .base import FisherOptimizer
from .fisher_adam import check_adam_hyperparameters, fisher_scale
from .state import state_dtype
from .units import LossScale

__all__ = ["ScheduleFreeFisherAdam"]

#: the average's weights are ``lr_max ** WEIGHT_LR_POWER`` (schedulefree's ``weight_lr_power=2``, ``r=0``)
WEIGHT_LR_POWER = 2.0


class ScheduleFreeFisherAdam(FisherOptimizer):
    r"""Schedule-Free FisherAdam: no learning-rate schedule, an average of the iterates, the Fisher at ``y``.

    Schedule-Free (Defazio et al. 2024, the ``schedulefree`` package's ``AdamWScheduleFree``) keeps three points:
    the base iterate ``z``, the average ``x`` (what is evaluated) and the point ``y`` where the gradient is taken:

    .. math::

        y_t &= (1-\beta)\, z_t + \beta\, x_t, \qquad g_t = \nabla L(y_t), \qquad
            u_t = \mathrm{clip}_c\Big(\frac{g_t}{\sqrt{F/B} + \epsilon}\Big) + w\, y_t \\
        z_{t+1} &= z_t - \eta_t u_t, \qquad x_{t+1} = (1 - c_{t+1})\, x_t + c_{t+1} z_{t+1}, \qquad
            c_{t+1} = \frac{\eta_{\max,t+1}^2}{\sum_{i \le t+1} \eta_{\max,i}^2}

    with :math:`\eta_t` the lr times a linear warmup over ``warmup_steps``, ``F`` the running Fisher
    (per-input units, as :class:`~fisher_optim.optim.FisherAdam`: refreshed every ``fisher_interval`` steps,
    decay ``betas[1]`` per refresh), ``F/B`` its value in the training loss's units (``B`` inputs in the captured
    batch; ``settings.loss_reduction``, :mod:`fisher_optim.optim.units`) and ``c`` the clip (default 1: a
    coordinate of ``z`` moves by at most :math:`\eta`).  Schedule-Free has no first moment, so the raw gradient is
    divided; with ``signal=True`` (a :class:`~fisher_optim.FisherSettings` field) the denominator is
    :math:`\sqrt{F/B + \hat m^2}` instead, :math:`\hat m` the bias-corrected EMA of the gradients (decay
    :math:`\beta`): Adam's signal term.  :math:`\eta_{\max,t}` is the largest lr so far and the average's weight
    :math:`\eta_{\max}^2`, the package's defaults (``r=0``, ``weight_lr_power=2``).  The clip was the better of
    the two in a one-seed lr-tuned check (``benchmarks/results/update_ablation.md``).

    **The Fisher is estimated at y.**  In train mode the model's parameters hold ``y``: the training forward, its
    gradient and the captured batch that the refresh estimates on are all at ``y``, with no special case (a
    wrapper that swaps the parameters to ``z`` for an inner optimizer would estimate at the wrong point).
    ``opt.eval()`` puts ``x`` into the parameters (evaluate, checkpoint for deployment, ``EWC.consolidate``),
    ``opt.train()`` puts ``y`` back, exactly as ``schedulefree``'s optimizers do (and, as there, BatchNorm running
    statistics are those of the ``y`` forwards).  The optimizer starts in train mode (before the first step
    ``x = y = z``, so ``eval()``/``train()`` change nothing then); ``step()`` in eval mode raises, and a forward
    without gradients (an evaluation) while in train mode after the first step warns once.

    State per parameter: FisherAdam's (``step``, ``exp_avg``, ``fisher_ema``, ``fisher_count``, ``precond``) and
    ``z``; per group: ``k`` (steps taken), ``weight_sum``, ``lr_max``, ``train_mode`` (all in ``state_dict``).

    Args:
        model, likelihood, params, settings, foreach, **kwargs: as in :class:`~fisher_optim.optim.FisherAdam`.
        lr: :math:`\eta` (default 2.5e-3, ``schedulefree.AdamWScheduleFree``'s; Schedule-Free takes larger
            learning rates than a scheduled Adam).
        betas: :math:`(\beta, \beta_2)`: the interpolation :math:`\beta` (default 0.9) and the running Fisher's
            decay per refresh (default 0.99).
        eps, weight_decay: as in FisherAdam (weight decay at ``y``, as schedulefree's).
        clip: per-coordinate bound ``c`` of ``g / d`` (default 1.0; ``None``: no clip).
        warmup_steps: linear lr warmup (default 0).
        settings, **kwargs: as in FisherAdam, ``loss_reduction``, ``units``, ``signal`` and ``floor`` included.

    Example:
        >>> import torch
        >>> from fisher_optim import ScheduleFreeFisherAdam
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> opt = ScheduleFreeFisherAdam(model, estimator="exact")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> for _ in range(3):
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> opt.eval()        # parameters hold x: evaluate
        >>> with torch.no_grad():
        ...     _ = model(x)
        >>> opt.train()       # parameters hold y: train on
        >>> opt.close()
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        params: Iterable | None = None,
        lr: float = 5e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        clip: float | None = 1.0,
        warmup_steps: int = 0,
        settings: FisherSettings | None = None,
        foreach: bool | None = None,
        **kwargs,
    ):
        settings = FisherSettings.build(settings, owner=type(self).__name__, **kwargs)
        defaults = check_adam_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_clip(clip)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps}")
        defaults.update(clip=clip, warmup_steps=warmup_steps, foreach=foreach, k=0, weight_sum=0.0, lr_max=-1.0,
                        train_mode=True)  # fmt: skip
        super().__init__(model, likelihood, params, defaults, settings)
        self._warned_eval = False
        ref = weakref.ref(self)  # the capture's hooks hold no reference to the optimizer

        def on_eval_forward():
            opt = ref()
            if opt is not None:
                opt._eval_forward()

        self._capture.on_eval_forward = on_eval_forward

    # -- train / eval --------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Whether the parameters hold ``y`` (train mode) rather than ``x`` (eval mode)."""
        return all(g["train_mode"] for g in self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the average ``x`` into the parameters (``y -> x``); a no-op in eval mode or before the first step."""
        for group in self.param_groups:
            if group["train_mode"]:
                ps = [p for p in group["params"] if "z" in self.state.get(p, {})]
                schedule_free_swap(ps, [self.state[p]["z"] for p in ps], 1.0 - 1.0 / group["betas"][0])
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put the gradient point ``y`` back into the parameters (``x -> y``); a no-op in train mode."""
        for group in self.param_groups:
            if not group["train_mode"]:
                ps = [p for p in group["params"] if "z" in self.state.get(p, {})]
                schedule_free_swap(ps, [self.state[p]["z"] for p in ps], 1.0 - group["betas"][0])
                group["train_mode"] = True

    def _eval_forward(self) -> None:
        if self._warned_eval or not self.training or self._schedule.steps == 0:
            return
        self._warned_eval = True
        warnings.warn(
            f"{type(self).__name__}: the model ran a forward without gradients (an evaluation?) while the optimizer "
            "is in train mode, so its parameters hold y, the gradient point, not the average x that Schedule-Free "
            "evaluates: call opt.eval() before evaluating and opt.train() before the next training step",
            UserWarning,
            stacklevel=4,
        )

    # -- the step ------------------------------------------------------------------------------------
    def step(self, closure=None, *, targets: Tensor | None = None):
        """One Schedule-Free step at ``y`` (see :meth:`FisherOptimizer.step`); raises in eval mode."""
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode (the parameters hold the average x): "
                "call opt.train() before training steps"
            )
        return super().step(closure, targets=targets)

    def _init_state(self, p: Tensor) -> dict:
        state = super()._init_state(p)
        state["z"] = p.detach().to(state_dtype(p), copy=True)
        return state

    def _update_kwargs(self, group: dict, scale: LossScale) -> dict:
        signal = None
        if self.settings.signal:
            signal = dict(fisher_scale=fisher_scale(self.settings, scale), damping=0.0, eps=group["eps"])
        return dict(clip=group["clip"], weight_decay=group["weight_decay"], signal=signal,
                    signal_beta=group["betas"][0])  # fmt: skip

    def _refresh_kwargs(self, group: dict) -> dict:
        return dict(beta2=group["betas"][1])

    def _precond_kwargs(self, group: dict, scale: LossScale | None) -> dict:
        if self.settings.signal:
            return dict(floor=self.settings.floor, reciprocal=False)
        return dict(floor=self.settings.floor, reciprocal=True, fisher_scale=fisher_scale(self.settings, scale),
                    damping=0.0, power=0.5, eps=group["eps"])  # fmt: skip

    def _update(self, group, params, grads, states, scale) -> None:
        k = group["k"]
        sched = min(1.0, (k + 1) / group["warmup_steps"]) if group["warmup_steps"] > 0 else 1.0
        lr = group["lr"] * sched
        group["lr_max"] = lr_max = max(lr, group["lr_max"])
        weight = lr_max**WEIGHT_LR_POWER  # schedulefree's defaults: r = 0, weight_lr_power = 2
        group["weight_sum"] += weight
        ckp1 = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
        group["k"] = k + 1
        schedule_free_update(
            params,
            grads,
            [s["z"] for s in states],
            [s["exp_avg"] for s in states] if self.settings.signal else None,
            [s[self._precond_key] for s in states],
            [s["step"] for s in states],
            lr=lr,
            beta=group["betas"][0],
            ckp1=ckp1,
            foreach=group["foreach"],
            **self._update_kwargs(group, scale),
        )


