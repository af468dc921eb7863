"""The Fisher optimizers' non-finite check: one fused reduction per device and dtype, one host sync per device."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["all_finite", "all_zero", "describe_nonfinite"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def all_finite(tensors: list[Tensor]) -> bool:
    """One fused L2-norm reduction (``torch._foreach_norm``) per (device, dtype), one host sync per device.

    A NaN or infinity makes its tensor's norm non-finite.  So does a finite tensor whose norm overflows
    (above ~1.8e19 in float32; bf16/fp16 norms are accumulated and returned in float32): such a step counts
    as non-finite too.  The L2 norm is used because it is a vectorised reduction (the max-abs norm is ~15x
    slower on the CPU)."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    flags: dict[torch.device, list[Tensor]] = {}
    for (device, dtype), ts in groups.items():
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        flags.setdefault(device, []).append(torch.stack(norms).isfinite().all().reshape(1))
    return all(bool(torch.cat(f).all()) for f in flags.values())


def all_zero(tensors: list[Tensor]) -> list[bool]:
    """Per tensor, whether it is exactly zero everywhere (one fused norm, one host read; empty tensors: False)."""
    if not tensors:
        return []
    norms = torch._foreach_norm(tensors)
    return [z and t.numel() > 0 for z, t in zip((torch.stack([n.float() for n in norms]) == 0).tolist(), tensors)]


def describe_nonfinite(work, estimates, loss, names: dict[int, str]) -> str:
    """Which values were non-finite: the loss, a gradient or a Fisher estimate, by parameter name (only called on
    failure; may synchronise freely).  ``work``: ``[(group, params, grads)]``; ``names``: ``id(param) -> name``."""
    if (isinstance(loss, Tensor) and not bool(loss.detach().isfinite().all())) or (
        isinstance(loss, float) and not math.isfinite(loss)
    ):
        return "loss"
    for _, ps, grads in work:
        for p, g in zip(ps, grads):
            if not bool(g.isfinite().all()):
                return f"gradient of {names[id(p)]!r}"
    for p, e in (estimates or {}).items():
        if not bool(e.isfinite().all()):
            return f"Fisher estimate of {names[id(p)]!r}"
    return "value"
