r"""Pure functions behind the Fisher optimizers: the fused update and the preconditioner refresh.

Every optimizer of :mod:`fisher_optim.optim` is the same two steps, with different constants
(docs/design.md §1, §5: one functional core, thin classes):

**Refresh** (every ``fisher_interval`` steps, *outside* the fused update), :func:`refresh_preconditioner`.
For a fresh estimate :math:`\hat F` (mean over inputs of the per-input diagonal Fisher,
:func:`fisher_optim.diagonal_fisher`'s contract) and the refresh counter :math:`k`:

.. math::

    \bar F \leftarrow \beta_2 \bar F + (1-\beta_2)\hat F, \qquad k \leftarrow k + 1, \qquad
    r = 1 \Big/ \Big(\big(\max(\bar F / (1-\beta_2^{k}),\, 0) + \lambda\big)^{p} + \epsilon\Big)

``p = 1/2`` for :class:`~fisher_optim.optim.FisherAdam`, ``p = 1`` for
:class:`~fisher_optim.optim.NaturalGradient`.  The clamp at zero matters for Î₂ (``mc2``), whose
estimates can be negative (docs/fisher-math.md §6h).  The preconditioner ``r`` only changes here, so it is stored
(state ``precond``) and the per-step update never recomputes a square root or a division.

**Update** (every step), :func:`preconditioned_update`, for the parameters that have a gradient:

.. math::

    t \leftarrow t + 1, \quad \hat m \leftarrow \hat m + w_t (g - \hat m), \quad
    \theta \leftarrow \theta (1 - \eta\,w_d), \quad
    \theta \leftarrow \theta - \eta\, \mathrm{clip}_c(s\, \hat m\, r)

With bias correction, :math:`w_t = (1-\beta_1)/(1-\beta_1^t)` and :math:`\hat m` is exactly Adam's
bias-corrected first moment :math:`m_t/(1-\beta_1^t)` (kept corrected, so no per-step division);
without, :math:`w = 1-\beta_1` and :math:`s = 1/(1-\beta_1)` turns the EMA into heavy-ball momentum
:math:`m = \beta_1 m + g = s\,\hat m`.  :math:`w_d` is the decoupled weight decay and ``c`` the optional
per-coordinate clip (Sophia-style; ``None``: no clip, and the step is one fused ``addcmul_``).

Both functions have a for-loop path and a ``torch._foreach_*`` path over tensors grouped by device and
dtype (:meth:`torch.optim.Optimizer._group_tensors_by_device_and_dtype`); both perform the same
floating-point operations in the same order, so they give bit-identical results.  Neither reads a tensor
value on the host (no ``.item()``, no branch on values): step counters are tensors and the bias
corrections are computed from them on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["preconditioned_update", "refresh_preconditioner", "fisher_adam", "natural_gradient", "default_foreach"]


def default_foreach(tensors: list[Tensor]) -> bool:
    """``foreach=None`` resolves to ``True`` when every tensor is a plain tensor on a CUDA device.

    This is torch.optim's rule (``_default_to_fused_or_foreach``).  On the CPU the for-loop is kept as the
    default, as torch does; ``foreach=True`` also works there (see ``benchmarks/results/optim_step.md``).
    """
    return bool(tensors) and all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cuda" for t in tensors)


# -- update ---------------------------------------------------------------------------------------------
def _ema_weight(step: Tensor, beta1: float) -> Tensor:
    r"""Bias-corrected weight of the new gradient, :math:`(1-\beta_1)/(1-\beta_1^t)`, from a step tensor."""
    return torch.pow(beta1, step).neg_().add_(1).reciprocal_().mul_(1.0 - beta1)


def _ema_weights(steps: list[Tensor], beta1: float, bias_correction: bool) -> list[Tensor] | float:
    """:func:`_ema_weight` for a list of step tensors (the same operations, as ``torch._foreach_*`` calls),
    or the constant ``1 - beta1`` without bias correction."""
    if not bias_correction:
        return 1.0 - beta1
    w = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(w)
    torch._foreach_add_(w, 1)
    torch._foreach_reciprocal_(w)
    torch._foreach_mul_(w, 1.0 - beta1)
    return w


def preconditioned_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    preconds: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    bias_correction: bool,
    step_scale: float = 1.0,
    weight_decay: float,
    clip: float | None,
    foreach: bool | None = None,
) -> None:
    r"""In place, for every parameter: ``step += 1``, ``exp_avg.lerp_(grad, w)``, decoupled weight decay and
    ``param -= lr * clip(step_scale * exp_avg * precond)`` (see the module docstring).

    ``precond`` is the stored reciprocal ``1/d`` (:func:`refresh_preconditioner`), ``steps`` one scalar tensor
    per parameter.  With ``bias_correction`` the weight is ``w = (1-beta1)/(1-beta1^step)``, so ``exp_avg``
    *is* the bias-corrected average :math:`\hat m_t` (the same numbers as Adam's ``m_t/(1-\beta_1^t)``);
    otherwise ``w = 1-beta1``.  ``exp_avg``/``precond`` may be float32 for bf16/fp16 parameters; the step is
    then computed in float32 and rounded once into the parameter.
    """
    if not params:
        return
    if foreach is None:
        foreach = default_foreach(params)
    alpha = -lr * step_scale
    if not foreach:
        for p, g, m, r, t in zip(params, grads, exp_avgs, preconds, steps):
            t.add_(1)
            m.lerp_(g.to(m.dtype), _ema_weight(t, beta1) if bias_correction else 1.0 - beta1)
            if weight_decay != 0:
                p.mul_(1.0 - lr * weight_decay)
            if clip is None:
                p.addcmul_(m, r, value=alpha)
            else:
                p.add_(m.mul(r).clamp_(-clip / step_scale, clip / step_scale), alpha=alpha)
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, preconds, steps])
    for (p_, g_, m_, r_, t_), _ in grouped.values():
        torch._foreach_add_(t_, 1)
        if g_[0].dtype != m_[0].dtype:  # bf16/fp16 gradients, float32 state
            g_ = [g.to(m.dtype) for g, m in zip(g_, m_)]
        torch._foreach_lerp_(m_, g_, _ema_weights(t_, beta1, bias_correction))
        if weight_decay != 0:
            torch._foreach_mul_(p_, 1.0 - lr * weight_decay)
        if clip is None:
            torch._foreach_addcmul_(p_, m_, r_, value=alpha)
        else:
            u = torch._foreach_mul(m_, r_)
            torch._foreach_clamp_min_(u, -clip / step_scale)
            torch._foreach_clamp_max_(u, clip / step_scale)
            torch._foreach_add_(p_, u, alpha=alpha)


def fisher_adam(params, grads, exp_avgs, preconds, steps, *, lr, beta1, weight_decay, clip, foreach=None) -> None:
    r"""FisherAdam's update: ``param -= lr * clip(m_hat * precond)`` with ``m_hat`` the bias-corrected EMA of
    gradients (kept in ``exp_avgs``) and ``precond = 1/(sqrt(F_hat) + eps)`` (:func:`refresh_preconditioner`,
    ``power=0.5``)."""
    preconditioned_update(
        params, grads, exp_avgs, preconds, steps, lr=lr, beta1=beta1, bias_correction=True,
        weight_decay=weight_decay, clip=clip, foreach=foreach,
    )  # fmt: skip


def natural_gradient(params, grads, exp_avgs, preconds, steps, *, lr, momentum, weight_decay, clip,
                     foreach=None) -> None:  # fmt: skip
    r"""NaturalGradient's update: heavy-ball momentum ``m = mu m + g`` kept as the EMA ``exp_avg = (1-mu) m``,
    ``param -= lr * clip(m * precond)`` with ``precond = 1/(F_hat + lambda)`` (``power=1``)."""
    preconditioned_update(
        params, grads, exp_avgs, preconds, steps, lr=lr, beta1=momentum, bias_correction=False,
        step_scale=1.0 / (1.0 - momentum), weight_decay=weight_decay, clip=clip, foreach=foreach,
    )  # fmt: skip


# -- refresh --------------------------------------------------------------------------------------------
def refresh_preconditioner(
    fisher_emas: list[Tensor],
    fisher_counts: list[Tensor],
    estimates: list[Tensor],
    preconds: list[Tensor],
    *,
    beta2: float,
    power: float,
    damping: float,
    eps: float,
    foreach: bool | None = None,
) -> None:
    r"""In place: fold a fresh estimate into the running Fisher and recompute the preconditioner.

    ``fisher_ema = beta2 fisher_ema + (1 - beta2) estimate``, ``fisher_count += 1`` and
    ``precond = 1 / ((max(fisher_ema / (1 - beta2^count), 0) + damping) ** power + eps)``.
    ``estimates`` are cast to the running estimate's dtype (float32 for bf16/fp16 parameters).
    """
    if not fisher_emas:
        return
    estimates = [e.to(f.dtype) for e, f in zip(estimates, fisher_emas)]
    if foreach is None:
        foreach = default_foreach(fisher_emas)
    if not foreach:
        for f, k, e, d in zip(fisher_emas, fisher_counts, estimates, preconds):
            k.add_(1)
            f.mul_(beta2).add_(e, alpha=1.0 - beta2)
            bc = torch.pow(beta2, k).neg_().add_(1)
            x = f.div(bc).clamp_min_(0).add_(damping)
            x = x.sqrt_() if power == 0.5 else x if power == 1 else x.pow_(power)
            torch.reciprocal(x.add_(eps), out=d)
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([fisher_emas, fisher_counts, estimates, preconds])
    for (f_, k_, e_, d_), _ in grouped.values():
        torch._foreach_add_(k_, 1)
        torch._foreach_mul_(f_, beta2)
        torch._foreach_add_(f_, e_, alpha=1.0 - beta2)
        bc = torch._foreach_pow(beta2, k_)
        torch._foreach_neg_(bc)
        torch._foreach_add_(bc, 1)
        x = torch._foreach_div(f_, bc)
        torch._foreach_clamp_min_(x, 0)
        torch._foreach_add_(x, damping)
        if power == 0.5:
            torch._foreach_sqrt_(x)
        elif power != 1:
            torch._foreach_pow_(x, power)
        torch._foreach_add_(x, eps)
        torch._foreach_reciprocal_(x)
        torch._foreach_copy_(d_, x)
