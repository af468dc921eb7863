"""Brute-force float64 references built with torch.func (obviously right, slow)."""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev


def flat_params(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return names, flat


def unflatten(model, names, flat):
    params = dict(model.named_parameters())
    out, off = {}, 0
    for n in names:
        sz = params[n].numel()
        out[n] = flat[off : off + sz].view_as(params[n])
        off += sz
    return out


def split(model, names, vec):
    """(..., P) -> {name: (..., *shape)}"""
    params = dict(model.named_parameters())
    out, off = {}, 0
    for n in names:
        sz = params[n].numel()
        out[n] = vec[..., off : off + sz].reshape(*vec.shape[:-1], *params[n].shape)
        off += sz
    return out


def per_input_derivatives(model, x, lik, hessians=True):
    """Per input m: h (C), J = dh/dtheta (C x P), U = diag d2h_a/dtheta^2 (C x P)."""
    names, flat = flat_params(model)
    model.eval()

    def f(theta, xm):
        return lik.flatten(functional_call(model, unflatten(model, names, theta), (xm.unsqueeze(0),)))[0]

    hs, Js, Us = [], [], []
    for m in range(x.shape[0]):
        hs.append(f(flat, x[m]))
        Js.append(jacrev(f)(flat, x[m]))
        if hessians:
            H = hessian(f)(flat, x[m])  # C x P x P
            Us.append(torch.diagonal(H, dim1=-2, dim2=-1))
    return names, torch.stack(hs), torch.stack(Js), (torch.stack(Us) if hessians else None)


# -- estimator formulas from the brute-force J (M x C x P) and U (M x C x P) ---------------------------
# Every function returns a flat (P,) vector, the MEAN over the M inputs (spec §2.3a); use split() to map it
# to parameter names.  Labels y have the likelihood's sample() layout (N, M, ...).


def exact_diag(lik, h, J):
    """(1/M) sum_m diag(J_m^T I(h_m) J_m)."""
    return torch.einsum("map,mab,mbp->p", J, lik.fisher(h), J) / h.shape[0]


def sample_scores(lik, h, J, y):
    """(N, M, P): d(-log p(y_km | x_m))/dtheta = (eta_m - t(y_km))^T J_m."""
    return torch.einsum("nma,map->nmp", lik.grad(h, y), J)


def mc1_diag(lik, h, J, y):
    """Î₁ = mean over inputs and samples of the squared per-sample scores."""
    return sample_scores(lik, h, J, y).pow(2).mean((0, 1))


def mc2_diag(lik, h, J, U, y):
    """Î₂ = exact + (1/M) sum_m (mean_k (eta_m - t(y_km)))^T U_m."""
    gbar = lik.grad(h, y).mean(0)  # (M, C) = eta - tbar
    return exact_diag(lik, h, J) + torch.einsum("ma,map->p", gbar, U) / h.shape[0]


def empirical_diag(lik, h, J, y):
    """(1/M) sum_m ((eta_m - t(y~_m))^T J_m)^2 with one observed target per input."""
    return sample_scores(lik, h, J, y.unsqueeze(0)).pow(2).mean((0, 1))


def closed_form_variances(lik, h, J, U, n_samples):
    """Var over label draws of Î₁ and Î₂ (averaged over the M inputs), spec §2.3a, §3.2, §5.

    N V₁(x_m) = M(v,v,v,v) = lik.moment4 along v = J_m[:, i];  N V₂(x_m) = u^T I(h_m) u with u = U_m[:, i];
    Var(mean over inputs) = (1/M^2) sum_m V(x_m).
    """
    m = h.shape[0]
    v1 = lik.moment4(h, J.transpose(0, 1)).sum(0) / (n_samples * m * m)
    v2 = lik.fisher_quad(h, U.transpose(0, 1)).sum(0) / (n_samples * m * m)
    return v1, v2


def frozen_batch_statistics_copy(model, *args, **kwargs):
    """An eval-mode copy of ``model`` whose BatchNorm layers in train mode (or without running statistics) hold the
    batch statistics of this forward as running statistics: the function a train-mode step is taking, with the
    statistics held constant (the definition the library follows in train mode)."""
    import copy

    from torch.nn.modules.batchnorm import _BatchNorm

    probe = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    stats = {}

    def grab(name):
        def hook(m, a):
            x = a[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            stats[name] = (x.mean(dims), x.var(dims, unbiased=False))

        return hook

    hooks = [
        m.register_forward_pre_hook(grab(n))
        for n, m in probe.named_modules()
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
    ]
    for m in probe.modules():  # dropout off, BatchNorm as it is
        if not isinstance(m, _BatchNorm):
            m.eval()
    with torch.no_grad():
        probe(*args, **kwargs)
    for hd in hooks:
        hd.remove()
    mods = dict(ref.named_modules())
    for n, (mean, var) in stats.items():
        mods[n].running_mean = mean.clone()
        mods[n].running_var = var.clone()
    return ref.eval()
