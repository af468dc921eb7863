"""Likelihood pieces against autograd of the log-partition and exact enumeration
(docs/fisher-math.md §1, §3, §5, §7.2, §10 items 6-7).

Each family is written here once more, independently, by its log-partition ``A(h)`` and sufficient statistic
``t(y)``: the mean is ``grad A``, the Fisher ``hess A``, the fourth cumulant along ``v`` the fourth directional
derivative of ``A``.  Moments over labels come from enumerating every outcome (categorical, Bernoulli) or a
truncated Poisson series, never from sampling.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DTYPE, LIKELIHOOD_NAMES, gen, make_likelihood
from reference import output_fisher_eigenvalues_numpy
from torch.func import hessian, jacrev, jvp

from fisher_optim.likelihoods import LIKELIHOODS, Bernoulli, Categorical, Gaussian, Poisson, get_likelihood

pytestmark = pytest.mark.usefixtures("single_thread")

B, C = 3, 4
ALL = [*LIKELIHOOD_NAMES, "gaussian-sigma1"]


def lik_of(name):
    return Gaussian() if name == "gaussian-sigma1" else make_likelihood(name)


def log_partition(lik, h):
    """A(h) for one input (C,), written independently of fisher_optim."""
    if isinstance(lik, Categorical):
        return torch.logsumexp(h, -1)
    if isinstance(lik, Bernoulli):
        return torch.nn.functional.softplus(h).sum(-1)
    if isinstance(lik, Gaussian):
        return (h * h).sum(-1) / (2 * lik.sigma**2)
    return torch.exp(h).sum(-1)


def suff(lik, y):
    """t(y) such that log p(y|h) = t(y)^T h - A(h) + const."""
    if isinstance(lik, Categorical):
        return torch.nn.functional.one_hot(y, C).to(DTYPE)
    if isinstance(lik, Gaussian):
        return y / lik.sigma**2
    return y


def outputs(seed=0, scale=1.0):
    return scale * torch.randn(B, C, generator=gen(seed), dtype=DTYPE)


def directions(seed=1, k=5):
    return torch.randn(C, B, k, generator=gen(seed), dtype=DTYPE)


def kappa4(lik, h, v):
    """Fourth directional derivative of A at h along v (h: (C,), v: (C,))."""

    def d(f):
        return lambda s: jvp(f, (s,), (torch.ones_like(s),))[1]

    def line(s):
        return log_partition(lik, h + s * v)

    return d(d(d(d(line))))(torch.zeros((), dtype=DTYPE))


def outcomes(lik, h):
    """All outcomes y (stacked) and their probabilities for one input h (C,), exact or truncated."""
    if isinstance(lik, Categorical):
        return torch.arange(C), torch.softmax(h, -1)
    if isinstance(lik, Bernoulli):
        ys = torch.tensor(list(itertools.product([0.0, 1.0], repeat=C)), dtype=DTYPE)
        p = torch.sigmoid(h)
        return ys, (ys * p + (1 - ys) * (1 - p)).prod(-1)
    if isinstance(lik, Poisson):
        lam, kmax = torch.exp(h), 60
        ks = torch.arange(kmax, dtype=DTYPE)
        pmf = torch.exp(ks[:, None] * h - lam - torch.lgamma(ks + 1)[:, None])  # (kmax, C)
        grid = torch.cartesian_prod(*[ks] * h.shape[0]).reshape(-1, h.shape[0])
        probs = torch.stack([pmf[grid[:, a].long(), a] for a in range(h.shape[0])], -1).prod(-1)
        return grid, probs
    raise TypeError(lik)


# -- Fisher, factors, means, gradients ------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_fisher_factor_squares_to_fisher(name):
    lik = lik_of(name)
    for seed in range(3):
        h = outputs(seed, scale=2.0)
        S = lik.fisher_factor(h)
        assert S.shape[:2] == (B, C)
        torch.testing.assert_close(S @ S.transpose(-1, -2), lik.fisher(h), rtol=1e-12, atol=1e-15)


def test_categorical_factor_is_backpack_factor():
    """S = diag(sqrt p) - p sqrt(p)^T (docs/fisher-math.md §7.2), not symmetric, and S S^T = diag(p) - p p^T."""
    h = outputs(4, scale=2.0)
    p = torch.softmax(h, -1)
    S = Categorical().fisher_factor(h)
    torch.testing.assert_close(S, torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :])
    torch.testing.assert_close(S @ S.transpose(-1, -2), torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    assert not torch.allclose(S, S.transpose(-1, -2))


@pytest.mark.parametrize("name", ALL)
def test_mean_and_fisher_are_derivatives_of_the_log_partition(name):
    lik = lik_of(name)
    h = outputs(5, scale=1.5)
    for m in range(B):
        torch.testing.assert_close(lik.mean(h)[m], jacrev(lambda x: log_partition(lik, x))(h[m]), rtol=1e-12, atol=0)
        hess = hessian(lambda x: log_partition(lik, x))(h[m])
        torch.testing.assert_close(lik.fisher(h)[m], hess, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lik.unit_variance(h), torch.diagonal(lik.fisher(h), dim1=-2, dim2=-1))


@pytest.mark.parametrize("name", ALL)
def test_grad_and_nll_are_the_exponential_family(name):
    """grad(h, y) = d nll/dh = eta - t(y), and nll(h, y) = A(h) - t(y)^T h + c(y) (c independent of h)."""
    lik = lik_of(name)
    h, h2 = outputs(6), outputs(7)
    y = lik.sample(h, 2, generator=gen(8))
    for k in range(2):
        auto = jacrev(lambda x, k=k: lik.nll(x, y[k]).sum())(h)
        torch.testing.assert_close(lik.grad(h, y[k]), auto, rtol=1e-12, atol=1e-14)
        t = suff(lik, y[k])
        diff = lik.nll(h, y[k]) - lik.nll(h2, y[k])
        expected = torch.stack([log_partition(lik, h[m]) - log_partition(lik, h2[m]) for m in range(B)])
        torch.testing.assert_close(diff, expected - (t * (h - h2)).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lik.grad(h, y), torch.stack([lik.grad(h, y[k]) for k in range(2)]))


@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_probabilities_sum_to_one(name):
    lik = make_likelihood(name)
    h = outputs(9, scale=2.0)
    for m in range(B):
        ys, probs = outcomes(lik, h[m])
        nll = torch.stack([lik.nll(h[m : m + 1], y.unsqueeze(0))[0] for y in ys])
        torch.testing.assert_close(torch.exp(-nll), probs, rtol=1e-12, atol=0)
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=DTYPE), rtol=1e-13, atol=0)


# -- second and fourth moments ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_fisher_quad(name):
    lik = lik_of(name)
    h, v = outputs(10, scale=1.5), directions(11)
    expected = torch.einsum("abk,bac,cbk->bk", v, lik.fisher(h), v)
    torch.testing.assert_close(lik.fisher_quad(h, v), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ALL)
def test_moment4_is_fourth_cumulant_plus_twice_fisher_squared(name):
    """moment4 = kappa(v,v,v,v) + 2 (v^T I v)^2 with kappa the 4th directional derivative of A
    (docs/fisher-math.md §3.2)."""
    lik = lik_of(name)
    h, v = outputs(12, scale=1.5), directions(13)
    got = lik.moment4(h, v)
    quad = lik.fisher_quad(h, v)
    for m in range(B):
        for k in range(v.shape[-1]):
            expected = kappa4(lik, h[m], v[:, m, k]) + 2 * quad[m, k] ** 2
            torch.testing.assert_close(got[m, k], expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["categorical", "bernoulli", "poisson"])
def test_moments_by_enumeration(name):
    """Over all outcomes: E[t] = eta, Cov(t) = I, and Var((v^T(t-eta))^2) = moment4
    (docs/fisher-math.md §3.2, §10 item 1)."""
    lik = make_likelihood(name)
    c = 2 if name == "poisson" else C  # truncated Poisson series: 60^2 outcomes
    h = outputs(14, scale=1.0)[:, :c]
    v = directions(15)[:c]
    for m in range(B):
        ys, probs = outcomes(lik, h[m])
        t = suff(lik, ys) if name != "categorical" else torch.eye(c, dtype=DTYPE)[ys]
        eta = probs @ t
        torch.testing.assert_close(eta, lik.mean(h)[m], rtol=1e-12, atol=1e-14)
        s = t - eta
        torch.testing.assert_close(s.T @ (probs[:, None] * s), lik.fisher(h)[m], rtol=1e-12, atol=1e-14)
        S = s @ v[:, m]  # (outcomes, K): the directional score
        var = probs @ S**4 - (probs @ S**2) ** 2
        torch.testing.assert_close(lik.moment4(h, v)[m], var, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(probs @ S**2, lik.fisher_quad(h, v)[m], rtol=1e-12, atol=1e-14)


def test_gaussian_fourth_moment_is_twice_fisher_squared():
    for sigma in (0.5, 1.0, 3.0):
        lik = Gaussian(sigma=sigma)
        h, v = outputs(16), directions(17)
        torch.testing.assert_close(lik.moment4(h, v), 2 * lik.fisher_quad(h, v) ** 2, rtol=1e-13, atol=0)
        torch.testing.assert_close(lik.fisher_quad(h, v), (v * v).sum(0) / sigma**2, rtol=1e-13, atol=0)


@pytest.mark.parametrize("h0", [-3.0, -0.7, 0.0, 0.4, 2.5])
def test_one_dimensional_table(h0):
    """Spec §5.1: I and K - I^2 (= N V1 / v^4 in 1-D) for Bernoulli, Normal (sigma=1) and Poisson."""
    h = torch.tensor([[h0]], dtype=DTYPE)
    one = torch.ones(1, 1, 1, dtype=DTYPE)
    p, lam = 1 / (1 + math.exp(-h0)), math.exp(h0)
    rows = {
        Bernoulli(): (p * (1 - p), p * (1 - p) * (1 - 2 * p) ** 2, p * (1 - p) * (6 * p * p - 6 * p + 1)),
        Gaussian(): (1.0, 2.0, 0.0),
        Poisson(): (lam, lam + 2 * lam * lam, lam),
    }
    for lik, (fisher, m4, k4) in rows.items():
        assert lik.fisher_quad(h, one).item() == pytest.approx(fisher, rel=1e-13)
        assert lik.moment4(h, one).item() == pytest.approx(m4, rel=1e-10, abs=1e-16)
        assert lik.unit_kappa4(h).item() == pytest.approx(k4, rel=1e-12, abs=1e-16)
        assert kappa4(lik, h[0], one[:, 0, 0]).item() == pytest.approx(k4, rel=1e-8, abs=1e-12)


def test_bernoulli_at_half_has_zero_fourth_moment_in_one_dimension():
    h = torch.zeros(1, 1, dtype=DTYPE)
    assert Bernoulli().moment4(h, torch.ones(1, 1, 1, dtype=DTYPE)).item() == 0.0


# -- eigenvalues used by the bounds ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_lambda_max_moment4_is_the_pair_matrix_eigenvalue(name):
    """lambda_max of M = Cov(s_a s_b, s_c s_d) as a C^2 x C^2 matrix, built by enumeration
    (docs/fisher-math.md §4.2)."""
    lik = make_likelihood(name)
    h = outputs(18, scale=1.5)
    got = lik.lambda_max_moment4(h)
    for m in range(B):
        ys, probs = outcomes(lik, h[m])
        t = suff(lik, ys) if name != "categorical" else torch.eye(C, dtype=DTYPE)[ys]
        s = t - probs @ t
        pairs = (s[:, :, None] * s[:, None, :]).reshape(len(probs), -1)
        centred = pairs - probs @ pairs
        cov = centred.T @ (probs[:, None] * centred)
        torch.testing.assert_close(got[m], torch.linalg.eigvalsh(cov).max(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_fisher_eigenvalues(name):
    """lambda_max / lambda_min of I(h) against numpy.linalg.eigvalsh of the matrix built by hand from the family's
    mean parameter (softmax probabilities, sigmoid, exp, 1/sigma²), not from ``lik.fisher``."""
    lik = lik_of(name)
    h = outputs(19, scale=1.5)
    family = "gaussian" if name.startswith("gaussian") else name
    lam_max, lam_min = output_fisher_eigenvalues_numpy(family, h.numpy(), sigma=getattr(lik, "sigma", 1.0))
    torch.testing.assert_close(lik.lambda_max_fisher(h), torch.from_numpy(lam_max), rtol=1e-12, atol=1e-15)
    # categorical: I 1 = 0 always, so the smallest eigenvalue is taken on the complement of 1
    torch.testing.assert_close(lik.lambda_min_fisher(h), torch.from_numpy(lam_min), rtol=1e-10, atol=1e-15)


def test_categorical_fisher_eigenvalues_two_classes_closed_form():
    """C = 2: I = p₁p₂ [[1, -1], [-1, 1]], eigenvalues 0 and 2 p₁ p₂; on 1-perp only 2 p₁ p₂ remains."""
    h = 3.0 * torch.randn(20, 2, generator=gen(23), dtype=DTYPE)
    p1 = 1.0 / (1.0 + torch.exp(h[:, 1] - h[:, 0]))  # softmax of two logits, written out
    expected = 2 * p1 * (1 - p1)
    torch.testing.assert_close(Categorical().lambda_max_fisher(h), expected, rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(Categorical().lambda_min_fisher(h), expected, rtol=1e-10, atol=1e-16)


# -- sampling ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_sample_layout_and_reproducibility(name):
    lik = lik_of(name)
    h = outputs(20)
    y = lik.sample(h, 5, generator=gen(3))
    assert y.shape == ((5, B) if name == "categorical" else (5, B, C))
    assert torch.equal(y, lik.sample(h, 5, generator=gen(3)))
    assert not torch.equal(y, lik.sample(h, 5, generator=gen(4)))
    lik.check_targets(h, y[0])  # one draw per input is a valid target


@pytest.mark.parametrize("name", ALL)
def test_sample_mean_within_error_bars(name):
    """Mean of t(y) over n draws is eta within 5 standard errors sqrt(diag I / n)."""
    lik = lik_of(name)
    h = outputs(21)
    n = 4000
    y = lik.sample(h, n, generator=gen(5))
    t = suff(lik, y)
    err = (t.mean(0) - lik.mean(h)).abs()
    bound = 5 * (lik.unit_variance(h) / n).sqrt()
    assert bool((err <= bound).all()), (err / bound).max()


def test_get_likelihood():
    for name, cls in LIKELIHOODS.items():
        assert type(get_likelihood(name)) is cls
    lik = Gaussian(sigma=0.3)
    assert get_likelihood(lik) is lik
    assert repr(lik) == "Gaussian(sigma=0.3)"
