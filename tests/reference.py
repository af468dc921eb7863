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
