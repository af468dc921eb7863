"""The Fisher optimizers' non-finite check: one fused reduction per device and dtype, one host sync per device."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]

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
