r"""The general route: exact per-input, per-seed gradients for any module autograd handles.

``vmap`` over inputs (each as a batch of one) of a ``vjp`` over the ``K`` seeds; where a module has no ``vmap`` rule
(recurrent layers' fused kernels, some custom ops), a loop over inputs of ordinary autograd.  Used by
:class:`~fisher_optim.engine.Probe` for every parameter no fast rule fully saw.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from .batch import Batch

__all__ = ["general_seeded_grads", "Forward"]


class Forward(Protocol):
    """What the general route needs of a :class:`~fisher_optim.engine.Probe`: the model, the batch, and its
    natural parameters for a batch with optional substituted parameters (so this module does not import the
    engine, which imports it)."""

    model: nn.Module
    batch: Batch

    def outputs_of(self, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor: ...


def general_seeded_grads(
    probe: Forward, seeds: Tensor, names: list[str], chunk: int | None = None
) -> dict[str, Tensor]:
    """General route: per-input, per-seed gradients ``(K, B, *shape)`` of ``seed[k,b]^T h(x_b)`` for ``names``.

    Runs ``vmap`` over inputs (each as a batch of one) of a ``vjp`` over the ``K`` seeds, in chunks of inputs.
    Where a module has no ``vmap`` rule (recurrent layers' fused kernels, some custom ops) it falls back to a loop
    over inputs of ordinary autograd (one forward per input, the ``K`` seeds batched): slower, the same numbers.
    Works for any module autograd handles; gradients are enabled here whatever the caller's mode.
    """
    named = dict(probe.model.named_parameters())
    params = {n: named[n].detach() for n in names}
    numel = sum(p.numel() for p in params.values())
    k = seeds.shape[0]
    if chunk is None:
        chunk = max(1, 2**24 // max(1, k * numel))
    flat_dtype = next(iter(params.values())).dtype  # not the inputs' dtype: integer inputs (Embedding) exist
    seeds = seeds.to(flat_dtype)
    batch = probe.batch
    with torch.enable_grad():
        try:
            return _vmap_route(probe, params, batch, seeds, names, chunk)
        except (RuntimeError, NotImplementedError):
            return _loop_route(probe, {n: named[n] for n in names}, batch, seeds, names)


def _vmap_route(probe: Forward, params, batch: Batch, seeds: Tensor, names, chunk: int) -> dict[str, Tensor]:
    def per_input(pd, leaves, s):
        one = batch.with_batched([t.unsqueeze(0) for t in leaves])

        def f(p):
            return probe.outputs_of(one, p)[0]

        _, pull = vjp(f, pd)
        return vmap(pull)(s)[0]

    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    b = batch.size
    for start in range(0, b, chunk):
        sl = slice(start, min(b, start + chunk))
        g = vmap(per_input, in_dims=(None, 0, 1))(params, batch[sl].batched, seeds[:, sl])
        for n in names:
            parts[n].append(g[n].transpose(0, 1))
    return {n: torch.cat(parts[n], 1) for n in names}


def _loop_route(probe: Forward, params, batch: Batch, seeds: Tensor, names) -> dict[str, Tensor]:
    plist = [params[n] for n in names]
    k = seeds.shape[0]
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for b in range(batch.size):
        hb = probe.outputs_of(batch[b : b + 1])
        s = seeds[:, b : b + 1].to(hb.dtype)
        if k == 1:
            grads = torch.autograd.grad(hb, plist, s[0], allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            try:
                grads = torch.autograd.grad(hb, plist, s, allow_unused=True, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: loop over seeds too
                per = [torch.autograd.grad(hb, plist, sk, retain_graph=True, allow_unused=True) for sk in s]
                grads = [
                    None if per[0][i] is None else torch.stack([pk[i] for pk in per]) for i in range(len(plist))
                ]
        for n, p, g in zip(names, plist, grads):
            out[n].append(torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if g is None else g.detach())
    return {n: torch.stack(out[n], 1) for n in names}
