"""The Fisher optimizers' per-parameter state: its layout, its dtypes, and its restoration from a checkpoint.

Per parameter: ``step`` and ``fisher_count`` (scalar counters: float64 for float64 parameters, for exact bias
corrections, else float32 as torch's), ``exp_avg`` (the first moment), ``fisher_ema`` (the running Fisher before
bias correction, per-input units) and what the update reads, ``precond`` (the stored reciprocal denominator) or, with
the signal term, ``fisher`` (:func:`~fisher_optim.optim._functional.precondition`).  Tensors are float32 for
bf16/fp16 parameters, else in the parameter's dtype.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import Tensor

__all__ = ["COUNTERS", "state_dtype", "counter_dtype", "new_state", "restore", "fisher_mean"]

COUNTERS = ("step", "fisher_count")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(p: Tensor) -> torch.dtype:
    """float32 state for bf16/fp16 parameters, else the parameter's dtype."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def counter_dtype(p: Tensor) -> torch.dtype:
    """Step counters: float64 for float64 parameters (exact bias corrections), else float32 (torch's)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def new_state(p: Tensor, precond_key: str) -> dict:
    """Zero state for ``p`` (see the module docstring); ``precond_key`` names what the update reads."""
    dt, ct = state_dtype(p), counter_dtype(p)
    zeros = lambda: torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)  # noqa: E731
    return {"step": torch.zeros((), dtype=ct, device=p.device), "exp_avg": zeros(), "fisher_ema": zeros(),
            "fisher_count": torch.zeros((), dtype=ct, device=p.device), precond_key: zeros()}  # fmt: skip


def restore(saved: dict, saved_groups: list[dict], param_groups: list[dict], drop: str) -> dict[Tensor, dict]:
    """The saved per-parameter state (``state_dict()["state"]``, keyed by index) mapped onto the parameters of
    ``param_groups``, on each parameter's device, counters in :func:`counter_dtype` and the rest in
    :func:`state_dtype` (torch's own loader would cast bf16/fp16 parameters' float32 state down).  The entry
    ``drop`` (what another update rule reads) is left out: the optimizer derives its own at the next step."""
    out = {}
    ids = chain.from_iterable(g["params"] for g in saved_groups)
    params = chain.from_iterable(g["params"] for g in param_groups)
    for i, p in zip(ids, params):
        if i in saved:
            out[p] = {
                k: v.to(device=p.device, dtype=counter_dtype(p) if k in COUNTERS else state_dtype(p), copy=True)
                if isinstance(v, Tensor)
                else v
                for k, v in saved[i].items()
                if k != drop
            }
    return out


def fisher_mean(state: dict, beta2: float) -> float:
    """The mean entry of the bias-corrected running Fisher (``nan`` before the first refresh)."""
    if "fisher_count" not in state or not state["fisher_ema"].numel():
        return float("nan")
    return float(state["fisher_ema"].mean()) / (1 - beta2 ** float(state["fisher_count"]))
