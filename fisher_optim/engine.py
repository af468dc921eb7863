r"""The estimation engine: one forward pass, many seeded backward passes, per-layer reductions.

:class:`Probe` runs the model once on a batch of inputs (in eval mode, with forward hooks that live for
this call only) and records the inputs and outputs of the layers that have fast rules (``nn.Linear``,
``nn.Conv2d``).  :meth:`Probe.seeded` then backpropagates ``K`` seeds per input,
``seed[k, b] in R^C`` at the output ``h(x_b)``, and returns per-layer records of the per-sample
gradients of ``seed[k, b]^T h(x_b)`` (:mod:`fisher_optim.layers`); BatchNorm with running statistics (an
affine map per channel in eval mode), ``nn.Embedding``, ``nn.LayerNorm`` and the projections of self-attention
``nn.MultiheadAttention`` (run as Linear calls during the probe's forward,
:func:`~fisher_optim.layers.attention_forward`) have fast rules too.  Parameters of every other module
(BatchNorm without running statistics, RNNs, custom modules, layers reused twice in one forward, layers applied to
tensors whose dimension 0 is not the batch) take the general ``torch.func``
route: ``vmap`` over inputs of a ``vjp`` over seeds.

Every estimator is then ``reduce(records, fn, degree)`` for some per-input function of the seed stack:
the exact diagonal Fisher uses the ``C`` columns of ``S`` (``S S^T = I(h)``) and ``fn = sum_k x_k^2``;
Î₁ uses ``N`` sampled score seeds and ``fn = (1/N) sum_k x_k^2``; the variances use unit seeds ``e_c``
and the likelihood's moment contractions.  Scaling (mean over inputs) is applied by the callers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .batch import Batch, NonFiniteError, OutputSpec, select_output
from .forward import ModeGuard, broadcast_partner, eager, enter_estimation, exit_estimation, graph_uses
from .general import general_seeded_grads
from .layers import (
    DenseRecord,
    Reducer,
    attention_is_fast,
    call_is_batched,
    in_projection_view,
    is_fast,
    linear_reduce,
    make_record,
    patch_attention,
)
from .likelihoods import Likelihood

__all__ = ["Probe", "reduce_records", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for the parameters that require grad, as ``model.named_parameters()``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Probe:
    r"""One forward pass of ``model`` on ``inputs`` with the fast layers' inputs and outputs recorded.

    Use as a context manager; the hooks are removed and the train/eval flags restored on exit::

        with Probe(model, x, likelihood) as probe:
            h = probe.h                       # (B, C) natural parameters
            recs = probe.seeded(seeds)        # seeds: (K, B, C)

    ``inputs`` is a Tensor, a tuple or a dict (:class:`~fisher_optim.batch.Batch`: tensors whose leading dimension
    is the batch are sliced together, others passed whole); ``output`` picks the natural parameters out of the
    model's output (:func:`~fisher_optim.batch.select_output`).

    The forward runs in eval mode (dropout off); BatchNorm layers in train mode use the estimation batch's own
    statistics, held constant, those in eval mode their running statistics
    (:class:`~fisher_optim.forward.ModeGuard`).  Compiled models run eagerly.  Which parameters the output
    depends on is read off the autograd graph: a fast rule
    (``nn.Linear``, ``nn.Conv2d``, BatchNorm, ``nn.Embedding``, ``nn.LayerNorm``, attention projections) covers a
    parameter only if its module ran once, on a tensor whose dimension 0 is the batch
    (:func:`~fisher_optim.layers.call_is_batched`), its output reaches ``h`` and that call is the parameter's only
    use; every other parameter on the graph takes the general route;
    only parameters off the graph get zeros (:attr:`unused`).  ``.grad`` fields are never touched.

    Non-finite inputs or outputs raise :class:`~fisher_optim.batch.NonFiniteError` (a ``ValueError``).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs,
        likelihood: Likelihood,
        names: Iterable[str] | None = None,
        output: OutputSpec = None,
    ):
        self.batch = Batch.of(inputs)
        self.model = model
        self.lik = likelihood
        self.output = output
        params = trainable_parameters(model)
        if names is not None:
            names = list(names)
            missing = [n for n in names if n not in params]
            if missing:
                raise ValueError(f"unknown or frozen parameter names: {missing}")
            params = {n: params[n] for n in names}
        self.params = params

    @property
    def inputs(self) -> Tensor:
        """The first batched input tensor (shape, dtype and device of the batch)."""
        return self.batch.first

    @property
    def output_layer_input(self) -> Tensor:  # the input of fast[output_index] (only when output_index is set)
        return self._ins[self.output_index]

    def param_name(self, p: Tensor) -> str | None:
        """The name of parameter ``p`` in this probe (None if it is not one of :attr:`params`)."""
        return self._pname.get(id(p))

    def outputs_of(self, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor:
        """``(b, D)`` natural parameters of ``batch`` (eagerly, in the probe's modes), with ``params`` substituted
        by ``torch.func.functional_call`` when given."""
        with eager():
            if params is None:
                out = batch.call(self.model)
            else:
                out = functional_call(self.model, params, batch.args, batch.kwargs)
        return self.lik.flatten(select_output(out, self.output))

    # -- context management ---------------------------------------------------------------------
    def __enter__(self) -> Probe:
        self.batch.check_finite()
        enter_estimation()
        try:
            self._mode = ModeGuard(self.model).__enter__()
        except BaseException:
            exit_estimation()
            raise
        try:
            self._forward(clone=False)
            self._mode.release_hooks()
            if any(out._version != ver for out, ver in zip(self._outs, self._versions)):
                # an in-place op (e.g. ReLU(inplace=True)) overwrote a recorded output: redo with copies
                self._forward(clone=True)
        except BaseException:
            self._mode.__exit__(None, None, None)
            exit_estimation()
            raise
        return self

    def __exit__(self, *exc):
        exit_estimation()
        self._mode.__exit__(*exc)
        self._outs = self._ins = self._in_graph = None
        self.h = None
        return False

    def _plan_modules(self):
        """Fast modules whose trainable parameters belong to this call, each parameter owned by one module."""
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
        # nn.MultiheadAttention: its in-projection as an nn.Linear view over in_proj_weight/in_proj_bias, called by
        # a patched forward (layers.attention_forward) that also calls out_proj as a module: both take the Linear rule
        self._attention = []
        for mname, m in self.model.named_modules():
            if not attention_is_fast(m) or id(m.in_proj_weight) not in pname:
                continue
            bias = m.in_proj_bias
            has_bias = bias is not None and id(bias) in pname
            if bias is not None and bias.requires_grad and not has_bias:
                continue
            view = in_projection_view(m)
            self._attention.append((m, view))
            fast.append((f"{mname}.in_proj", view, has_bias))
        if self._attention:  # module order (input to output), each in-projection just before its out_proj
            order = {n: float(i) for i, (n, _) in enumerate(self.model.named_modules())}
            fast.sort(key=lambda f: order[f[0]] if f[0] in order else order[f[0][: -len(".in_proj")]] + 0.5)
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
            with torch.enable_grad(), patch_attention(self._attention):  # under no_grad too: h stays on the graph
                self.h = self.outputs_of(self.batch)
        finally:
            for hd in handles:
                hd.remove()
        if self.h.shape[0] != self.batch.size:
            raise ValueError(f"model output has batch size {self.h.shape[0]} but inputs have {self.batch.size}")
        if not bool(torch.isfinite(self.h.detach()).all()):  # one host read; the count only on failure
            bad = int((~torch.isfinite(self.h.detach())).sum())
            raise NonFiniteError(f"model output has {bad} non-finite value(s) (NaN or inf) of {self.h.numel()}")
        uses, nodes = graph_uses(self.h)
        self.fast = []  # (mname, module, has_bias)
        covered: set[str] = set()
        shared: dict[str, str] = {}  # shared-index Embedding -> the module whose output it is added to
        for mname, m, has_bias in fast:
            own = [m.weight] + ([m.bias] if has_bias else [])
            out = outs.get(mname)
            if (
                calls.get(mname, 0) != 1
                or not isinstance(out, Tensor)
                or out.grad_fn not in nodes
                or any(uses.get(id(p), 0) != 1 for p in own)
            ):
                continue  # unused, reused, or a parameter used outside this call: autograd decides below
            if not call_is_batched(m, in_graph.get(mname), out, self.batch):
                # not a per-input call; a shared Embedding (learned positions) broadcast-added to a per-input
                # recorded output takes the gradient at that output as its own per-input gradient
                partner = broadcast_partner(m, out, outs, calls, nodes, self.batch.size)
                if partner is None:
                    continue
                shared[mname] = partner
            self.fast.append((mname, m, has_bias))
            covered.update(pname[id(p)] for p in own)
        for mname, partner in shared.items():  # the index as (B, ...) and the partner's output as the output
            idx = ins[mname]
            ins[mname] = idx.expand(self.batch.size, *idx.shape)
            outs[mname], versions[mname] = outs[partner], versions[partner]
        #: parameters the output does not depend on (off the autograd graph): their Fisher is exactly zero
        self.unused = sorted(n for n, p in self.params.items() if id(p) not in uses)
        unused = set(self.unused)
        #: parameters on the graph that no fast rule fully saw: the general (torch.func / autograd) route
        self.general = [n for n in self.params if n not in covered and n not in unused]
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
    def module_params(self, i: int) -> list[str]:
        mname, m, has_bias = self.fast[i]
        return [self._pname[id(m.weight)]] + ([self._pname[id(m.bias)]] if has_bias else [])

    def exact_output_layer(self, names: Iterable[str] | None = None) -> tuple[dict[str, Tensor], set[str]]:
        r"""Exact ``sum_m I_ii`` of the output layer's parameters without any seed (docs/fisher-math.md §7.1 with
        ``B_L = I``).

        When a ``nn.Linear`` produces ``h`` itself, ``dh_a / dW[j,k] = delta_aj a_k``, so
        ``F(W[j,k]) = I_jj(h) a_k^2`` and ``F(b[j]) = I_jj(h)``: one matmul with the Fisher's diagonal instead
        of ``C`` seeds (``C`` can be 784 for a pixel-wise output).  Returns ``({name: sum over inputs}, names
        covered)``; empty when no such layer exists or it is not among ``names``.
        """
        if self.output_index is None:
            return {}, set()
        keys = {"weight": self.module_params(self.output_index)[0]}
        if self.fast[self.output_index][2]:
            keys["bias"] = self.module_params(self.output_index)[1]
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
        select = [i for i in range(len(self.fast)) if wanted.intersection(self.module_params(i))]
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
            vals = general_seeded_grads(self, seeds, general)
            out.append((DenseRecord(vals), {n: n for n in vals}))
        return out


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
