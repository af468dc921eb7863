r"""How the estimation forward runs, and what autograd says about it.

* :class:`ModeGuard`: eval mode for one estimation (dropout off); BatchNorm layers that would normalise with their
  batch's statistics are frozen at the estimation batch's statistics; flags and buffers restored on exit.
* :func:`eager`: ``torch.compile``d models and submodules run eagerly (hooks fire, parameter uses are ordinary ops).
* :func:`estimating`: whether a probe is running in this thread (the optimizers' input capture ignores its forwards).
* :func:`graph_uses` and :func:`broadcast_partner`: which leaves the output depends on, through how many ops, and
  the one graph pattern (a shared position embedding added to a per-input one) that a fast rule may still cover.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ModeGuard", "eager", "estimating", "enter_estimation", "exit_estimation", "graph_uses",
           "broadcast_partner"]  # fmt: skip

_ESTIMATING = threading.local()


def estimating() -> bool:
    """Whether a :class:`Probe` is running in this thread (its forwards are the library's, not the user's: the
    optimizers' input capture ignores them)."""
    return getattr(_ESTIMATING, "depth", 0) > 0


def eager():
    """Run ``torch.compile``d models and submodules eagerly: module hooks fire and every parameter use is on the
    autograd graph as an ordinary op (the estimate of a compiled model is that of its eager original)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def _uses_batch_statistics(m: nn.Module) -> bool:
    """A BatchNorm layer that normalises with the statistics of its batch: train mode, or no running statistics."""
    return isinstance(m, _BatchNorm) and (m.training or m.running_mean is None or m.running_var is None)


class ModeGuard:
    """Eval mode for every submodule (dropout off) for one estimation, restoring each module's own flag after.

    BatchNorm layers that would normalise with their batch's statistics (train mode, or no running statistics) are
    *frozen at the estimation batch's statistics*: at their first call the batch mean and (biased) variance of their
    input are taken, detached, and put in place of the running statistics until exit.  Each input's Fisher is then
    that of the function being trained, with the statistics held constant (no coupling between inputs, no buffer
    update).  BatchNorm in eval mode keeps its running statistics.  Buffers are restored on exit.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.frozen = [m for m in self.model.modules() if _uses_batch_statistics(m)]
        self.saved = [(m, m.running_mean, m.running_var) for m in self.frozen]
        self.handles = [m.register_forward_pre_hook(self._freeze) for m in self.frozen]
        self.model.eval()
        return self

    @staticmethod
    def _freeze(module, args):
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        module.running_mean = x.mean(dims)
        module.running_var = x.var(dims, unbiased=False)

    def release_hooks(self):
        """Remove the freezing hooks (after the first forward: later calls reuse the frozen statistics)."""
        for hd in self.handles:
            hd.remove()
        self.handles = []

    def __exit__(self, *exc):
        self.release_hooks()
        for m, mean, var in self.saved:
            m.running_mean = mean
            m.running_var = var
        for m, flag in self.flags:
            m.training = flag
        return False


def graph_uses(root: Tensor) -> tuple[dict[int, int], set]:
    """Walk the autograd graph below ``root``: ``({id(leaf): number of graph edges into it}, nodes seen)``.

    A leaf that requires grad appears through its ``AccumulateGrad`` node; the edge count says how many ops of the
    forward consumed it (one for a parameter used by one ``nn.Linear`` call, two for a tied weight, ...).
    """
    counts: dict[int, int] = {}
    seen: set = set()
    if root.grad_fn is None:
        return counts, seen
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                counts[id(var)] = counts.get(id(var), 0) + 1
            stack.append(nxt)
    return counts, seen


def broadcast_partner(module, out: Tensor, outs: dict, calls: dict, nodes: set, b: int) -> str | None:
    """For an ``nn.Embedding`` call shared by the batch (``pos(torch.arange(T))``, output ``(T, d)``): the name of the
    recorded module whose per-input output ``(B, T, d)`` it is added to, ``z = other + out`` (``AddBackward0``,
    alpha 1), when that sum is the only use of both.  Then ``dz/d other`` is the identity, so the gradient at
    ``other`` row ``b`` is input ``b``'s gradient at the shared output (autograd sums it over the batch).  ``None``
    for any other graph: the general route.  Read off the autograd graph only; no shapes guessed."""
    if not isinstance(module, nn.Embedding) or out.grad_fn is None:
        return None
    node, nr = out.grad_fn, out.output_nr
    users = [n for n in nodes if any(e[0] is node and e[1] == nr for e in n.next_functions)]
    if len(users) != 1 or users[0].name() != "AddBackward0" or getattr(users[0], "_saved_alpha", 1) != 1:
        return None
    add = users[0]
    other = [e for e in add.next_functions if not (e[0] is node and e[1] == nr)]
    if len(other) != 1 or other[0][0] is None:
        return None
    onode, onr = other[0]
    if sum(1 for n in nodes for e in n.next_functions if e[0] is onode and e[1] == onr) != 1:
        return None  # the partner's output has another use: its gradient is not the sum's
    for name, t in outs.items():
        if (
            calls.get(name) == 1
            and isinstance(t, Tensor)
            and t.grad_fn is onode
            and t.output_nr == onr
            and tuple(t.shape) == (b, *out.shape)
        ):
            return name
    return None




def enter_estimation() -> None:
    """Mark this thread as running a probe (nests)."""
    _ESTIMATING.depth = getattr(_ESTIMATING, "depth", 0) + 1


def exit_estimation() -> None:
    _ESTIMATING.depth -= 1
