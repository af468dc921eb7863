"""Float64 references shared by the tests, obviously right and slow: brute force with torch.func, exact
enumeration over labels and outcomes, and matrices built by hand in numpy.  None calls the estimators under test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from fisher_optim.likelihoods import Bernoulli, Categorical, Gaussian, Poisson

DTYPE = torch.float64


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
    for m in probe.modules():  # dropout off, BatchNorm as it is (the flag only: eval() would recurse)
        if not isinstance(m, _BatchNorm):
            m.training = False
    with torch.no_grad():
        probe(*args, **kwargs)
    for hd in hooks:
        hd.remove()
    mods = dict(ref.named_modules())
    for n, (mean, var) in stats.items():
        mods[n].running_mean = mean.clone()
        mods[n].running_var = var.clone()
    return ref.eval()


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


# -- flat vectors, log-partitions, outcome tables and label enumeration (moved from test_variance.py) ---------
def flat(d: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


# -- log-partition functions and independent moment tables ---------------------------------------------
def log_partition(lik):
    """``F(h)`` for one output row ``h`` (``C``) in the coordinates the library uses (docs/fisher-math.md §5)."""
    if isinstance(lik, Categorical):
        return lambda h: torch.logsumexp(h, -1)
    if isinstance(lik, Bernoulli):
        return lambda h: nn.functional.softplus(h).sum()
    if isinstance(lik, Poisson):
        return lambda h: torch.exp(h).sum()
    if isinstance(lik, Gaussian):  # y ~ N(h, sigma^2): t = y / sigma^2, F = ||h||^2 / (2 sigma^2)
        return lambda h: (h * h).sum() / (2 * lik.sigma**2)
    raise TypeError(lik)


def derivative_tensors(lik, h: torch.Tensor):
    """``(I, kappa)`` = 2nd and 4th derivative tensors of ``F`` at one row ``h`` (autograd, C^2 and C^4)."""
    F = log_partition(lik)
    return hessian(F)(h), hessian(hessian(F))(h)


def outcome_table(lik, h: torch.Tensor):
    """All outcomes of one draw at output row ``h`` (``C``): ``(probabilities (L,), t(y) (L, C))``.

    Categorical and Bernoulli: every label; Poisson: every count vector up to ``lambda + 12 sqrt(lambda) + 30``
    per unit (truncated series; the tail is below 1e-25); Gaussian: a Gauss-Hermite product rule (exact for
    the polynomial moments up to degree 9).  Probabilities come from ``exp(-lik.nll)``.
    """
    c = h.shape[0]
    if isinstance(lik, Categorical):
        ys = torch.arange(c)
        probs = torch.exp(-lik.nll(h.expand(c, c), ys))
        return probs, lik.sufficient(ys, h)
    if isinstance(lik, (Bernoulli, Poisson)):
        if isinstance(lik, Bernoulli):
            grids = [range(2)] * c
        else:
            grids = [range(int(lam + 12 * lam**0.5 + 30)) for lam in torch.exp(h).tolist()]
        ys = torch.tensor(list(itertools.product(*grids)), dtype=DTYPE)
        assert len(ys) <= 300_000, "outcome table too large: use smaller rates"
        logp = -lik.nll(h.expand(len(ys), c), ys)
        if isinstance(lik, Poisson):
            logp = logp - torch.lgamma(ys + 1).sum(-1)
        return torch.exp(logp), ys
    if isinstance(lik, Gaussian):
        z, w = np.polynomial.hermite_e.hermegauss(5)
        z, w = torch.tensor(z, dtype=DTYPE), torch.tensor(w / math.sqrt(2 * math.pi), dtype=DTYPE)
        zs = torch.tensor(list(itertools.product(range(len(z)), repeat=c)))
        ys = h + lik.sigma * z[zs]
        return w[zs].prod(-1), ys / lik.sigma**2
    raise TypeError(lik)


def central_moments(lik, h: torch.Tensor):
    """``(eta, I, K)`` of ``t(y)`` at one row ``h``, from :func:`outcome_table` (no formula of the library).

    Poisson with several units: the units are independent by definition (the NLL is a sum over units), so
    ``K`` is assembled from the 1-D tables: ``E[s_a s_b s_c s_d]`` is ``m4_a`` when all four indices are equal,
    ``m2_a m2_c`` for two distinct pairs, and 0 otherwise (keeps the tables small at large rates).
    """
    c = h.shape[0]
    if isinstance(lik, Poisson) and c > 1:
        units = [central_moments(lik, h[a : a + 1]) for a in range(c)]
        eta = torch.cat([u[0] for u in units])
        m2 = torch.stack([u[1].reshape(()) for u in units])
        m4 = torch.stack([u[2].reshape(()) for u in units])
        I = torch.diag(m2)
        K = torch.einsum("ab,cd->abcd", I, I) + torch.einsum("ac,bd->abcd", I, I) + torch.einsum("ad,bc->abcd", I, I)
        idx = torch.arange(c)
        K[idx, idx, idx, idx] = m4
        return eta, I, K
    probs, t = outcome_table(lik, h)
    eta = probs @ t
    s = t - eta
    return eta, torch.einsum("y,ya,yb->ab", probs, s, s), torch.einsum("y,ya,yb,yc,yd->abcd", probs, s, s, s, s)


def label_space(lik, c: int) -> torch.Tensor:
    """Every label of one draw at one input: class indices (categorical) or {0,1}^C vectors (Bernoulli)."""
    if isinstance(lik, Categorical):
        return torch.arange(c)
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=c)), dtype=DTYPE)


def enumerate_draws(lik, h: torch.Tensor, n_samples: int):
    """Every joint draw of ``N`` labels at each of the ``M`` inputs: ``(labels (T, N, M, ...), prob (T,))``."""
    m, c = h.shape
    space = label_space(lik, c)
    L = space.shape[0]
    # log-probability of label l at input m, from the likelihood's own nll (no constants for these two)
    logq = torch.stack([-lik.nll(h, space[l].expand(m, *space.shape[1:])) for l in range(L)], 1)  # (M, L)
    idx = torch.tensor(list(itertools.product(range(L), repeat=n_samples * m))).reshape(-1, n_samples, m)
    logp = logq[torch.arange(m), idx].sum((1, 2))
    return space[idx], torch.exp(logp)


def estimators_per_draw(lik, h, J, U, labels):
    """Î₁ and Î₂ (flat, mean over inputs) for every draw ``labels`` (T, N, M, ...): two ``(T, P)`` tensors."""
    t, n, m = labels.shape[:3]
    scores = sample_scores(lik, h, J, labels.reshape(t * n, *labels.shape[2:]))  # (T*N, M, P)
    i1 = scores.pow(2).reshape(t, n, m, -1).mean((1, 2))
    gbar = lik.grad(h, labels).mean(1)  # (T, M, C) = eta - tbar
    i2 = exact_diag(lik, h, J) + torch.einsum("tma,map->tp", gbar, U) / m
    return i1, i2


def exact_moments(values: torch.Tensor, probs: torch.Tensor):
    mean = probs @ values
    return mean, probs @ (values - mean) ** 2
