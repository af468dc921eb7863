r"""Per-layer rules: per-sample parameter quantities in factored form, and their reductions.

Every estimator in fisher_optim is a reduction over inputs ``b`` of a function ``fn`` applied, per input,
to a stack of ``K`` per-sample parameter tensors ``x[k, b]`` (one per *seed*):

.. math::  R(\theta_i) = \sum_b \mathrm{fn}\big(x[\cdot, b, i]\big).

The per-sample tensors are gradients of ``seed_k^T h(x_b)`` (``power = 1``) or diagonal Hessians of it
(``power = 2``).  A record stores them in the cheapest exact form for its layer:

* :class:`LinearRecord` (``nn.Linear`` with inputs ``(B, in)``): ``x[k,b,j,i] = q[k,b,j] a[b,i]^power``.
  ``fn`` is homogeneous of degree ``d`` in ``x``, so the reduction is one matmul:
  ``sum_b fn(q)[b,j] * a[b,i]^(power*d)`` (docs/fisher-math.md §7.1, §7.3).  No per-sample tensor is materialised.
* :class:`UnfoldRecord` (``nn.Linear`` with extra leading dims, ``nn.Conv2d``): the per-sample gradient
  ``x[k,b,o,r] = sum_s g[k,b,o,s] X[b,r,s]`` keeps the cross-position terms exactly (it does not factorise);
  it is materialised in chunks of inputs.
* :class:`DenseRecord`: per-sample tensors computed elsewhere (``torch.func`` route, Hessian routes) or small
  enough to hold (BatchNorm with running statistics: one value per channel, :func:`batchnorm_is_fast`).

``fn(x, idx)`` receives ``x`` of shape ``(K, b, *rest)`` for the inputs ``idx`` (a slice of the batch) and
returns ``(b, *rest)``.  ``reduce_many(fn, degrees)`` is the multi-reducer: ``fn`` returns a tuple of such
tensors (degrees ``degrees``), and every record builds its per-sample tensors once for all of them; a
:class:`LinearRecord` stacks the statistics that multiply the same power of ``a`` into one matmul
(:func:`linear_reduce`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Reducer = Callable[[Tensor, slice], Tensor]

#: upper bound on the number of floats materialised at once by an UnfoldRecord reduction
CHUNK_ELEMENTS = 2**25
#: Conv2d records with at most this many seeds use per-input ``convolution_backward`` instead of ``unfold``
CONV_BACKWARD_MAX_SEEDS = 2


def linear_reduce(a: Tensor, terms: list[tuple[Tensor, int]], has_bias: bool) -> list[dict[str, Tensor]]:
    """``[{"weight": stat^T a^e, "bias": sum_b stat}]`` for ``terms = [(stat (B, out), e)]``.

    Statistics with the same exponent ``e`` share one matmul (stacked along the output dimension), and the
    powers of ``a`` are built once (``a^4 = (a^2)^2``).
    """
    powers: dict[int, Tensor] = {}

    def power(e: int) -> Tensor:
        if e not in powers:
            powers[e] = a if e == 1 else (power(e // 2) ** 2 if e % 2 == 0 else a**e)
        return powers[e]

    out: list[dict[str, Tensor] | None] = [None] * len(terms)
    by_exp: dict[int, list[int]] = {}
    for i, (_, e) in enumerate(terms):
        by_exp.setdefault(e, []).append(i)
    for e, idx in by_exp.items():
        ap = power(e)
        stacked = torch.cat([terms[i][0] for i in idx], dim=1) if len(idx) > 1 else terms[idx[0]][0]
        w = stacked.T.to(ap.dtype) @ ap
        start = 0
        for i in idx:
            width = terms[i][0].shape[1]
            d = {"weight": w[start : start + width]}
            if has_bias:
                d["bias"] = terms[i][0].sum(0)
            out[i] = d
            start += width
    return out  # type: ignore[return-value]


@dataclass
class LinearRecord:
    """``nn.Linear`` with 2-D input: ``a`` is ``(B, in)``, ``q`` is ``(K, B, out)``."""

    a: Tensor
    q: Tensor
    has_bias: bool
    power: int = 1

    def reduce(self, fn: Reducer, degree: int) -> dict[str, Tensor]:
        fq = fn(self.q, slice(None))  # (B, out)
        ap = self.a ** (self.power * degree)
        out = {"weight": fq.T.to(ap.dtype) @ ap}
        if self.has_bias:
            out["bias"] = fq.sum(0)
        return out

    def reduce_many(self, fn, degrees: tuple[int, ...]) -> list[dict[str, Tensor]]:
        stats = fn(self.q, slice(None))
        return linear_reduce(self.a, [(st, self.power * d) for st, d in zip(stats, degrees)], self.has_bias)


@dataclass
class UnfoldRecord:
    """Per-sample gradients ``sum_s g[k,b,o,s] X[b,r,s]`` (Linear with extra dims, Conv2d).

    ``X`` is ``(B, R, S)`` (R = in_features or C_in*kh*kw; S = positions), ``g`` is ``(K, B, O, S)``;
    ``weight_shape`` restores the parameter's shape from ``(O, R)``.
    """

    X: Tensor
    g: Tensor
    has_bias: bool
    weight_shape: torch.Size

    def reduce(self, fn: Reducer, degree: int) -> dict[str, Tensor]:
        return self.reduce_many(lambda x, idx: (fn(x, idx),), (degree,))[0]

    def reduce_many(self, fn, degrees: tuple[int, ...]) -> list[dict[str, Tensor]]:
        k, b, o, _ = self.g.shape
        r = self.X.shape[1]
        step = max(1, CHUNK_ELEMENTS // max(1, k * o * r))
        n = len(degrees)
        ws = [torch.zeros(o, r, dtype=self.g.dtype, device=self.g.device) for _ in range(n)]
        bs = [torch.zeros(o, dtype=self.g.dtype, device=self.g.device) for _ in range(n)] if self.has_bias else None
        for start in range(0, b, step):
            idx = slice(start, min(b, start + step))
            per_sample = torch.einsum("kbos,brs->kbor", self.g[:, idx], self.X[idx])
            for acc, st in zip(ws, fn(per_sample, idx)):
                acc += st.sum(0)
            if bs is not None:
                for acc, st in zip(bs, fn(self.g[:, idx].sum(-1), idx)):
                    acc += st.sum(0)
        return [
            {"weight": w.reshape(self.weight_shape), **({"bias": bs[i]} if bs is not None else {})}
            for i, w in enumerate(ws)
        ]


@dataclass
class ConvRecord:
    """``nn.Conv2d`` per-sample weight gradients from ``convolution_backward`` vmapped over inputs and seeds.

    Cheaper than the ``unfold`` rule for few seeds (no ``C_in*kh*kw x S`` patch matrix); exact all the same.
    ``inp`` is ``(B, C_in, H, W)``, ``g`` is ``(K, B, O, H_out, W_out)``.
    """

    inp: Tensor
    g: Tensor
    has_bias: bool
    module: torch.nn.Conv2d

    def reduce(self, fn: Reducer, degree: int) -> dict[str, Tensor]:
        return self.reduce_many(lambda x, idx: (fn(x, idx),), (degree,))[0]

    def reduce_many(self, fn, degrees: tuple[int, ...]) -> list[dict[str, Tensor]]:
        m = self.module
        w = m.weight.detach()

        def one(x: Tensor, gy: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(
                gy.unsqueeze(0), x.unsqueeze(0), w, None, m.stride, m.padding, m.dilation, False, [0, 0],
                m.groups, [False, True, False],
            )[1]

        per_input = torch.vmap(torch.vmap(one, in_dims=(None, 0)), in_dims=(0, 1), out_dims=1)
        k, b = self.g.shape[:2]
        step = max(1, CHUNK_ELEMENTS // max(1, k * w.numel()))
        n = len(degrees)
        accs = [torch.zeros_like(w, dtype=self.g.dtype) for _ in range(n)]
        biases = [torch.zeros(w.shape[0], dtype=self.g.dtype, device=w.device) for _ in range(n)]
        for start in range(0, b, step):
            idx = slice(start, min(b, start + step))
            for acc, st in zip(accs, fn(per_input(self.inp[idx], self.g[:, idx]), idx)):
                acc += st.sum(0)
            if self.has_bias:
                for acc, st in zip(biases, fn(self.g[:, idx].sum((-1, -2)), idx)):
                    acc += st.sum(0)
        return [{"weight": accs[i], **({"bias": biases[i]} if self.has_bias else {})} for i in range(n)]


@dataclass
class DenseRecord:
    """Per-sample tensors ``{param_name: (K, B, *shape)}`` already materialised."""

    values: dict[str, Tensor]

    def reduce(self, fn: Reducer, degree: int) -> dict[str, Tensor]:
        return {name: fn(x, slice(None)).sum(0) for name, x in self.values.items()}

    def reduce_many(self, fn, degrees: tuple[int, ...]) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = [{} for _ in degrees]
        for name, x in self.values.items():
            for i, st in enumerate(fn(x, slice(None))):
                out[i][name] = st.sum(0)
        return out


def unfold_conv2d_input(module: torch.nn.Conv2d, inp: Tensor) -> Tensor:
    """``(B, C_in, H, W)`` -> patches ``(B, C_in*kh*kw, S)`` matching ``module.weight.flatten(1)``."""
    return torch.nn.functional.unfold(
        inp, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
    )


def conv2d_is_fast(module: torch.nn.Conv2d) -> bool:
    """Conv2d layers the unfold rule handles exactly (others take the general route)."""
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def batchnorm_is_fast(module: torch.nn.Module) -> bool:
    """BatchNorm with an affine map and running statistics: in eval mode (the Probe's) a per-channel affine map of
    the input, ``y = w * xhat + b`` with ``xhat = (x - running_mean) / sqrt(running_var + eps)``, so the per-sample
    gradients are ``sum_positions g * xhat`` and ``sum_positions g``."""
    return (
        isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        and module.affine
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def embedding_is_fast(module: torch.nn.Module) -> bool:
    """``nn.Embedding`` without ``max_norm`` (it renormalises the weight in place during the forward) and without
    ``scale_grad_by_freq`` (its backward divides by the token counts of the whole batch: not a per-input
    derivative).  ``padding_idx`` is fine (that row gets no gradient), ``sparse`` too (no ``.grad`` is used)."""
    return (
        isinstance(module, torch.nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def layernorm_is_fast(module: torch.nn.Module) -> bool:
    """``nn.LayerNorm`` with an elementwise affine map (``bias`` may be absent): ``y = w * xhat + b`` with
    ``xhat`` the input normalised over the last ``len(normalized_shape)`` dimensions of one position of one input,
    so the per-sample gradients are ``sum_positions g * xhat`` and ``sum_positions g``."""
    return isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine and module.weight is not None


def is_fast(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Conv2d):
        return conv2d_is_fast(module)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return batchnorm_is_fast(module)
    if isinstance(module, torch.nn.Embedding):
        return embedding_is_fast(module)
    if isinstance(module, torch.nn.LayerNorm):
        return layernorm_is_fast(module)
    return isinstance(module, torch.nn.Linear)


def call_is_batched(module: torch.nn.Module, inp, out, batch) -> bool:
    """Whether a fast module's call is per input: row ``b`` of its input and output belong to input ``b``.

    Every fast rule reads dimension 0 of its module's input and output as the batch, so both must have the batch's
    size: a layer applied to sequence-first activations ``(T, B, d)`` (``nn.Transformer*`` layers with
    ``batch_first=False``) or to a tensor shared by the batch takes the general route.  An Embedding of a shared
    index (learned positions ``pos(torch.arange(T))``, broadcast over the batch) is such a call: its index must be
    ``(B, ...)`` with at least two dimensions, or be one of the batch's own (batched) tensors (the Probe then tries
    the broadcast-add rule, ``engine._broadcast_partner``).  A shared or sequence-first tensor whose leading size
    happens to equal ``B`` cannot be told apart by shapes (a 1-D Embedding index excepted).
    """
    b = batch.size
    if not isinstance(inp, Tensor) or not isinstance(out, Tensor) or inp.dim() == 0 or out.dim() == 0:
        return False
    if inp.shape[0] != b or out.shape[0] != b:
        return False
    if isinstance(module, torch.nn.Embedding) and inp.dim() == 1:
        return any(t is inp for t in batch.batched)
    return True


def first_occurrence(idx: Tensor) -> Tensor:
    """``(B, T)`` -> ``(B, T)``: for every position, the first position of its row holding the same index
    (a stable sort per row; no ``T x T`` comparison)."""
    t = idx.shape[1]
    srt, perm = idx.sort(dim=1, stable=True)
    start = torch.ones_like(srt, dtype=torch.bool)
    start[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ar = torch.arange(t, device=idx.device).expand_as(srt)
    run_start = torch.where(start, ar, torch.zeros_like(ar)).cummax(1).values
    first = perm.gather(1, run_start)
    rep = torch.empty_like(perm)
    rep.scatter_(1, perm, first)
    return rep


@dataclass
class EmbeddingRecord:
    """``nn.Embedding``: per-sample gradient ``G[k,b,v,:] = sum_{t: idx[b,t] = v} g[k,b,t,:]`` (a scatter-add).

    ``idx`` is ``(B, T)`` (positions flattened; ``padding_idx`` positions already dropped from ``g``), ``g`` is
    ``(K, B, T, d)``.  Only the rows of the tokens an input uses are nonzero, so the ``(B, vocab, d)`` per-sample
    tensor is never built: every position's gradient is added into the slot of the first position with the same
    token (:func:`first_occurrence`), the reducer runs on that ``(K, B, T, d)`` tensor (other slots zero), and the
    per-input statistics are added into the token rows.  Exact for every reducer the library uses: they act
    elementwise on parameter coordinates and vanish at zero (homogeneous of degree >= 1).
    """

    idx: Tensor
    g: Tensor
    num_embeddings: int

    def reduce(self, fn: Reducer, degree: int) -> dict[str, Tensor]:
        return self.reduce_many(lambda x, idx: (fn(x, idx),), (degree,))[0]

    def reduce_many(self, fn, degrees: tuple[int, ...]) -> list[dict[str, Tensor]]:
        k, b, t, d = self.g.shape
        rep = first_occurrence(self.idx)
        step = max(1, CHUNK_ELEMENTS // max(1, k * t * d))
        accs = [torch.zeros(self.num_embeddings, d, dtype=self.g.dtype, device=self.g.device) for _ in degrees]
        for start in range(0, b, step):
            sl = slice(start, min(b, start + step))
            g = self.g[:, sl]
            nb = g.shape[1]
            r = rep[sl]  # no host read: the scatter is as cheap as a check for repeated tokens would be
            compact = torch.zeros_like(g).scatter_add_(2, r[None, :, :, None].expand(k, nb, t, d), g)
            rows = self.idx[sl].reshape(-1)
            for acc, st in zip(accs, fn(compact, sl)):
                acc.index_add_(0, rows, st.reshape(nb * t, d).to(acc.dtype))
        return [{"weight": acc} for acc in accs]


def embedding_record(module: torch.nn.Embedding, inp: Tensor, out_grad: Tensor) -> EmbeddingRecord:
    k, b = out_grad.shape[:2]
    d = module.embedding_dim
    idx = inp.reshape(b, -1)
    g = out_grad.reshape(k, b, -1, d)
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)  # that row gets no gradient
    return EmbeddingRecord(idx=idx, g=g, num_embeddings=module.num_embeddings)


def layernorm_record(module: torch.nn.LayerNorm, inp: Tensor, out_grad: Tensor, has_bias: bool) -> DenseRecord:
    shape = tuple(module.normalized_shape)
    xhat = torch.nn.functional.layer_norm(inp, shape, None, None, module.eps)  # the same normalisation
    k, b = out_grad.shape[:2]
    g = out_grad.reshape(k, b, -1, *shape)  # (K, B, positions, *normalized_shape)
    values = {"weight": (g * xhat.reshape(b, -1, *shape).to(g.dtype)).sum(2)}
    if has_bias:
        values["bias"] = g.sum(2)
    return DenseRecord(values)


def make_record(module: torch.nn.Module, inp: Tensor, out_grad: Tensor, has_bias: bool):
    """Build the record of a fast module from its input and the seeded output gradients ``(K, *out)``."""
    if isinstance(module, torch.nn.Linear):
        if inp.dim() == 2:
            return LinearRecord(a=inp, q=out_grad, has_bias=has_bias)
        b = inp.shape[0]
        X = inp.reshape(b, -1, inp.shape[-1]).transpose(1, 2)  # (B, in, S)
        g = out_grad.reshape(out_grad.shape[0], b, -1, out_grad.shape[-1]).transpose(2, 3)
        return UnfoldRecord(X=X, g=g, has_bias=has_bias, weight_shape=module.weight.shape)
    if isinstance(module, torch.nn.Conv2d):
        k, b = out_grad.shape[:2]
        if out_grad[0, 0, 0].numel() == 1:
            # one output position (e.g. 1x1 maps at the end of a ResNet): the per-sample gradient is the outer
            # product g[k,b,o] X[b,r], exactly a Linear layer's factored form (one matmul, nothing materialised)
            X = unfold_conv2d_input(module, inp)
            return LinearRecord(a=X.reshape(b, -1), q=out_grad.reshape(k, b, -1), has_bias=has_bias)
        if k <= CONV_BACKWARD_MAX_SEEDS:
            return ConvRecord(inp=inp, g=out_grad, has_bias=has_bias, module=module)
        X = unfold_conv2d_input(module, inp)
        g = out_grad.reshape(k, b, out_grad.shape[2], -1)
        return UnfoldRecord(X=X, g=g, has_bias=has_bias, weight_shape=module.weight.shape)
    if isinstance(module, torch.nn.Embedding):
        return embedding_record(module, inp, out_grad)
    if isinstance(module, torch.nn.LayerNorm):
        return layernorm_record(module, inp, out_grad, has_bias)
    if batchnorm_is_fast(module):
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        xhat = (inp - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
        k, b, c = out_grad.shape[:3]
        g = out_grad.reshape(k, b, c, -1)  # (K, B, C, positions)
        values = {"weight": torch.einsum("kbcs,bcs->kbc", g, xhat.reshape(b, c, -1).to(g.dtype))}
        if has_bias:
            values["bias"] = g.sum(-1)
        return DenseRecord(values)
    raise TypeError(f"no fast rule for {type(module).__name__}")


# -- nn.MultiheadAttention: its projections as Linear calls -------------------------------------------------------
def attention_is_fast(module: torch.nn.Module) -> bool:
    """``nn.MultiheadAttention`` whose projections the Probe can run as ``nn.Linear`` calls: one packed
    ``in_proj_weight``, no ``bias_k``/``bias_v``, no ``add_zero_attn``, no instance-level ``forward``."""
    return (
        isinstance(module, torch.nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and "forward" not in module.__dict__
    )


def in_projection_view(module: torch.nn.MultiheadAttention) -> torch.nn.Linear:
    """An ``nn.Linear`` (not registered in the model) whose parameters *are* the attention's ``in_proj_weight`` and
    ``in_proj_bias``: the Probe records it like any Linear (input ``(B, T, E)``, output ``(B, T, 3E)``)."""
    e = module.embed_dim
    view = torch.nn.Linear(e, 3 * e, bias=module.in_proj_bias is not None, device="meta")
    view.weight = module.in_proj_weight
    if module.in_proj_bias is not None:
        view.bias = module.in_proj_bias
    return view


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attention_forward(module: torch.nn.MultiheadAttention, view: torch.nn.Linear, original):
    """A forward for ``module`` (eval mode) that computes the same function as ``nn.MultiheadAttention`` with its
    in-projection as the call ``view(query)`` and its out-projection as the call ``module.out_proj(...)``, so that
    both take the Linear rule.  Self-attention on batched inputs only (``query is key is value``); any other call
    runs ``original`` (the projections then take the general route)."""

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):  # fmt: skip
        if (
            query is not key
            or key is not value
            or query.dim() != 3
            or module.training
            or (is_causal and attn_mask is None and key_padding_mask is not None)
        ):
            return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if module.batch_first else query.transpose(0, 1)  # (B, T, E)
        b, t, e = x.shape
        heads = module.num_heads
        hd = e // heads
        q, k, v = view(x).reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.reshape(b, heads, t, t) if mask.dim() == 3 else mask
        kpm = _float_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(b, 1, 1, t)
            mask = kpm if mask is None else mask + kpm
        causal = bool(is_causal and mask is None)
        weights = None
        if need_weights:
            scores = (q / math.sqrt(hd)) @ k.transpose(-2, -1)
            if causal:
                mask = _float_mask(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), q.dtype)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, -1)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = module.out_proj(out.transpose(1, 2).reshape(b, t, e))
        return (out if module.batch_first else out.transpose(0, 1)), weights

    return forward


class patch_attention:
    """Context manager: the given ``[(module, view)]`` run :func:`attention_forward` (instance ``forward``)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __enter__(self):
        for m, view in self.pairs:
            m.forward = attention_forward(m, view, type(m).forward.__get__(m))
        return self

    def __exit__(self, *exc):
        for m, _ in self.pairs:
            m.__dict__.pop("forward", None)
        return False
