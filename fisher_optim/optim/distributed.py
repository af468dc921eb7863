"""DDP helpers of the Fisher optimizers: unwrap the model, average the estimates over ranks, share rank 0's
selection.  Without a process group (or with one rank) none of them communicates."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["unwrap", "is_distributed", "rank", "world_size", "all_reduce_mean", "broadcast_from_first"]


def unwrap(model: nn.Module) -> tuple[nn.Module, object | None]:
    """``(module that runs the estimation, DDP process group or None)``."""
    if isinstance(model, DistributedDataParallel):
        return model.module, getattr(model, "process_group", None) or dist.group.WORLD
    if isinstance(model, DataParallel):
        return model.module, None
    return model, None


def is_distributed(group) -> bool:
    """Whether ``group`` spans more than one rank."""
    return group is not None and dist.get_world_size(group) > 1


def rank(group) -> int:
    """This process's rank in ``group`` (0 without one)."""
    return dist.get_rank(group) if group is not None else 0


def world_size(group) -> int:
    """Ranks in ``group`` (1 without one)."""
    return dist.get_world_size(group) if group is not None else 1


def all_reduce_mean(est: dict[str, Tensor], names: list[str], group) -> dict[str, Tensor]:
    """Average the estimates over the ranks of ``group`` (one flat ``all_reduce`` in the promoted dtype)."""
    dtype = est[names[0]].dtype
    for n in names[1:]:
        dtype = torch.promote_types(dtype, est[n].dtype)
    flat = torch.cat([est[n].reshape(-1).to(dtype) for n in names])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    out, i = {}, 0
    for n in names:
        k = est[n].numel()
        out[n] = flat[i : i + k].view_as(est[n]).to(est[n].dtype)
        i += k
    return out


def broadcast_from_first(obj, group):
    """Rank 0's ``obj`` (a picklable object) on every rank of ``group``."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
