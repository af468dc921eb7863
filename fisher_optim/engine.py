r"""The estimation engine: one forward pass, many seeded backward passes, per-layer reductions.

:class:`Probe` runs the model once on a batch of inputs (in eval mode, with forward hooks that live for
this call only) and records the inputs and outputs of the layers that have fast rules (``nn.Linear``,
``nn.Conv2d``).  :meth:`Probe.seeded` then backpropagates ``K`` seeds per input,
``seed[k, b] in R^C`` at the output ``h(x_b)``, and returns per-layer records of the per-sample
gradients of ``seed[k, b]^T h(x_b)`` (:mod:`fisher_optim.layers`); BatchNorm with running statistics (an
affine map per channel in eval mode) has a fast rule too.  Parameters of every other module (LayerNorm,
Embedding, BatchNorm without running statistics, custom modules, layers reused twice in one forward) take the
general ``torch.func`` route: ``vmap`` over inputs of a ``vjp`` over seeds.

Every estimator is then ``reduce(records, fn, degree)`` for some per-input function of the seed stack:
the exact diagonal Fisher uses the ``C`` columns of ``S`` (``S S^T = I(h)``) and ``fn = sum_k x_k^2``;
Î₁ uses ``N`` sampled score seeds and ``fn = (1/N) sum_k x_k^2``; the variances use unit seeds ``e_c``
and the likelihood's moment contractions.  Scaling (mean over inputs) is applied by the callers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .layers import DenseRecord, Reducer, is_fast, linear_reduce, make_record
from .likelihoods import Likelihood

__all__ = ["Probe", "reduce_records", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for the parameters that require grad, as ``model.named_parameters()``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _ModeGuard:
    """Put every submodule in eval mode and restore each module's own flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


