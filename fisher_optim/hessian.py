r"""Exact diagonal of the output-Hessian residual, the random part of Î₂ (docs/fisher-math.md §2.1, §6a, §6g, §7.1,
§7.4).

For a seed ``g[k, b] in R^C`` this module computes, per input and seed,

.. math::  \rho_i[k, b] = \sum_a g_a[k, b]\, \partial^2_{ii} h_a(x_b; \theta),

so that the sampled-label Hessian diagonal is ``Î₂ = F_exact + mean_b rho(seed = eta - tbar)`` and the
variance of Î₂ is ``(1/N) sum_m rho(seed = S[:, m])^2``.  Never Hutchinson: every route is exact.

Routes, chosen by :func:`plan`:

* **zero** — parameters followed only by (piecewise-)linear operations (the last layer; every layer of a
  ReLU/max-pool network): :math:`\partial^2_{ii} h = 0` almost everywhere, so ``rho = 0`` (docs/fisher-math.md §6a,
  §6g).
* **chain** — ``nn.Sequential`` of ``nn.Linear`` layers (2-D inputs) with elementwise activations: the
  pre-activation Hessian recursion of docs/fisher-math.md §7.1 in factored form, per input, by matmuls.
* **hvp** — any other network of ``nn.Linear``/``nn.Conv2d`` layers with elementwise activations, pooling,
  flattening and parameter-free glue (residual sums included): the exact diagonal from ``P`` batched
  Hessian-vector products with ``torch.func`` (``vmap`` over the basis).  Exact but costs ``P`` HVPs:
  meant for small smooth convolutional models.

A module with parameters other than Linear/Conv1d/Conv2d raises a ``ValueError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from .layers import DenseRecord, LinearRecord

#: elementwise maps that are piecewise linear (second derivative 0 almost everywhere)
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)
#: elementwise maps with a (possibly nonzero) second derivative
SMOOTH = (
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.Softplus, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Hardsigmoid, nn.Hardswish,
)
#: parameter-free modules that are linear maps (or identities in eval mode)
LINEAR_GLUE = (
    nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.MaxPool1d, nn.MaxPool2d,
    nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.Identity,
)
PARAM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """Flatten nested ``nn.Sequential`` into its leaf modules; ``None`` if it is not a pure chain."""
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            sub = _leaves(child, f"{prefix}{name}.")
            if sub is None:
                return None
            out.extend(sub)
        return out
    if len(list(module.children())) > 0:
        return None
    return [(prefix.rstrip("."), module)]


@dataclass
class HessianPlan:
    route: str  # "zero" | "chain" | "hvp"
    zero: set[str] = field(default_factory=set)  # parameter names with rho == 0
    active: list[str] = field(default_factory=list)  # parameter names needing a computation
    chain: list[tuple[str, nn.Module, nn.Module | None]] = field(default_factory=list)


def _check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if len(list(m.children())) == 0 and any(True for _ in m.parameters(recurse=False)):
            if not isinstance(m, PARAM_LAYERS):
                raise ValueError(
                    f"estimator 'mc2' needs the exact Hessian diagonal, which fisher_optim computes for "
                    f"networks of Linear/Conv2d layers and elementwise activations; module "
                    f"'{name or type(model).__name__}' ({type(m).__name__}) is not supported. "
                    f"Use estimator='exact' or 'mc1' for this model."
                )


def plan(model: nn.Module, params: dict[str, Tensor]) -> HessianPlan:
    """Decide the route for each parameter (see the module docstring)."""
    _check_supported(model)
    leaves = _leaves(model)
    if leaves is None:
        return HessianPlan("hvp", active=list(params))
    pname = {id(p): n for n, p in params.items()}
    known = PIECEWISE_LINEAR + SMOOTH + LINEAR_GLUE + PARAM_LAYERS
    for _, m in leaves:
        if not isinstance(m, known):
            # parameter-free module of unknown kind: treat the whole network with HVPs (exact)
            return HessianPlan("hvp", active=list(params))
    zero, active = set(), []
    smooth_after = False
    for _, m in reversed(leaves):
        if isinstance(m, SMOOTH):
            smooth_after = True
        for p in m.parameters(recurse=False):
            if id(p) in pname:
                (active.append if smooth_after else zero.add)(pname[id(p)])
    if not active:
        return HessianPlan("zero", zero=zero)
    # chain route: Linear layers, each followed by at most one elementwise map (glue allowed only first)
    chain: list[tuple[str, nn.Module, nn.Module | None]] = []
    ok = True
    for name, m in leaves:
        if isinstance(m, nn.Linear):
            chain.append((name, m, None))
        elif isinstance(m, (nn.Identity, nn.Dropout)) or (isinstance(m, nn.Flatten) and not chain):
            continue
        elif isinstance(m, PIECEWISE_LINEAR + SMOOTH) and chain and chain[-1][2] is None:
            chain[-1] = (chain[-1][0], chain[-1][1], m)
        else:
            ok = False
            break
    if ok and chain:
        return HessianPlan("chain", zero=zero, active=active, chain=chain)
    return HessianPlan("hvp", zero=zero, active=active)


def _act_derivs(act: nn.Module | None, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """First and second derivative of an elementwise map at ``z`` (``None`` second derivative = 0)."""
    if act is None or isinstance(act, (nn.Identity, nn.Dropout)):
        return torch.ones_like(z), None
    z = z.detach()
    if isinstance(act, nn.Sigmoid):  # closed forms: no double backward
        s = torch.sigmoid(z)
        d1 = s * (1 - s)
        return d1, d1 * (1 - 2 * s)
    if isinstance(act, nn.Tanh):
        t = torch.tanh(z)
        d1 = 1 - t * t
        return d1, -2 * t * d1
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        y = act(z.clone())  # a non-leaf copy: in-place activations (ReLU(inplace=True)) are allowed
        (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        if not d1.requires_grad or isinstance(act, PIECEWISE_LINEAR):
            return d1.detach(), None
        (d2,) = torch.autograd.grad(d1.sum(), z)
    return d1.detach(), d2.detach()


def chain_records(
    probe, hp: HessianPlan, seeds: Tensor, grads: dict[str, Tensor] | None = None
) -> list[tuple[object, dict[str, str]]]:
    """Chain route: ``rho`` for Linear layers of a Sequential MLP as :class:`LinearRecord` (power 2).

    With ``z_l`` the pre-activations, ``a_l = sigma_l(z_l)``, ``r_l = sigma_l''(z_l) * dphi/da_l`` and
    ``J_{l'<-l} = dz_{l'}/dz_l``, the diagonal of the Hessian of ``phi = seed^T h`` w.r.t. ``z_l`` is
    ``sum_{l' >= l} r_{l'}^T (J_{l'<-l})^2`` (docs/fisher-math.md §7.1, unrolled form); then
    ``d^2 phi / dW_l[j,i]^2 = Hdiag_l[j] a_{l-1}[i]^2``.  ``grads`` (module name -> seeded output
    gradients ``(K, B, out)`` for these seeds) skips the backward when the caller already has them.
    """
    names = [n for n, _, _ in hp.chain]
    ins = [probe.module_inputs.get(n) for n in names]
    outs = [probe.module_outputs.get(n) for n in names]
    if any(t is None for t in ins) or any(t.dim() != 2 for t in ins):
        return hvp_records(probe, hp, seeds, per_sample=True)
    if grads is None or any(n not in grads for n in names):
        grads = dict(zip([f[0] for f in probe.fast], probe.output_grads(seeds)))
    L = len(hp.chain)
    d1s, rs = [], []
    for idx, (_, _, act) in enumerate(hp.chain):
        d1, d2 = _act_derivs(act, outs[idx])
        d1s.append(d1)
        if d2 is None:
            rs.append(None)
            continue
        if idx + 1 < L and isinstance(act, (nn.Sigmoid, nn.Tanh)):
            # sigma'' / sigma' is 1 - 2 sigma (sigmoid) or -2 tanh: r = (sigma''/sigma') * dphi/dz, no matmul
            y = torch.sigmoid(outs[idx]) if isinstance(act, nn.Sigmoid) else torch.tanh(outs[idx])
            ratio = 1 - 2 * y if isinstance(act, nn.Sigmoid) else -2 * y
            rs.append(ratio.detach() * grads[names[idx]])
            continue
        if idx + 1 < L:
            da = grads[names[idx + 1]] @ hp.chain[idx + 1][1].weight.detach()
        else:
            da = seeds.to(d2.dtype).reshape(seeds.shape[0], *d2.shape)
        rs.append(d2 * da)  # (K, B, n_l)
    hdiag: list[Tensor | None] = list(rs)  # rebound below, never written in place
    for lp in range(L):
        r = rs[lp]
        if r is None or lp == 0:
            continue
        w = hp.chain[lp][1].weight.detach()
        # adjacent layer without materialising per-input Jacobians
        # in place on the fresh matmul output: every large temporary costs page faults on CPU
        contrib = (r @ (w * w)).mul_(d1s[lp - 1] ** 2)
        hdiag[lp - 1] = contrib if hdiag[lp - 1] is None else contrib.add_(hdiag[lp - 1])
        if lp < 2:
            continue  # no layer below lp - 1: the per-input Jacobian is not needed
        jac = w.unsqueeze(0) * d1s[lp - 1].unsqueeze(1)  # (B, n_lp, n_{lp-1})
        for m in range(lp - 2, -1, -1):
            jac = (jac @ hp.chain[m + 1][1].weight.detach()) * d1s[m].unsqueeze(1)
            contrib = torch.einsum("kbi,bij->kbj", r, jac * jac)
            hdiag[m] = contrib if hdiag[m] is None else contrib.add_(hdiag[m])
    out = []
    for idx, (_, lin, _) in enumerate(hp.chain):
        if hdiag[idx] is None or probe.param_name(lin.weight) not in hp.active:
            continue
        has_bias = lin.bias is not None and probe.param_name(lin.bias) is not None
        keys = {"weight": probe.param_name(lin.weight)}
        if has_bias:
            keys["bias"] = probe.param_name(lin.bias)
        out.append((LinearRecord(a=ins[idx], q=hdiag[idx], has_bias=has_bias, power=2), keys))
    return out


def hvp_records(
    probe, hp: HessianPlan, seeds: Tensor, per_sample: bool, chunk_size: int = 32, input_chunk: int = 8
):
    """Exact ``rho`` by Hessian-vector products over the parameter basis (``torch.func``).

    ``per_sample=True`` gives ``(K, B, *shape)`` (one scalar ``seed[k,b]^T h(x_b)`` per input and seed);
    ``per_sample=False`` gives the batch sum ``sum_b seed[k,b]^T h(x_b)`` as ``(K, 1, *shape)``.
    """
    model, batch = probe.model, probe.batch
    named = dict(model.named_parameters())
    names = list(hp.active)
    params = {n: named[n].detach() for n in names}
    sizes = [params[n].numel() for n in names]
    total = sum(sizes)

    def phi(flat, x, s):
        pd, off = {}, 0
        for n, sz in zip(names, sizes):
            pd[n] = flat[off : off + sz].view_as(params[n])
            off += sz
        return (probe.outputs_of(x, pd) * s).sum()

    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def diag_for(x, s):
        g = grad(phi)

        def hvp(e):
            return jvp(lambda f: g(f, x, s), (flat0,), (e,))[1]

        out = []
        for start in range(0, total, chunk_size):
            stop = min(total, start + chunk_size)
            basis = torch.zeros(stop - start, total, dtype=flat0.dtype, device=flat0.device)
            ar = torch.arange(stop - start, device=flat0.device)
            basis[ar, start + ar] = 1.0
            out.append(vmap(hvp)(basis)[ar, start + ar])
        return torch.cat(out)

    k = seeds.shape[0]
    seeds = seeds.to(flat0.dtype)
    if per_sample:
        rows = []
        for kk in range(k):
            per_b = [diag_for(batch[b : b + 1], seeds[kk, b : b + 1]) for b in range(batch.size)]
            rows.append(torch.stack(per_b))
        diag = torch.stack(rows)  # (K, B, total)
    else:
        # the batch sum is linear: accumulate over input chunks to bound memory (basis chunk x input chunk)
        step = input_chunk
        diag = torch.stack(
            [
                sum(diag_for(batch[s : s + step], seeds[kk, s : s + step]) for s in range(0, batch.size, step))
                for kk in range(k)
            ]
        ).unsqueeze(1)  # (K, 1, total)
    vals, off = {}, 0
    for n, sz in zip(names, sizes):
        vals[n] = diag[..., off : off + sz].reshape(*diag.shape[:2], *params[n].shape)
        off += sz
    return [(DenseRecord(vals), {n: n for n in names})]


def residual_records(probe, seeds: Tensor, per_sample: bool = True, grads: dict[str, Tensor] | None = None):
    """Records of ``rho`` for all parameters of ``probe`` (zero-route parameters omitted = 0).

    ``grads``: optional seeded output gradients for ``seeds`` by module name (see :func:`chain_records`).
    """
    hp = plan(probe.model, probe.params)
    if hp.route == "zero" or not hp.active:
        return []
    if hp.route == "chain":
        return chain_records(probe, hp, seeds, grads)
    return hvp_records(probe, hp, seeds, per_sample=per_sample)

