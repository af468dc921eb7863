r"""Which forward the Fisher optimizers estimate on: input capture, micro-batches, buffer snapshots.

:class:`InputCapture` is a pair of forward hooks on the model (it holds no reference to the optimizer):

* the **post-hook** keeps a detached copy of the call's positional *and keyword* arguments (a
  :class:`~fisher_optim.batch.Batch`; tensors are detached references, not copies) for every forward run with
  gradients enabled (not those of the library's own estimation, e.g. an ``EWC.consolidate`` or ``diagonal_fisher``
  call between ``backward()`` and ``step()``), and attaches a gradient hook to the output's natural parameters
  (``output=``) that marks the call as *backpropagated* when ``loss.backward()`` reaches it;
* the **pre-hook** snapshots the normalisation buffers (BatchNorm running statistics and counters) at the first
  forward since the last step, so that a step skipped for non-finite values can put back what that forward wrote.

**Which forward is estimated.**  At ``step()`` the optimizer takes the calls since the previous step whose output was
backpropagated, in order: with gradient accumulation the micro-batches are joined along the batch dimension (those
whose non-batched arguments match the first), up to ``limit`` examples (``fisher_batch``).  A forward run with
gradients between ``backward()`` and ``step()`` whose output is never backpropagated (a metric, a probe) is not
taken.  Only when no captured call was backpropagated (a ``closure`` computed under ``no_grad`` somewhere else, a
loss built from a detached output) is the latest captured forward used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..batch import Batch, OutputSpec, select_output
from ..forward import estimating

__all__ = ["InputCapture"]


class _Call:
    __slots__ = ("batch", "used")

    def __init__(self, batch: Batch):
        self.batch = batch
        self.used = False

    def mark(self, grad):
        self.used = True


class InputCapture:
    """Forward hooks that remember the model's inputs since the last step (see the module docstring)."""

    def __init__(self, model: nn.Module, output: OutputSpec = None):
        self.output = output
        self.enabled = True
        self.calls: list[_Call] = []
        self.snapshot: list[tuple[nn.Module, str, Tensor]] | None = None
        #: entries per input of the latest captured output's natural parameters (positions x classes), or None
        self.output_size: int | None = None
        #: shape of the latest captured output's natural parameters, or None
        self.output_shape: tuple[int, ...] | None = None
        #: called with no argument by a forward run without gradients (evaluation); ScheduleFreeFisherAdam's check
        self.on_eval_forward = None
        self._norms = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
        self._handles = [
            model.register_forward_pre_hook(self._before),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    # -- hooks ------------------------------------------------------------------------------------------
    def _before(self, module, args):
        if self.on_eval_forward is not None and not _grad_enabled() and not estimating():
            self.on_eval_forward()
        if self.enabled and self.snapshot is None and _grad_enabled() and not estimating():
            self.snapshot = [
                (m, name, buf.detach().clone())
                for m in self._norms
                for name, buf in m.named_buffers(recurse=False)
                if buf is not None
            ]

    def _after(self, module, args, kwargs, out):
        if not (self.enabled and _grad_enabled()) or estimating():
            return  # evaluation forwards, and the library's own estimation forwards, are not the user's batch
        try:
            batch = Batch(args, kwargs).detach()
        except (TypeError, ValueError):
            return  # no batched tensor argument: nothing to estimate on
        call = _Call(batch)
        try:
            h = select_output(out, self.output)
        except TypeError:
            h = None
        if isinstance(h, Tensor) and h.requires_grad:
            h.register_hook(call.mark)
        if isinstance(h, Tensor) and h.dim() > 0:
            self.output_size = h[0].numel()
            self.output_shape = tuple(h.shape)
        # keep the backpropagated calls and the latest one (the fallback); drop older unused ones
        self.calls = [c for c in self.calls if c.used] + [call]

    # -- what step() uses -------------------------------------------------------------------------------------
    def take(self, limit: int | None = None) -> Batch | None:
        """The batch to estimate on (see the module docstring), or None when nothing was captured."""
        used = [c.batch for c in self.calls if c.used]
        if not used:
            return self.calls[-1].batch if self.calls else None
        first = used[0]
        parts, total = [], 0
        for b in used:
            if limit is not None and total >= limit:
                break
            if b is first or first.compatible(b):
                parts.append(b)
                total += b.size
        batch = Batch.cat(parts)
        return batch if limit is None or batch.size <= limit else batch[:limit]

    def batch_size(self) -> int | None:
        """Inputs of the batch the training loss averaged over: the backpropagated calls since the last step that
        :meth:`take` would join (all of them, not only the first ``limit``), or the latest call's when none was
        backpropagated; ``None`` when nothing was captured.  No tensor is read or copied."""
        used = [c.batch for c in self.calls if c.used]
        if not used:
            return self.calls[-1].batch.size if self.calls else None
        return sum(b.size for b in used if b is used[0] or used[0].compatible(b))

    def reset(self) -> None:
        """Forget the calls and the buffer snapshot (after every step)."""
        self.calls = []
        self.snapshot = None

    def restore_buffers(self) -> None:
        """Put back the normalisation buffers as they were before the first forward since the last step."""
        for m, name, saved in self.snapshot or ():
            buf = getattr(m, name)
            if isinstance(buf, Tensor):
                buf.copy_(saved)

    def remove(self) -> None:
        for hd in self._handles:
            hd.remove()
        self._handles = []
        self.reset()


def _grad_enabled() -> bool:
    return torch.is_grad_enabled()