class Probe:
    r"""One forward pass of ``model`` on ``inputs`` with the fast layers' inputs and outputs recorded.

    Use as a context manager; the hooks are removed and the train/eval flags restored on exit::

        with Probe(model, x, likelihood) as probe:
            h = probe.h                       # (B, C) natural parameters
            recs = probe.seeded(seeds)        # seeds: (K, B, C)

    The forward runs in eval mode (dropout off, BatchNorm on its running statistics, which are therefore
    not updated): the Fisher is that of the deterministic prediction ``h(x; theta)``.  ``.grad`` fields
    are never touched (``torch.autograd.grad`` only).
    """

    def __init__(self, model: nn.Module, inputs: Tensor, likelihood: Likelihood, names: Iterable[str] | None = None):
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a Tensor of shape (batch, ...), got {type(inputs).__name__}")
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"inputs must have a non-empty batch dimension, got shape {tuple(inputs.shape)}")
        self.model = model
        self.inputs = inputs
        self.lik = likelihood
        params = trainable_parameters(model)
        if names is not None:
            names = list(names)
            missing = [n for n in names if n not in params]
            if missing:
                raise ValueError(f"unknown or frozen parameter names: {missing}")
            params = {n: params[n] for n in names}
        self.params = params

    # -- context management ---------------------------------------------------------------------
    def __enter__(self) -> Probe:
        self._mode = _ModeGuard(self.model).__enter__()
        try:
            self._forward(clone=False)
            if any(out._version != ver for out, ver in zip(self._outs, self._versions)):
                # an in-place op (e.g. ReLU(inplace=True)) overwrote a recorded output: redo with copies
                self._forward(clone=True)
        except BaseException:
            self._mode.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._outs = self._ins = self._in_graph = None
        self.h = None
        return False

    def _plan_modules(self):
        """Fast modules whose trainable parameters belong to this call, each parameter used once."""
        owners: dict[int, int] = {}
        for m in self.model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        pname = {id(p): n for n, p in self.params.items()}
        fast = []
        for mname, m in self.model.named_modules():
            if not is_fast(m) or m.weight is None or id(m.weight) not in pname:
                continue
            own = [p for p in m.parameters(recurse=False)]
            if any(owners[id(p)] > 1 for p in own):
                continue
            bias = getattr(m, "bias", None)
            has_bias = bias is not None and id(bias) in pname
            if bias is not None and bias.requires_grad and not has_bias:
                continue  # bias trainable but not requested: keep it simple, general route for weight
            fast.append((mname, m, has_bias))
        return fast, pname

    def _forward(self, clone: bool):
        fast, pname = self._plan_modules()
        calls: dict[str, int] = {}
        ins: dict[str, Tensor] = {}
        outs: dict[str, Tensor] = {}
        versions: dict[str, int] = {}
        in_graph: dict[str, Tensor] = {}

        def make_hook(mname):
            def hook(module, args, output):
                calls[mname] = calls.get(mname, 0) + 1
                ins[mname] = args[0].detach()
                in_graph[mname] = args[0]
                outs[mname] = output
                versions[mname] = output._version
                # with clone=True the module's caller gets a copy, so a later in-place op (ReLU(inplace=True))
                # modifies the copy and the recorded output keeps the pre-activation values
                return output.clone() if clone else output

            return hook

        handles = [m.register_forward_hook(make_hook(mname)) for mname, m, _ in fast]
        try:
            with torch.enable_grad():
                out = self.model(self.inputs)
        finally:
            for hd in handles:
                hd.remove()
        if not isinstance(out, Tensor):
            raise TypeError(f"model output must be a Tensor, got {type(out).__name__}")
        with torch.enable_grad():  # flatten may be a reshape: keep h on the graph under an optimizer's no_grad
            self.h = self.lik.flatten(out)
        if self.h.shape[0] != self.inputs.shape[0]:
            raise ValueError(
                f"model output has batch size {self.h.shape[0]} but inputs have {self.inputs.shape[0]}"
            )
        self.fast = []  # (mname, module, has_bias)
        covered: set[str] = set()
        for mname, m, has_bias in fast:
            if calls.get(mname, 0) != 1:
                continue  # unused (zero Fisher) or reused (general route)
            self.fast.append((mname, m, has_bias))
            covered.add(pname[id(m.weight)])
            if has_bias:
                covered.add(pname[id(m.bias)])
        unused_fast = {
            pname[id(p)]
            for mname, m, _ in fast
            if calls.get(mname, 0) == 0
            for p in m.parameters(recurse=False)
            if id(p) in pname
        }
        self.general = [n for n in self.params if n not in covered and n not in unused_fast]
        self.unused = sorted(unused_fast)
        self._ins = [ins[mname] for mname, _, _ in self.fast]
        self._in_graph = [in_graph[mname] for mname, _, _ in self.fast]  # the inputs on the autograd graph
        self._outs = [outs[mname] for mname, _, _ in self.fast]
        self._versions = [versions[mname] for mname, _, _ in self.fast]
        self.module_inputs = dict(zip([f[0] for f in self.fast], self._ins))
        self.module_outputs = dict(zip([f[0] for f in self.fast], self._outs))
        self._pname = pname
        #: index in ``fast`` of the ``nn.Linear`` (2-D input) whose output *is* ``h`` (same elements), or None
        self.output_index = None
        for i, (_, m, _) in enumerate(self.fast):
            o = self._outs[i]
            if (
                isinstance(m, nn.Linear)
                and self._ins[i].dim() == 2
                and o.shape == self.h.shape
                and o.stride() == self.h.stride()
                and o.data_ptr() == self.h.data_ptr()
                and o.dtype == self.h.dtype
            ):
                self.output_index = i

    # -- seeded backward ------------------------------------------------------------------------
    def _module_params(self, i: int) -> list[str]:
        mname, m, has_bias = self.fast[i]
        return [self._pname[id(m.weight)]] + ([self._pname[id(m.bias)]] if has_bias else [])

    def exact_output_layer(self, names: Iterable[str] | None = None) -> tuple[dict[str, Tensor], set[str]]:
        r"""Exact ``sum_m I_ii`` of the output layer's parameters without any seed (spec §7.1 with ``B_L = I``).

        When a ``nn.Linear`` produces ``h`` itself, ``dh_a / dW[j,k] = delta_aj a_k``, so
        ``F(W[j,k]) = I_jj(h) a_k^2`` and ``F(b[j]) = I_jj(h)``: one matmul with the Fisher's diagonal instead
        of ``C`` seeds (``C`` can be 784 for a pixel-wise output).  Returns ``({name: sum over inputs}, names
        covered)``; empty when no such layer exists or it is not among ``names``.
        """
        if self.output_index is None:
            return {}, set()
        keys = {"weight": self._module_params(self.output_index)[0]}
        if self.fast[self.output_index][2]:
            keys["bias"] = self._module_params(self.output_index)[1]
        wanted = set(self.params) if names is None else set(names)
        keys = {k: n for k, n in keys.items() if n in wanted}
        if not keys:
            return {}, set()
        diag = self.lik.unit_variance(self.h.detach())  # (B, C): the diagonal of I(h) for every family
        vals = linear_reduce(self._ins[self.output_index], [(diag, 2)], "bias" in keys)[0]
        return {n: vals[k].reshape(self.params[n].shape) for k, n in keys.items()}, set(keys.values())

    def output_grads(
        self, seeds: Tensor, select: list[int] | None = None, diagonal: Tensor | None = None
    ) -> list[Tensor]:
        """Gradients of ``sum_b seed[k,b]^T h_b`` w.r.t. recorded fast-layer outputs: ``(K, *out)`` each.

        ``select`` restricts the backward to those layers (autograd then skips the rest of the graph).
        ``diagonal`` (``B x C``) declares ``seed[k, b, c] = diagonal[b, k] delta_kc`` (unit seeds, or the exact
        seeds ``S`` of a factorised likelihood): when a ``nn.Linear`` produces ``h`` itself
        (:attr:`output_index`), the gradient at its input is then ``diagonal[b, k] W[k, :]`` without the
        ``(K B x C) @ (C x n)`` product, and the backward starts there.
        """
        if select is None:
            select = list(range(len(self._outs)))
        if not select:
            return []
        k = seeds.shape[0]
        seeds = seeds.to(self.h.dtype)
        oi = self.output_index
        if diagonal is not None and oi is not None and k == self.h.shape[1]:
            others = [i for i in select if i != oi]
            grads = dict(zip(others, self._grads_from(
                self._in_graph[oi],
                diagonal.to(self.h.dtype).T.unsqueeze(-1) * self.fast[oi][1].weight.detach().unsqueeze(1),
                [self._outs[i] for i in others],
            ))) if others else {}  # fmt: skip
            if oi in select:
                grads[oi] = seeds.reshape(k, *self._outs[oi].shape)
            return [grads[i] for i in select]
        return self._grads_from(self.h, seeds, [self._outs[i] for i in select])

    @staticmethod
    def _grads_from(root: Tensor, grad: Tensor, outs: list[Tensor]) -> list[Tensor]:
        """Batched ``d (grad[k] . root) / d out`` for every ``out`` (zeros where unused): ``(K, *out)`` each."""
        k = grad.shape[0]
        if not root.requires_grad:
            grads = [None] * len(outs)
        elif k == 1:
            grads = torch.autograd.grad(root, outs, grad[0], retain_graph=True, allow_unused=True)
            grads = [g.unsqueeze(0) if g is not None else None for g in grads]
        else:
            try:
                grads = torch.autograd.grad(
                    root, outs, grad, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except RuntimeError:  # an op without a batching rule: loop over seeds
                per = [torch.autograd.grad(root, outs, s, retain_graph=True, allow_unused=True) for s in grad]
                grads = [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(outs))]
        return [
            torch.zeros((k, *o.shape), dtype=o.dtype, device=o.device) if g is None else g
            for g, o in zip(grads, outs)
        ]

    def seeded(
        self, seeds: Tensor, names: Iterable[str] | None = None, diagonal: Tensor | None = None
    ) -> list[tuple[object, dict[str, str]]]:
        """Per-layer records of per-sample gradients of ``seed[k,b]^T h(x_b)``.

        Returns ``[(record, {record_key: parameter_name})]`` covering the parameters ``names`` (default:
        all of this probe's; unused parameters are absent and :func:`reduce_records` fills them with zeros).
        ``diagonal``: see :meth:`output_grads` (a promise about ``seeds``, not checked).
        """
        if seeds.dim() != 3 or seeds.shape[1:] != self.h.shape:
            raise ValueError(f"seeds must have shape (K, {tuple(self.h.shape)}), got {tuple(seeds.shape)}")
        seeds = seeds.detach()
        wanted = set(self.params) if names is None else set(names)
        select = [i for i in range(len(self.fast)) if wanted.intersection(self._module_params(i))]
        out = []
        grads = self.output_grads(seeds, select, diagonal=diagonal)
        #: the seeded output gradients of the last call, by module name (reused by the Hessian chain route)
        self.last_grads = {self.fast[i][0]: g for i, g in zip(select, grads)}
        for i, g in zip(select, grads):
            _, m, has_bias = self.fast[i]
            rec = make_record(m, self._ins[i], g, has_bias)
            keys = {"weight": self._pname[id(m.weight)]}
            if has_bias:
                keys["bias"] = self._pname[id(m.bias)]
            out.append((rec, keys))
        general = [n for n in self.general if n in wanted]
        if general:
            vals = general_seeded_grads(self.model, self.lik, self.inputs, seeds, general)
            out.append((DenseRecord(vals), {n: n for n in vals}))
        return out


