r"""Bounds on the variances of the diagonal estimators (docs/fisher-math.md §4).

Parameter-wise eigenvalue bounds (docs/fisher-math.md §4.2; reconstructions [D], provably valid), per input ``x`` and
``N`` samples, with :math:`\mathcal M = K - I\otimes I`:

.. math::  \tfrac1N \lambda^T_{\min}(\mathcal M)\|v_i\|^4 \le V_1(\theta_i|x)
           \le \tfrac1N\lambda_{\max}(\mathcal M)\|v_i\|^4,
           \qquad \tfrac1N \lambda_{\min}(I)\|u_i\|^2 \le V_2(\theta_i|x) \le \tfrac1N\lambda_{\max}(I)\|u_i\|^2.

For categorical outputs ``v`` and ``u`` are projected on :math:`\mathbb 1^\perp` (softmax is
shift-invariant), :math:`\lambda_{\min}(I)` is taken on :math:`\mathbb 1^\perp`, and the Î₁ lower bound is 0
(no useful eigenvalue lower bound exists, docs/fisher-math.md §4.2).  For factorised families the tensor lower bound
:math:`\lambda^T_{\min} \ge \max(0,\, 2\lambda_{\min}(I)^2 + \min(\min_a\kappa_{4a}/C,\ \min_a \kappa_{4a}))`
is used (exact, ``2/\sigma^4``, for the Gaussian).  Batched as :func:`~fisher_optim.fisher_variance`:
:math:`\frac{1}{M^2}\sum_m` of the per-input bounds.  Trace bounds (§4.3) are the sums over a tensor.

The Hutchinson estimators (docs/fisher-math.md §13) have a bound that needs no eigenvalue: per input,
:math:`\tilde v = 2(F_i^2 - \sum_a A_{ia}^4) \le 2F_i(x)^2`, so with ``N`` probes

.. math::  0 \le \mathrm{Var}\,\hat F^{\rm hutchinson}_i \le \frac{2}{N M^2}\sum_m F_i(x_m)^2,
           \qquad 0 \le \mathrm{Var}\,\hat F^{\rm batch}_i \le \frac{2}{N M^2}\Big(\sum_m F_i(x_m)\Big)^2,

relative standard deviation at most :math:`\sqrt{2/N}` per input, and at most :math:`\sqrt{2/N}` of the mean
Fisher for ``hutchinson_batch``, whatever the output distribution (Î₁'s is unbounded on a confident softmax).

The 2021 full-matrix Frobenius bounds (Thm 7, 8 with the derived Lemma 9) need full Jacobians/Hessians
and are meant for small models: :func:`frobenius_bounds`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from ._checks import check_estimator, check_n_samples
from .batch import OutputSpec
from .engine import Probe, reduce_records
from .hessian import residual_records
from .likelihoods import Categorical, Likelihood, get_likelihood
from .seeds import exact_records, exact_reducer, exact_sum
from .variance import unit_seeds

__all__ = ["variance_bounds", "trace_bounds", "lambda_min_moment4_tensor", "frobenius_bounds", "moment4_operator"]


def lambda_min_moment4_tensor(lik: Likelihood, h: Tensor) -> Tensor:
    r"""A valid lower bound on :math:`\min_{\|w\|=1}\mathcal M(w,w,w,w)` per input (``B``); 0 for categorical."""
    if isinstance(lik, Categorical) or not lik.factorized:
        return torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    var, k4 = lik.unit_variance(h), lik.unit_kappa4(h)
    c = h.shape[1]
    kmin = k4.amin(-1)
    k_term = torch.where(kmin >= 0, kmin / c, kmin)
    return (2 * var.amin(-1) ** 2 + k_term).clamp_min(0)


def _sqnorm_reducer(lik: Likelihood, h: Tensor, weight: Tensor, power: int):
    """Per input ``weight[b] * (sum_a x_a^2)^power`` with ``x`` projected on 1-perp for categorical (per position
    for outputs with positions: ``I(h)`` is block-diagonal, each block annihilating its own all-ones vector)."""
    project = isinstance(lik, Categorical)
    c = lik.blocks(h).shape[-1] if project else 1

    def fn(x: Tensor, idx: slice) -> Tensor:
        if project:
            xb = x.reshape(-1, c, *x.shape[1:])
            x = (xb - xb.mean(1, keepdim=True)).reshape(x.shape)
        w = weight[idx].reshape((-1,) + (1,) * (x.dim() - 2))
        return w * (x * x).sum(0) ** power

    return fn


def _hutchinson_upper(probe: Probe, batch: bool) -> dict[str, Tensor]:
    """``2 (sum_m F_i(x_m))^2`` (``batch``) or ``2 sum_m F_i(x_m)^2``: single-probe variance bounds times ``M^2``."""
    if batch:
        return {n: 2 * f * f for n, f in exact_sum(probe).items()}
    per_input = exact_reducer(probe)
    recs = exact_records(probe, list(probe.params))
    return reduce_records(recs, lambda x, idx: 2 * per_input(x, idx) ** 2, 4, probe.params)


def variance_bounds(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    estimator: str,
    n_samples: int = 1,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""``(lower, upper)`` per-parameter bounds on :func:`~fisher_optim.fisher_variance` (mean reduction).

    ``estimator``: ``"mc1"``, ``"mc2"`` (eigenvalue bounds) or ``"hutchinson"``, ``"hutchinson_batch"`` (the
    :math:`\sqrt{2/N}` relative-std bounds; lower bound 0).  Costs one exact-Fisher pass at most.
    Categorical outputs with positions: ``mc2`` only (the eigenvalues of the block-diagonal ``I(h)``); ``mc1``
    raises ``NotImplementedError`` (the 4th-moment operator of a sequence couples its positions).

    Example:
        >>> import torch
        >>> from fisher_optim import fisher_variance
        >>> from fisher_optim.bounds import variance_bounds
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(8, 3, dtype=torch.float64); net = net.double()
        >>> lo, up = variance_bounds(net, x, likelihood="poisson", estimator="mc1")
        >>> V = fisher_variance(net, x, likelihood="poisson", estimator="mc1")
        >>> all(bool((lo[n] <= V[n] * (1 + 1e-12)).all() and (V[n] <= up[n] * (1 + 1e-12)).all()) for n in V)
        True
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator, ("mc1", "mc2", "hutchinson", "hutchinson_batch"))
    n_samples = check_n_samples(n_samples)
    with Probe(model, inputs, lik, output=output) as probe:
        h = probe.h.detach()
        m = h.shape[0]
        if estimator in ("hutchinson", "hutchinson_batch"):
            up = _hutchinson_upper(probe, batch=estimator == "hutchinson_batch")
            lo = {n: torch.zeros_like(v) for n, v in up.items()}
        else:
            if estimator == "mc1":
                recs = probe.seeded(unit_seeds(h), diagonal=torch.ones_like(h))
                lo_w, up_w = lambda_min_moment4_tensor(lik, h), lik.lambda_max_moment4(h)
                power, degree = 2, 4
            else:
                recs = residual_records(probe, unit_seeds(h), per_sample=True)
                lo_w, up_w = lik.lambda_min_fisher(h).clamp_min(0), lik.lambda_max_fisher(h)
                power, degree = 1, 2
            lo = reduce_records(recs, _sqnorm_reducer(lik, h, lo_w, power), degree, probe.params)
            up = reduce_records(recs, _sqnorm_reducer(lik, h, up_w, power), degree, probe.params)
    s = 1.0 / (m * m * n_samples)
    return {n: (v * s).detach() for n, v in lo.items()}, {n: (v * s).detach() for n, v in up.items()}


def trace_bounds(lower: dict[str, Tensor], upper: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """Per parameter tensor: ``(sum_i lower_i, sum_i upper_i)`` bounding the trace of the variance (§4.3)."""
    return {n: (float(lower[n].sum()), float(upper[n].sum())) for n in lower}


def moment4_operator(lik: Likelihood, h: Tensor, n_mc: int = 0) -> tuple[Tensor, Tensor]:
    r"""``(K, I)`` for one input's output ``h`` (``C``): the 4th central moment tensor ``C^4`` and ``I(h)``.

    Categorical by exact enumeration over the ``C`` labels; factorised families from
    :math:`K = \kappa + I\otimes I + \text{2 perms}` with a diagonal cumulant tensor (docs/fisher-math.md §3.1 Lemma 5).
    """
    h = h.reshape(1, -1)
    c = h.shape[1]
    eye = torch.eye(c, dtype=h.dtype, device=h.device)
    if isinstance(lik, Categorical):
        p = torch.softmax(h, -1)[0]
        s = eye - p  # rows s_y
        K = torch.einsum("y,ya,yb,yc,yd->abcd", p, s, s, s, s)
        return K, lik.fisher(h)[0]
    var, k4 = lik.unit_variance(h)[0], lik.unit_kappa4(h)[0]
    I = torch.diag(var)
    kappa = torch.zeros(c, c, c, c, dtype=h.dtype, device=h.device)
    idx = torch.arange(c)
    kappa[idx, idx, idx, idx] = k4
    K = (
        kappa
        + torch.einsum("ab,cd->abcd", I, I)
        + torch.einsum("ac,bd->abcd", I, I)
        + torch.einsum("ad,bc->abcd", I, I)
    )
    return K, I


def frobenius_bounds(
    model: nn.Module, x: Tensor, *, likelihood: str | Likelihood, n_samples: int = 1
) -> dict[str, float]:
    r"""Soen & Sun (2021) full-matrix bounds for ONE input ``x`` (shape ``(1, ...)``), small models only.

    Returns ``thm7`` :math:`= \frac1N\|J\|_F^4 \|K - I\otimes I\|_F`, ``thm7_lemma9`` (the same with the
    derived :math:`\|K - I\otimes I\|_F \le (\sum_a\sqrt{K_{aaaa}})^2 + (\sum_a I_{aa})^2`), ``thm8``
    :math:`= \frac1N\|\partial^2 h\|_F^2\|I\|_F`, ``thm8_lemma9`` (with :math:`\|I\|_F \le \mathrm{tr}\,I`),
    and the quantities they bound, ``cov1_fro`` and ``cov2_fro`` (the Frobenius norms of the full
    ``P^4`` covariance tensors of Î₁ and Î₂, docs/fisher-math.md §3.1), computed from the full Jacobian/Hessian.
    """
    lik = get_likelihood(likelihood)
    n_samples = check_n_samples(n_samples)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(theta):
        pd, off = {}, 0
        for n in names:
            sz = params[n].numel()
            pd[n] = theta[off : off + sz].view_as(params[n])
            off += sz
        return lik.flatten(functional_call(model, pd, (x,)))[0]

    flags = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        h = f(flat).detach()
        J = jacrev(f)(flat).detach()  # C x P
        H = hessian(f)(flat).detach()  # C x P x P
    finally:
        for mod, fl in flags:
            mod.training = fl
    K, I = moment4_operator(lik, h)
    Mop = K - torch.einsum("ab,cd->abcd", I, I)
    cov1 = torch.einsum("ai,bj,ck,dl,abcd->ijkl", J, J, J, J, Mop) / n_samples
    cov2 = torch.einsum("aij,bkl,ab->ijkl", H, H, I) / n_samples
    kdiag = torch.diagonal(torch.diagonal(torch.diagonal(K, 0, 0, 1), 0, 0, 1), 0, 0, 1)
    lemma9 = kdiag.clamp_min(0).sqrt().sum() ** 2 + torch.diagonal(I).sum() ** 2
    jf = J.pow(2).sum()
    hf = H.pow(2).sum()
    return {
        "cov1_fro": float(cov1.pow(2).sum().sqrt()),
        "thm7": float(jf**2 * Mop.pow(2).sum().sqrt() / n_samples),
        "thm7_lemma9": float(jf**2 * lemma9 / n_samples),
        "cov2_fro": float(cov2.pow(2).sum().sqrt()),
        "thm8": float(hf * I.pow(2).sum().sqrt() / n_samples),
        "thm8_lemma9": float(hf * torch.diagonal(I).sum() / n_samples),
    }
