r"""Model inputs and outputs as users write them.

A model is called as ``model(x)``, ``model(*args)`` or ``model(**kwargs)`` and may return a tensor, a tuple, a
dict or an output object (Hugging Face style).  :class:`Batch` holds the call's arguments; :func:`select_output`
picks the natural parameters out of what the model returns.

**The batch rule.**  The batch size ``M`` is the leading dimension of the first tensor among the arguments
(positional first, then keyword arguments in order).  Every tensor argument whose leading dimension equals ``M``
is *batched*: it is sliced together with the others (``batch[i:j]``, one input ``batch[m:m+1]``).  Every other
argument (a scalar, a flag, an ``(T, T)`` attention mask with ``T != M``, ``None``) is passed whole to every
call.  Nested tuples, lists and dicts are searched (``torch.utils._pytree``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._checks import check_output_spec

__all__ = ["Batch", "NonFiniteError", "select_output", "OutputSpec", "check_output_spec"]

#: what ``output=`` accepts: ``None`` (the default rule), a key, an index or a callable
OutputSpec = str | int | Callable[[Any], Tensor] | None


class NonFiniteError(ValueError):
    """Non-finite (NaN or infinite) model inputs or outputs: the Fisher would be meaningless."""


class Batch:
    """The arguments of one model call, with the batched tensors identified (see the module docstring).

    ``Batch.of(inputs)`` accepts a Tensor (``model(x)``), a tuple or list (``model(*inputs)``), a dict
    (``model(**inputs)``) or a :class:`Batch`.
    """

    __slots__ = ("args", "kwargs", "size", "_leaves", "_spec", "_batched")

    def __init__(self, args: tuple = (), kwargs: Mapping | None = None):
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self._leaves, self._spec = pytree.tree_flatten((self.args, self.kwargs))
        tensors = [t for t in self._leaves if isinstance(t, Tensor)]
        if not tensors or tensors[0].dim() == 0:
            raise TypeError(
                "inputs must contain a tensor whose leading dimension is the batch: a Tensor (model(x)), a tuple "
                "(model(*inputs)) or a dict (model(**inputs))"
            )
        self.size = tensors[0].shape[0]
        if self.size == 0:
            raise ValueError(f"inputs must have a non-empty batch dimension, got shape {tuple(tensors[0].shape)}")
        self._batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.size for t in self._leaves]

    @classmethod
    def of(cls, inputs) -> Batch:
        if isinstance(inputs, Batch):
            return inputs
        if isinstance(inputs, Tensor):
            if inputs.dim() == 0 or inputs.shape[0] == 0:
                raise ValueError(f"inputs must have a non-empty batch dimension, got shape {tuple(inputs.shape)}")
            return cls((inputs,))
        if isinstance(inputs, (tuple, list)):
            return cls(tuple(inputs))
        if isinstance(inputs, Mapping):
            return cls((), inputs)
        raise TypeError(
            "inputs must be a Tensor, a tuple (model(*inputs)) or a dict (model(**inputs)), "
            f"got {type(inputs).__name__}"
        )

    # -- views -----------------------------------------------------------------------------------------
    def _rebuild(self, leaves) -> Batch:
        args, kwargs = pytree.tree_unflatten(list(leaves), self._spec)
        return Batch(args, kwargs)

    def map_batched(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """A batch with ``fn`` applied to every batched tensor (others unchanged)."""
        return self._rebuild(fn(t) if b else t for t, b in zip(self._leaves, self._batched))

    def __getitem__(self, index: slice) -> Batch:
        if not isinstance(index, slice):
            raise TypeError("a Batch is sliced with a slice (batch[i:j])")
        return self.map_batched(lambda t: t[index])

    def detach(self) -> Batch:
        return self._rebuild(t.detach() if isinstance(t, Tensor) else t for t in self._leaves)

    @property
    def batched(self) -> list[Tensor]:
        """The batched tensors, in argument order."""
        return [t for t, b in zip(self._leaves, self._batched) if b]

    def with_batched(self, tensors) -> Batch:
        """This batch with its batched tensors replaced by ``tensors`` (same order, any leading size)."""
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if b else t for t, b in zip(self._leaves, self._batched)],
                                             self._spec)  # fmt: skip
        out = Batch.__new__(Batch)
        out.args, out.kwargs = args, kwargs
        out._leaves, out._spec = pytree.tree_flatten((args, kwargs))
        out._batched = list(self._batched)
        first = next((t for t, b in zip(out._leaves, out._batched) if b), None)
        out.size = first.shape[0] if first is not None and first.dim() > 0 else self.size
        return out

    @property
    def first(self) -> Tensor:
        """The first batched tensor (the one that fixed the batch size)."""
        return self.batched[0]

    def call(self, model: Callable) -> Any:
        return model(*self.args, **self.kwargs)

    def describe(self) -> str:
        parts = [f"arg {i}: {_shape(a)}" for i, a in enumerate(self.args)]
        parts += [f"{k}: {_shape(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the first floating-point argument with a NaN or infinity (one host
        read for the whole batch; the per-argument counts only on failure)."""
        named = [(f"positional input {i}", a) for i, a in enumerate(self.args)]
        named += [(f"keyword input {k!r}", v) for k, v in self.kwargs.items()]
        floats = [
            (label, t)
            for label, value in named
            for t in pytree.tree_leaves(value)
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel()
        ]
        if not floats or bool(torch.stack([torch.isfinite(t).all() for _, t in floats]).all()):
            return
        for label, t in floats:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise NonFiniteError(f"{label} has {bad} non-finite value(s) (NaN or inf) of {t.numel()}")

    # -- gathering micro-batches ----------------------------------------------------------------------------
    def compatible(self, other: Batch) -> bool:
        """Same argument structure, same non-batched values (by identity or equality) and same batched shapes
        past the leading dimension: ``cat`` can join them."""
        if self._spec != other._spec or self._batched != other._batched:
            return False
        for a, b, batched in zip(self._leaves, other._leaves, self._batched):
            if batched:
                if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.device != b.device:
                    return False
            elif isinstance(a, Tensor) or isinstance(b, Tensor):
                if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
                    return False
                if a is not b and not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        """The micro-batches joined along the batch dimension (they must be :meth:`compatible`)."""
        if len(batches) == 1:
            return batches[0]
        columns = zip(*(b.batched for b in batches))
        return batches[0].with_batched([torch.cat(col) for col in columns])