def general_seeded_grads(
    model: nn.Module, lik: Likelihood, inputs: Tensor, seeds: Tensor, names: list[str], chunk: int | None = None
) -> dict[str, Tensor]:
    """``torch.func`` route: per-input, per-seed gradients ``(K, B, *shape)`` for parameters ``names``.

    Runs ``vmap`` over inputs (each as a batch of one) of ``vjp`` over the ``K`` seeds, in chunks of
    inputs.  Works for any module (the model must be in eval mode, as inside :class:`Probe`).
    """
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}
    numel = sum(p.numel() for p in params.values())
    k = seeds.shape[0]
    if chunk is None:
        chunk = max(1, 2**24 // max(1, k * numel))

    def per_input(pd, x, s):
        def f(p):
            return lik.flatten(functional_call(model, p, (x.unsqueeze(0),)))[0]

        _, pull = vjp(f, pd)
        return vmap(pull)(s)[0]

    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    flat_dtype = next(iter(params.values())).dtype  # not inputs.dtype: integer inputs (Embedding) exist
    b = inputs.shape[0]
    for start in range(0, b, chunk):
        sl = slice(start, min(b, start + chunk))
        g = vmap(per_input, in_dims=(None, 0, 1))(params, inputs[sl], seeds[:, sl].to(flat_dtype))
        for n in names:
            parts[n].append(g[n].transpose(0, 1))
    return {n: torch.cat(parts[n], 1) for n in names}


def reduce_records(
    records: list[tuple[object, dict[str, str]]],
    fn: Reducer,
    degree: int,
    params: dict[str, Tensor],
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Apply ``fn`` per input to every record and sum over inputs; zeros for parameters not covered."""
    names = None if names is None else set(names)
    out: dict[str, Tensor] = {}
    for rec, keys in records:
        vals = rec.reduce(fn, degree)
        for key, name in keys.items():
            out[name] = vals[key].reshape(params[name].shape)
    return {
        n: out[n] if n in out else torch.zeros_like(p, memory_format=torch.contiguous_format)
        for n, p in params.items()
        if names is None or n in names
    }
