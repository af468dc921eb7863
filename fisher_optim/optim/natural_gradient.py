r"""NaturalGradient: damped diagonal natural gradient with heavy-ball momentum."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .._checks import check_clip, check_decay, check_finite_nonnegative, check_nonnegative
from ..likelihoods import Likelihood
from ..settings import FisherSettings
from .base import FisherOptimizer
from .units import LossScale

__all__ = ["NaturalGradient"]


class NaturalGradient(FisherOptimizer):
    r"""Diagonal natural gradient, :math:`\theta \leftarrow \theta - \eta\,\mathrm{clip}_c(m / (\tilde F + \lambda))`.

    .. math::

        m_t &= \mu\, m_{t-1} + g_t \\
        \bar F_k &= \beta \bar F_{k-1} + (1-\beta) \hat F_k, \qquad \tilde F = \bar F_k / (1-\beta^k)
            \quad\text{(refresh } k\text{, every } \texttt{fisher\_interval} \text{ steps)} \\
        \theta_t &= \theta_{t-1}(1-\eta w) - \eta\,\mathrm{clip}_c\!\big(m_t / (\max(\tilde F, 0) + \lambda)\big)

    ``g`` is the gradient of the mean (over the batch) per-input negative log-likelihood and
    :math:`\hat F_k` (refresh ``k``) the mean over inputs of the per-input diagonal Fisher
    (:func:`fisher_optim.diagonal_fisher`), :math:`\tilde F` its bias-corrected running average: the Fisher of
    that same mean loss, so with ``lr=1``, no momentum and no damping the step is the diagonal
    Fisher-scoring (Gauss-Newton) step.  With another ``loss_reduction`` (a :class:`~fisher_optim.FisherSettings`
    field) the Fisher is put in that loss's units: the curvature of :math:`L = w \sum_m \ell_m` is
    :math:`wB\,F` (:mod:`fisher_optim.optim.units`, docs/fisher-math.md §15; 1 for the mean loss).
    Momentum ``mu`` multiplies the long-run step by ``1/(1-mu)``.
    With a ``clip`` this is Sophia's update (Liu et al. 2023) with a true-Fisher estimate.  Without it the
    defaults diverge on sklearn digits (tiny Fisher entries with large data gradients), hence ``clip=1``.
    State: ``exp_avg`` holds the gradient EMA :math:`(1-\mu)\, m_t`, so the step uses ``exp_avg / (1 - mu)``
    (the same numbers as heavy-ball momentum, one fused ``lerp_`` per step).

    Args:
        model, likelihood, params, settings, foreach, **kwargs: as in :class:`~fisher_optim.optim.FisherAdam`.
        lr: learning rate :math:`\eta` (default 2e-3, from the sweep of ``benchmarks/defaults_sweep.py``, see
            ``benchmarks/results/defaults_sweep.md``; the former 5e-3, tuned on sklearn digits, fell behind
            AdamW(lr=1e-3) on the Transformer classifier and the BatchNorm networks.  With momentum 0.9 the
            long-run step is ``10 lr`` times the natural-gradient direction).
        momentum: :math:`\mu` (default 0.9).
        damping: :math:`\lambda > 0` (default 1e-3), the Levenberg-Marquardt damping: it bounds the step
            where the Fisher is small.
        fisher_decay: :math:`\beta`, decay per refresh of the running Fisher (default 0.99; FisherAdam's
            ``betas[1]``; both optimizers expose it as the read-only ``opt.fisher_decay``).
        weight_decay: decoupled weight decay :math:`w` (default 0).
        clip: per-coordinate bound of :math:`m/(\tilde F+\lambda)` (default 1.0, ``None``: no clip).

    Example:
        >>> import torch
        >>> from fisher_optim.optim import NaturalGradient
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = NaturalGradient(model, likelihood="categorical", estimator="exact")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'fisher_count', 'fisher_ema', 'precond', 'step']
        >>> opt.close()
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        params: Iterable | None = None,
        lr: float = 2e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        fisher_decay: float = 0.99,
        clip: float | None = 1.0,
        settings: FisherSettings | None = None,
        foreach: bool | None = None,
        **kwargs,
    ):
        settings = FisherSettings.build(settings, owner=type(self).__name__, **kwargs)
        if settings.signal:
            raise ValueError("Invalid signal: True. NaturalGradient divides by the curvature; it has no signal term")
        check_finite_nonnegative("learning rate", lr)
        check_decay("momentum value", momentum)
        if not damping > 0.0:
            raise ValueError(f"Invalid damping value: {damping}")
        check_decay("fisher_decay value", fisher_decay)
        check_nonnegative("weight_decay value", weight_decay)
        check_clip(clip)
        defaults = dict(lr=lr, momentum=momentum, damping=damping, fisher_decay=fisher_decay,
                        weight_decay=weight_decay, clip=clip, foreach=foreach)  # fmt: skip
        super().__init__(model, likelihood, params, defaults, settings)

    @property
    def _precond_key(self) -> str:
        return "precond"

    def _update_kwargs(self, group: dict, scale: LossScale | None) -> dict:
        mu = group["momentum"]
        return dict(lr=group["lr"], beta1=mu, bias_correction=False, step_scale=1.0 / (1.0 - mu),
                    weight_decay=group["weight_decay"], clip=group["clip"])  # fmt: skip

    def _refresh_kwargs(self, group: dict) -> dict:
        return dict(beta2=group["fisher_decay"])

    def _precond_kwargs(self, group: dict, scale: LossScale | None) -> dict:
        return dict(floor=self.settings.floor, reciprocal=True,
                    fisher_scale=1.0 if scale is None else scale.curvature_scale, damping=group["damping"],
                    power=1.0, eps=0.0)  # fmt: skip
