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
# Every function returns a flat (P,) vector, the MEAN over the M inputs (docs/fisher-math.md §2.3a); use split() to
# map it to parameter names.  Labels y have the likelihood's sample() layout (N, M, ...).


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
    """Var over label draws of Î₁ and Î₂ (averaged over the M inputs), docs/fisher-math.md §2.3a, §3.2, §5.

    N V₁(x_m) = M(v,v,v,v) = lik.moment4 along v = J_m[:, i];  N V₂(x_m) = u^T I(h_m) u with u = U_m[:, i];
    Var(mean over inputs) = (1/M^2) sum_m V(x_m).
    """
    m = h.shape[0]
    v1 = lik.moment4(h, J.transpose(0, 1)).sum(0) / (n_samples * m * m)
    v2 = lik.fisher_quad(h, U.transpose(0, 1)).sum(0) / (n_samples * m * m)
    return v1, v2


# -- output-space Fisher matrices by hand (numpy, no fisher_optim code) -----------------------------------
def output_fisher_numpy(name: str, h, sigma: float = 1.0):
    """``I(h) = Cov(t)`` per input, ``(B, C, C)`` numpy float64, written from each family's mean parameter.

    categorical: ``diag(p) - p pᵀ`` with ``p = softmax(h)`` (docs/fisher-math.md §5.3); bernoulli:
    ``diag(p(1-p))`` with ``p = sigmoid(h)`` (§5.4); gaussian: ``I / sigma²`` (§5.5); poisson: ``diag(exp h)`` (§5.6).
    """
    import numpy as np

    h = np.asarray(h, dtype=np.float64)
    if name == "categorical":
        z = np.exp(h - h.max(-1, keepdims=True))
        p = z / z.sum(-1, keepdims=True)
        return np.einsum("bc,cd->bcd", p, np.eye(h.shape[-1])) - p[:, :, None] * p[:, None, :]
    if name == "bernoulli":
        d = 1.0 / (1.0 + np.exp(-h))
        d = d * (1.0 - d)
    elif name == "gaussian":
        d = np.full_like(h, 1.0 / sigma**2)
    elif name == "poisson":
        d = np.exp(h)
    else:
        raise ValueError(name)
    return np.einsum("bc,cd->bcd", d, np.eye(h.shape[-1]))


def output_fisher_eigenvalues_numpy(name: str, h, sigma: float = 1.0):
    """``(lambda_max, lambda_min)`` of :func:`output_fisher_numpy` by ``numpy.linalg.eigvalsh``.

    For categorical outputs ``I 1 = 0`` always, so ``lambda_min`` is taken on the complement of ``1``: the
    eigenvalues of ``Qᵀ I Q`` with ``Q`` an orthonormal basis of ``1``-perp (Helmert-style, built by hand).
    """
    import numpy as np

    I = output_fisher_numpy(name, h, sigma)
    ev = np.linalg.eigvalsh(I)
    if name != "categorical":
        return ev[:, -1], ev[:, 0]
    c = I.shape[-1]
    Q = np.zeros((c, c - 1))
    for k in range(1, c):  # k-th Helmert column: (1, ..., 1, -k, 0, ...) / sqrt(k (k + 1))
        Q[:k, k - 1] = 1.0
        Q[k, k - 1] = -float(k)
        Q[:, k - 1] /= np.sqrt(k * (k + 1))
    restricted = np.linalg.eigvalsh(np.einsum("ca,mcd,de->mae", Q, I, Q))
    return ev[:, -1], restricted[:, 0]
