r"""Pure functions behind the Fisher optimizers: the fused updates and the refresh of the running Fisher.

Every optimizer of :mod:`fisher_optim.optim` is the same three steps, with different constants
(docs/design.md §1, §5: one functional core, thin classes):

**Refresh** (every ``fisher_interval`` steps, *outside* the fused update), :func:`refresh_fisher`: for a fresh
estimate :math:`\hat F` (mean over inputs of the per-input diagonal Fisher, :func:`fisher_optim.diagonal_fisher`'s
contract), :math:`\bar F \leftarrow \beta_2 \bar F + (1-\beta_2)\hat F` and the refresh counter ``k += 1``.

**Precondition** (after a refresh, and when the training loss's size changes), :func:`precondition`:

.. math::

    F = \max\!\big(\bar F / (1-\beta_2^{k}),\, 0\big) \quad (\text{optionally } \max(F, \rho\,\mathrm{mean}\,F)),
    \qquad r = 1 \big/ \big((s_F F + \lambda)^p + \epsilon\big)

stored as state ``precond``, so that an ordinary step computes no square root and no division.  ``s_F`` puts the
per-input Fisher in the training loss's units (:mod:`fisher_optim.optim.units`): FisherAdam ``p = 1/2`` and
:math:`s_F = 1/B` for a loss averaged over ``B`` inputs (the covariance of the mini-batch gradient, Adam's units;
docs/fisher-math.md §15); NaturalGradient ``p = 1`` and :math:`s_F = 1` (the curvature of that mean loss).  The
clamp at zero matters for Î₂ (``mc2``), whose estimates can be negative (docs/fisher-math.md §6h).

**Update** (every step), :func:`preconditioned_update`, for the parameters that have a gradient:

.. math::

    t \leftarrow t + 1, \quad \hat m \leftarrow \hat m + w_t (g - \hat m), \quad
    \theta \leftarrow \theta (1 - \eta\,w_d), \quad
    \theta \leftarrow \theta - \eta\, \mathrm{clip}_c(s\, \hat m\, r)

With bias correction, :math:`w_t = (1-\beta_1)/(1-\beta_1^t)` and :math:`\hat m` is exactly Adam's bias-corrected
first moment (kept corrected, so no per-step division); without, :math:`w = 1-\beta_1` and :math:`s = 1/(1-\beta_1)`
turns the EMA into heavy-ball momentum :math:`m = \beta_1 m + g = s\,\hat m` (NaturalGradient).  :math:`w_d` is the
decoupled weight decay and ``c`` the per-coordinate clip (``None``: no clip, and the step is one fused
``addcmul_``).  With Adam's signal term (FisherAdam's ``signal=True``) the state holds ``F`` itself and the step
divides by :math:`\sqrt{s_F F + \hat m^2 + \lambda} + \epsilon`, computed every step as Adam's denominator is.
ScheduleFreeFisherAdam's step is :func:`schedule_free_update` (the same preconditioner; Schedule-Free's ``y/z``).

Every function has a for-loop path and a ``torch._foreach_*`` path over tensors grouped by device and
dtype (:meth:`torch.optim.Optimizer._group_tensors_by_device_and_dtype`); both perform the same
floating-point operations in the same order, so they give bit-identical results.  Neither reads a tensor
value on the host for accelerator tensors (no ``.item()``, no branch on values): step counters are tensors and the
bias corrections are computed from them on the device (CPU counters are read: free there).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "preconditioned_update",
    "schedule_free_update",
    "schedule_free_swap",
    "refresh_fisher",
    "precondition",
    "fisher_adam",
    "natural_gradient",
    "default_foreach",
]


def default_foreach(tensors: list[Tensor]) -> bool:
    """``foreach=None`` resolves to ``True`` when every tensor is a plain tensor on a CUDA device.

    This is torch.optim's rule (``_default_to_fused_or_foreach``).  On the CPU the for-loop is kept as the
    default, as torch does; ``foreach=True`` also works there (see ``benchmarks/results/optim_step.md``).
    """
    return bool(tensors) and all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cuda" for t in tensors)


# -- update ---------------------------------------------------------------------------------------------
def _ema_weight(step: Tensor, beta1: float) -> Tensor | float:
    r"""Bias-corrected weight of the new gradient, :math:`(1-\beta_1)/(1-\beta_1^t)`, from a step tensor: on the
    device (no host read) for an accelerator's counter; for a CPU counter a Python float (reading it costs nothing,
    and five scalar tensor operations per parameter cost more than the update of a small layer)."""
    if step.device.type == "cpu":
        return (1.0 - beta1) / (1.0 - beta1 ** float(step))
    return torch.pow(beta1, step).neg_().add_(1).reciprocal_().mul_(1.0 - beta1)


def _lerp_all(ms: list[Tensor], gs: list[Tensor], w: list[Tensor] | list[float] | float) -> None:
    """``m.lerp_(g, w)`` for every pair, fused where ``w`` is one number or a list of tensors."""
    if isinstance(w, list) and w and not isinstance(w[0], Tensor):  # CPU counters at different steps
        for m, g, x in zip(ms, gs, w):
            m.lerp_(g, x)
    else:
        torch._foreach_lerp_(ms, gs, w)


def _ema_weights(steps: list[Tensor], beta1: float, bias_correction: bool) -> list[Tensor] | list[float] | float:
    """:func:`_ema_weight` for a list of step tensors (the same operations, as ``torch._foreach_*`` calls),
    or the constant ``1 - beta1`` without bias correction.  CPU counters that all hold the same step give one
    Python float (:func:`_ema_weight`'s)."""
    if not bias_correction:
        return 1.0 - beta1
    if steps[0].device.type == "cpu":
        w = [_ema_weight(t, beta1) for t in steps]
        return w[0] if all(x == w[0] for x in w) else w
    w = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(w)
    torch._foreach_add_(w, 1)
    torch._foreach_reciprocal_(w)
    torch._foreach_mul_(w, 1.0 - beta1)
    return w


def _signal_denominator(f: Tensor, m: Tensor, *, fisher_scale: float, damping: float, eps: float) -> Tensor:
    r"""One tensor's :math:`d = \sqrt{s_F F + \hat m^2 + \lambda} + \epsilon` (a new tensor): the signal term's
    denominator, which changes with :math:`\hat m` at every step."""
    d = f.mul(fisher_scale).addcmul_(m, m)
    if damping != 0:
        d.add_(damping)
    d.sqrt_()
    if eps != 0:
        d.add_(eps)
    return d


def _signal_denominators(f_: list[Tensor], m_: list[Tensor], *, fisher_scale: float, damping: float,
                         eps: float) -> list[Tensor]:  # fmt: skip
    """:func:`_signal_denominator` for lists, as ``torch._foreach_*`` calls (the same operations in the same order)."""
    d = torch._foreach_mul(f_, fisher_scale)
    torch._foreach_addcmul_(d, m_, m_)
    if damping != 0:
        torch._foreach_add_(d, damping)
    torch._foreach_sqrt_(d)
    if eps != 0:
        torch._foreach_add_(d, eps)
    return d


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
    signal: dict | None = None,
    foreach: bool | None = None,
) -> None:
    r"""In place, for every parameter (see the module docstring):

    ``step += 1``, ``exp_avg.lerp_(grad, w)``, ``param *= 1 - lr * weight_decay`` and
    ``param -= lr * clip(step_scale * exp_avg * precond)``.

    ``precond`` is the stored reciprocal denominator :math:`1/((s_F F + \lambda)^p + \epsilon)` of
    :func:`precondition` (it changes only at a refresh or when the loss's size changes), so a step reads it and
    computes no square root.  With ``signal=dict(fisher_scale=s, damping=λ, eps=ε)`` (Adam's signal term)
    ``preconds`` hold the running Fisher ``F`` instead and the denominator
    :math:`\sqrt{s F + \hat m^2 + \lambda} + \epsilon` is computed at every step.  ``steps`` holds one scalar tensor
    per parameter.  With ``bias_correction`` the weight is ``w = (1-beta1)/(1-beta1^step)``, so ``exp_avg`` *is*
    the bias-corrected average :math:`\hat m_t` (the same numbers as Adam's ``m_t/(1-\beta_1^t)``); otherwise
    ``w = 1-beta1``.  ``exp_avg``/``precond`` may be float32 for bf16/fp16 parameters; the step is then computed
    in float32 and rounded once into the parameter.  ``clip=None``: no clip (one fused ``addcmul_``).
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
            if signal is not None:
                u = m.div(_signal_denominator(r, m, **signal))
                if clip is not None:
                    u.clamp_(-clip / step_scale, clip / step_scale)
                p.add_(u, alpha=alpha)
            elif clip is None:
                p.addcmul_(m, r, value=alpha)
            else:
                p.add_(m.mul(r).clamp_(-clip / step_scale, clip / step_scale), alpha=alpha)
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, preconds, steps])
    for (p_, g_, m_, r_, t_), _ in grouped.values():
        torch._foreach_add_(t_, 1)
        if g_[0].dtype != m_[0].dtype:  # bf16/fp16 gradients, float32 state
            g_ = [g.to(m.dtype) for g, m in zip(g_, m_)]
        _lerp_all(m_, g_, _ema_weights(t_, beta1, bias_correction))
        if weight_decay != 0:
            torch._foreach_mul_(p_, 1.0 - lr * weight_decay)
        if signal is None and clip is None:
            torch._foreach_addcmul_(p_, m_, r_, value=alpha)
            continue
        u = torch._foreach_div(m_, _signal_denominators(r_, m_, **signal)) if signal else torch._foreach_mul(m_, r_)
        if clip is not None:
            torch._foreach_clamp_min_(u, -clip / step_scale)
            torch._foreach_clamp_max_(u, clip / step_scale)
        torch._foreach_add_(p_, u, alpha=alpha)


def schedule_free_update(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avgs: list[Tensor] | None,
    preconds: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta: float,
    ckp1: float,
    weight_decay: float,
    clip: float | None,
    signal: dict | None = None,
    signal_beta: float = 0.9,
    foreach: bool | None = None,
) -> None:
    r"""Schedule-Free step (Defazio et al. 2024) with the Fisher denominator, in place; ``params`` hold ``y``.

    With :math:`u = \mathrm{clip}_c(g \cdot r) + w_d\,y` (weight decay at ``y``, as in
    ``schedulefree.AdamWScheduleFree``), ``r = precond`` the stored reciprocal :math:`1/(\sqrt{s_F F} + \epsilon)`
    (:func:`precondition`), or with ``signal=dict(fisher_scale, damping, eps)`` :math:`g / (\sqrt{s_F F + \hat m^2 +
    \lambda} + \epsilon)` (``preconds`` then hold ``F``; ``\hat m`` the bias-corrected EMA of the gradients with
    decay ``signal_beta``, kept in ``exp_avgs``):

    .. math::

        z' = z - \eta u, \qquad x' = (1 - c)\,x + c\,z', \qquad y' = (1-\beta) z' + \beta x'

    computed on ``y`` and ``z`` alone (``x`` is implicit, :math:`x = (y - (1-\beta) z)/\beta`):
    ``y.lerp_(z, c)``, ``y += eta (beta (1 - c) - 1) u``, ``z -= eta u``.  ``c = ckp1`` is the weight of the new
    iterate in the average (Schedule-Free's :math:`c_{t+1}`).
    """
    if not params:
        return
    if foreach is None:
        foreach = default_foreach(params)
    y_alpha = lr * (beta * (1.0 - ckp1) - 1.0)
    if not foreach:
        for i, (y, g, z, r, t) in enumerate(zip(params, grads, zs, preconds, steps)):
            t.add_(1)
            g = g.to(z.dtype)
            if signal is not None:
                m = exp_avgs[i]
                m.lerp_(g, _ema_weight(t, signal_beta))
                u = g.div(_signal_denominator(r, m, **signal))
            else:
                u = g.mul(r)
            if clip is not None:
                u.clamp_(-clip, clip)
            if weight_decay != 0:
                u.add_(y, alpha=weight_decay)
            y.lerp_(z.to(y.dtype), ckp1)
            y.add_(u, alpha=y_alpha)
            z.sub_(u, alpha=lr)
        return
    lists = [params, grads, zs, preconds, steps] + ([exp_avgs] if signal is not None else [])
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists)
    for tensors, _ in grouped.values():
        y_, g_, z_, r_, t_ = tensors[:5]
        torch._foreach_add_(t_, 1)
        if g_[0].dtype != z_[0].dtype:
            g_ = [g.to(z.dtype) for g, z in zip(g_, z_)]
        if signal is not None:
            m_ = tensors[5]
            _lerp_all(m_, g_, _ema_weights(t_, signal_beta, True))
            u = torch._foreach_div(g_, _signal_denominators(r_, m_, **signal))
        else:
            u = torch._foreach_mul(g_, r_)
        if clip is not None:
            torch._foreach_clamp_min_(u, -clip)
            torch._foreach_clamp_max_(u, clip)
        if weight_decay != 0:
            torch._foreach_add_(u, y_, alpha=weight_decay)
        if y_[0].dtype != z_[0].dtype:
            torch._foreach_lerp_(y_, [z.to(y.dtype) for z, y in zip(z_, y_)], ckp1)
        else:
            torch._foreach_lerp_(y_, z_, ckp1)
        torch._foreach_add_(y_, u, alpha=y_alpha)
        torch._foreach_sub_(z_, u, alpha=lr)


def schedule_free_swap(params: list[Tensor], zs: list[Tensor], weight: float) -> None:
    """``param.lerp_(z, weight)`` for every pair: ``weight = 1 - 1/beta`` turns ``y`` into ``x`` (``eval()``),
    ``weight = 1 - beta`` turns ``x`` into ``y`` (``train()``)."""
    for p, z in zip(params, zs):
        p.lerp_(z.to(p.dtype), weight)


def fisher_adam(params, grads, exp_avgs, preconds, steps, *, lr, beta1, weight_decay, clip=1.0, foreach=None) -> None:
    r"""FisherAdam's update: ``param -= lr * clip(m_hat * precond)`` with ``m_hat`` the bias-corrected EMA of gradients
    (kept in ``exp_avgs``) and ``precond = 1/(sqrt(F/B) + eps)`` (:func:`precondition`, ``power=0.5``)."""
    preconditioned_update(
        params, grads, exp_avgs, preconds, steps, lr=lr, beta1=beta1, bias_correction=True,
        weight_decay=weight_decay, clip=clip, foreach=foreach,
    )  # fmt: skip


def natural_gradient(params, grads, exp_avgs, preconds, steps, *, lr, momentum, weight_decay, clip,
                     foreach=None) -> None:  # fmt: skip
    r"""NaturalGradient's update: heavy-ball momentum ``m = mu m + g`` kept as the EMA ``exp_avg = (1-mu) m``,
    ``param -= lr * clip(m * precond)`` with ``precond = 1/(F + damping)`` (:func:`precondition`, ``power=1``)."""
    preconditioned_update(
        params, grads, exp_avgs, preconds, steps, lr=lr, beta1=momentum, bias_correction=False,
        step_scale=1.0 / (1.0 - momentum), weight_decay=weight_decay, clip=clip, foreach=foreach,
    )  # fmt: skip


# -- refresh ---------------------------------------------------------------------------------------------
def refresh_fisher(
    fisher_emas: list[Tensor],
    fisher_counts: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: float,
    foreach: bool | None = None,
) -> None:
    r"""In place: fold a fresh estimate into the running Fisher, ``fisher_ema = beta2 fisher_ema + (1 - beta2)
    estimate`` and ``fisher_count += 1`` (per-input units; ``estimates`` are cast to the running estimate's dtype,
    float32 for bf16/fp16 parameters).  :func:`precondition` then derives what the update reads."""
    if not fisher_emas:
        return
    estimates = [e.to(f.dtype) for e, f in zip(estimates, fisher_emas)]
    if foreach is None:
        foreach = default_foreach(fisher_emas)
    if not foreach:
        for f, k, e in zip(fisher_emas, fisher_counts, estimates):
            k.add_(1)
            f.mul_(beta2).add_(e, alpha=1.0 - beta2)
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([fisher_emas, fisher_counts, estimates])
    for (f_, k_, e_), _ in grouped.values():
        torch._foreach_add_(k_, 1)
        torch._foreach_mul_(f_, beta2)
        torch._foreach_add_(f_, e_, alpha=1.0 - beta2)


def precondition(
    fisher_emas: list[Tensor],
    fisher_counts: list[Tensor],
    outs: list[Tensor],
    *,
    beta2: float,
    floor: float = 0.0,
    reciprocal: bool = True,
    fisher_scale: float = 1.0,
    damping: float = 0.0,
    power: float = 0.5,
    eps: float = 0.0,
    foreach: bool | None = None,
) -> None:
    r"""In place into ``outs``: the running Fisher :math:`F = \max(\bar F / (1-\beta_2^{k}), 0)` (then
    ``max(F, floor * mean(F))`` over each tensor when ``floor > 0``) and, with ``reciprocal``, what the update
    multiplies by, :math:`1/((s_F F + \lambda)^p + \epsilon)`.

    Called after a refresh and whenever the loss's size changes ``fisher_scale`` (the last, smaller batch of an
    epoch), never in an ordinary step.  The clamp at zero matters for Î₂ (``mc2``), whose estimates can be negative.
    """
    if not fisher_emas:
        return
    if foreach is None:
        foreach = default_foreach(fisher_emas)
    if not foreach:
        for f, k, d in zip(fisher_emas, fisher_counts, outs):
            bc = torch.pow(beta2, k).neg_().add_(1)
            torch.div(f, bc, out=d).clamp_min_(0)
    else:
        grouped = Optimizer._group_tensors_by_device_and_dtype([fisher_emas, fisher_counts, outs])
        for (f_, k_, d_), _ in grouped.values():
            bc = torch._foreach_pow(beta2, k_)
            torch._foreach_neg_(bc)
            torch._foreach_add_(bc, 1)
            x = torch._foreach_div(f_, bc)
            torch._foreach_clamp_min_(x, 0)
            torch._foreach_copy_(d_, x)
    if floor > 0:
        for d in outs:
            if d.numel():
                torch.maximum(d, d.mean().mul(floor), out=d)
    if not reciprocal:
        return
    outs = [d for d in outs if d.numel()]
    if not outs:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([outs]) if foreach else {0: ((outs,), None)}
    for (d_,), _ in grouped.values():
        if foreach:
            torch._foreach_mul_(d_, fisher_scale)
            if damping != 0:
                torch._foreach_add_(d_, damping)
            if power == 0.5:
                torch._foreach_sqrt_(d_)
            elif power != 1:
                torch._foreach_pow_(d_, power)
            if eps != 0:
                torch._foreach_add_(d_, eps)
            torch._foreach_reciprocal_(d_)
        else:
            for d in d_:
                d.mul_(fisher_scale)
                if damping != 0:
                    d.add_(damping)
                d = d.sqrt_() if power == 0.5 else d if power == 1 else d.pow_(power)
                if eps != 0:
                    d.add_(eps)
                d.reciprocal_()