def _shape(v) -> str:
    if isinstance(v, Tensor):
        return f"Tensor{tuple(v.shape)}"
    return type(v).__name__


def select_output(out: Any, output: OutputSpec = None) -> Tensor:
    """The natural parameters in a model's output.

    ``output=None`` (default): the output itself if it is a Tensor; the first element of a tuple or list; the
    ``"logits"`` entry of a dict (or mapping-like output object) or the ``logits`` attribute of an output object.
    A ``str`` is a key (or attribute), an ``int`` an index, a callable is applied to the output.  Anything else,
    or a result that is not a Tensor, is a ``TypeError`` naming the output's type.
    """
    if callable(output) and not isinstance(output, (str, int)):
        picked = output(out)
        how = f"output={getattr(output, '__name__', output)!r}"
    elif isinstance(output, bool):
        raise TypeError(f"Invalid output: {output!r} (a key, an index, a callable or None)")
    elif isinstance(output, int):
        try:
            picked = out[output]
        except (TypeError, IndexError, KeyError) as err:
            raise TypeError(f"output={output}: cannot index the model output of type {type(out).__name__}") from err
        how = f"output={output}"
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            picked = out[output]
        elif hasattr(out, output):
            picked = getattr(out, output)
        else:
            raise TypeError(f"output={output!r}: the model output of type {type(out).__name__} has no such key")
        how = f"output={output!r}"
    elif output is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, (tuple, list)) and out:
            picked = out[0]
        elif isinstance(out, Mapping) and "logits" in out:
            picked = out["logits"]
        elif hasattr(out, "logits"):
            picked = out.logits
        else:
            raise TypeError(
                f"model output of type {type(out).__name__} holds no natural parameters that fisher_optim can find "
                "(a Tensor, the first element of a tuple/list, or a 'logits' entry/attribute); pass output= a key, "
                "an index or a callable"
            )
        how = "the default output rule"
    else:
        raise TypeError(f"Invalid output: {output!r} (a key, an index, a callable or None)")
    if not isinstance(picked, Tensor):
        raise TypeError(f"{how} picked a {type(picked).__name__} from the model output, not a Tensor")
    return picked
