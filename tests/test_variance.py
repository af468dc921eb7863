"""Closed-form variances of the diagonal estimators
(docs/fisher-math.md §2.3, §3, §5, §8; §10 items 1, 2, 3, 5, 7, 11, 12).

What is checked against what (every expected value is computed here from first principles):

* ``fisher_variance`` against the exact variance over ALL label draws (enumeration of every joint label tuple
  of every input, weighted by its probability), the estimators evaluated from the brute-force ``J``/``U`` of
  ``tests/reference.py``: rtol 1e-10, per parameter, M = 1 and 3 inputs, N = 1 and 2 labels (item 1);
* the same against the "generic hook" of docs/fisher-math.md §3.2, ``N V₁ = D⁴F[v⁴] + 2 (D²F[v²])²`` and
  ``N V₂ = D²F[u²]``, with the log-partition ``F`` differentiated by autograd, for all four likelihoods and
  the Linear / Conv2d / unfold / ``torch.func`` routes (item 7);
* against repeated ``diagonal_fisher`` calls: sample mean within ``z sqrt(V/R)`` and sample variance within
  ``z sqrt((m4 - s^4)/R)``, z = 5 Bonferroni (items 2, 3);
* the Gaussian law ``N Î₁/F ~ chi²_N`` and ``Î₂ - F ~ N(0, ||u||²/(N sigma²))`` (item 5);
* the fourth-moment tensor ``K`` (enumeration, truncated series or Gauss-Hermite quadrature) against
  ``kappa + I⊗I + 2 perms`` with ``kappa`` the autograd 4th derivative of ``F``, and the 1-D rows of §5.1
  (item 7);
* ``joint_variance`` against enumeration over (input, labels) pairs of a uniform ``p(x)`` (item 11);
* the empirical Fisher's mean and bias under the model distribution and under another one (item 12, §8).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import DTYPE, LIKELIHOOD_NAMES, gen, init_, inputs, make_likelihood, mlp, reference_case
from reference import (
    central_moments,
    derivative_tensors,
    enumerate_draws,
    estimators_per_draw,
    exact_moments,
    flat,
    label_space,
    log_partition,
    outcome_table,
    per_input_derivatives,
)
from torch import nn

from fisher_optim import diagonal_fisher, fisher_moments, fisher_variance, joint_variance, layer_summary
from fisher_optim.bounds import moment4_operator
from fisher_optim.likelihoods import Bernoulli, Categorical, Gaussian, Poisson

Z = 5.0  # z-score of the Monte-Carlo checks (Bonferroni: false alarm ~ P * 5.7e-7 per test)


# -- models ---------------------------------------------------------------------------------------------
def tiny_mlp(classes: int = 3, act: str = "sigmoid", seed: int = 0) -> nn.Module:
    """Sigmoid/tanh MLP 4-5-3-C (float64)."""
    return mlp(act, widths=(4, 5, 3, classes), seed=seed)


def tiny_cnn(classes: int = 3, seed: int = 0) -> nn.Module:
    """Conv2d(1, 2, 3, padding 1)-Sigmoid-AvgPool2d(2)-Flatten-Linear(8, C) on (B, 1, 4, 4) inputs.

    Small enough for the exact HVP route of Î₂ (20 convolution parameters).
    """
    return init_(
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, classes)
        ),
        seed,
        weight_scale=3.0,
    )


def layernorm_mlp(seed: int = 0) -> nn.Module:
    """Linear-LayerNorm-Tanh-Linear: the LayerNorm parameters take the general ``torch.func`` route."""
    return init_(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)), seed)


TINY = {
    "mlp-sigmoid": (lambda c=3: tiny_mlp(c, "sigmoid"), (4,)),
    "mlp-tanh": (lambda c=3: tiny_mlp(c, "tanh", seed=1), (4,)),
    "cnn-sigmoid": (tiny_cnn, (1, 4, 4)),
}


def tiny_case(name: str, batch: int, classes: int = 3, seed: int = 1):
    factory, shape = TINY[name]
    return factory(classes), inputs((batch, *shape), seed=seed)


def assert_flat_close(actual: dict, expected: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0):
    """``actual`` (a per-parameter dict) equals the flat vector ``expected`` entry-wise."""
    a = flat(actual)
    assert a.shape == expected.shape
    torch.testing.assert_close(a, expected, rtol=rtol, atol=atol)


def random_rows(lik_name: str, b: int, c: int, seed: int) -> torch.Tensor:
    """Output rows ``h`` in a range where every family is well-conditioned (Poisson rates up to e)."""
    h = torch.randn(b, c, generator=gen(seed), dtype=DTYPE)
    return h.clamp(-1, 1) if lik_name == "poisson" else 1.5 * h


# =========================================================================================================
# item 1: exact enumeration over all label tuples
ENUMERATION_CASES = [
    ("mlp-sigmoid", "categorical", 2),
    ("mlp-sigmoid", "categorical", 3),
    ("mlp-tanh", "categorical", 4),
    ("cnn-sigmoid", "categorical", 3),
    ("mlp-sigmoid", "bernoulli", 2),
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model_name,lik_name,classes", ENUMERATION_CASES)
def test_variance_equals_enumeration(model_name, lik_name, classes, batch):
    """Var over all C^(N M) joint label draws of Î₁, Î₂ == fisher_variance, rtol 1e-10 per parameter."""
    model, x = tiny_case(model_name, batch, classes)
    lik = make_likelihood(lik_name)
    names, h, J, U = per_input_derivatives(model, x, lik)
    F = flat(diagonal_fisher(model, x, likelihood=lik, estimator="exact"))
    for n_samples in (1, 2):
        labels, probs = enumerate_draws(lik, h, n_samples)
        assert len(probs) == len(label_space(lik, classes)) ** (n_samples * batch)
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=DTYPE), rtol=1e-13, atol=0)
        for estimator, values in zip(("mc1", "mc2"), estimators_per_draw(lik, h, J, U, labels)):
            mean, var = exact_moments(values, probs)
            torch.testing.assert_close(mean, F, rtol=1e-10, atol=1e-14 * float(F.abs().max()))
            V = fisher_variance(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples)
            assert list(V) == names and all(V[k].shape == p.shape for k, p in model.named_parameters())
            # per parameter: rtol 1e-10, plus the rounding floor of a variance computed from values of size
            # |Î_i| (both sides cancel terms of that size: sum p d⁴ - (sum p d²)², sum p (Î - mean)²)
            floor = 1e-13 * values.abs().amax(0) ** 2
            err = (flat(V) - var).abs()
            assert bool((err <= 1e-10 * var + floor).all()), float((err / (1e-10 * var + floor)).max())
            # mc2 is exact on the last layer only (V = 0 there, exactly); mc1 is random everywhere
            zeros = [n for n, v in V.items() if bool((v == 0).any())]
            assert zeros == (names[-2:] if estimator == "mc2" else [])
            assert all(bool((V[n] == 0).all()) for n in zeros)


@pytest.mark.parametrize("model_name,estimators", [("mlp-sigmoid", ("mc1", "mc2")), ("cnn-sigmoid", ("mc1",))])
def test_variance_scaling_in_inputs_and_samples(model_name, estimators):
    """(1/M²) sum_m V(x_m) for the mean, sum_m V(x_m) for reduction="sum", and V ∝ 1/N (CNN mc2: covered by
    the enumeration test at M = 1 and 3)."""
    model, x = tiny_case(model_name, 3)
    lik = Categorical()
    for estimator in estimators:
        batch = fisher_variance(model, x, likelihood=lik, estimator=estimator)
        singles = [fisher_variance(model, x[m : m + 1], likelihood=lik, estimator=estimator) for m in range(3)]
        total = {n: sum(s[n] for s in singles) for n in batch}
        assert_flat_close(batch, flat(total) / 9, rtol=1e-12)
        summed = fisher_variance(model, x, likelihood=lik, estimator=estimator, reduction="sum")
        assert_flat_close(summed, flat(total), rtol=1e-12)
        five = fisher_variance(model, x, likelihood=lik, estimator=estimator, n_samples=5)
        assert_flat_close(five, flat(batch) / 5, rtol=1e-12)


# =========================================================================================================
# item 7 (applied to models): the generic hook N V₁ = D⁴F[v⁴] + 2 (D²F[v²])², N V₂ = D²F[u²]
def hook_variances(lik, h, J, U, n_samples: int):
    """Flat ``(V₁, V₂)`` of the mean over M inputs from autograd derivatives of ``F`` (no likelihood formula)."""
    m = h.shape[0]
    v1 = torch.zeros(J.shape[-1], dtype=DTYPE)
    v2 = torch.zeros(J.shape[-1], dtype=DTYPE)
    for i in range(m):
        I, kappa = derivative_tensors(lik, h[i])
        quad = torch.einsum("ap,ab,bp->p", J[i], I, J[i])
        v1 += torch.einsum("abcd,ap,bp,cp,dp->p", kappa, J[i], J[i], J[i], J[i]) + 2 * quad**2
        if U is not None:
            v2 += torch.einsum("ap,ab,bp->p", U[i], I, U[i])
    return v1 / (n_samples * m * m), v2 / (n_samples * m * m)


HOOK_MODELS = {
    "mlp-sigmoid": lambda: tiny_case("mlp-sigmoid", 3),
    "cnn-sigmoid": lambda: tiny_case("cnn-sigmoid", 2),
    "token-linear": lambda: reference_case("token-linear", 3)[:2],  # Linear on (B, T, d): unfold record
    "layernorm": lambda: (layernorm_mlp(), inputs((3, 3), seed=2)),  # torch.func route (mc1 only)
}


@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("model_name", list(HOOK_MODELS))
def test_variance_equals_cumulant_hook(model_name, lik_name):
    model, x = HOOK_MODELS[model_name]()
    lik = make_likelihood(lik_name)
    with_hessians = model_name != "layernorm"
    names, h, J, U = per_input_derivatives(model, x, lik, hessians=with_hessians)
    v1, v2 = hook_variances(lik, h, J, U, n_samples=2)
    assert_flat_close(fisher_variance(model, x, likelihood=lik, estimator="mc1", n_samples=2), v1, rtol=1e-10)
    if with_hessians:
        assert_flat_close(fisher_variance(model, x, likelihood=lik, estimator="mc2", n_samples=2), v2, rtol=1e-10)
        # fisher_moments: sums over inputs of F, F², ṽ₁, ṽ₂ (single-sample, no 1/M)
        mom = fisher_moments(model, x, likelihood=lik, with_fisher_sq=True)
        m = x.shape[0]
        Fm = torch.einsum("map,mab,mbp->mp", J, lik.fisher(h), J)
        assert mom.m == m
        assert_flat_close(mom.fisher, Fm.sum(0), rtol=1e-10)
        assert_flat_close(mom.fisher_sq, (Fm**2).sum(0), rtol=1e-10)
        assert_flat_close(mom.v1, v1 * 2 * m * m, rtol=1e-10)
        assert_flat_close(mom.v2, v2 * 2 * m * m, rtol=1e-10)
    else:
        with pytest.raises(ValueError, match="LayerNorm"):
            fisher_variance(model, x, likelihood=lik, estimator="mc2")


# =========================================================================================================
# items 2, 3: Monte Carlo with error bars from the closed form (mean) and the 4th moment (variance)
def monte_carlo_check(model, x, lik, estimator, n_samples, reps, seed):
    """R calls of diagonal_fisher; returns (|mean - F| / bound, |s² - V| / bound) maxima and the draws."""
    F = flat(diagonal_fisher(model, x, likelihood=lik, estimator="exact"))
    V = flat(fisher_variance(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples))
    g = gen(seed)
    draws = torch.stack(
        [
            flat(diagonal_fisher(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples, generator=g))
            for _ in range(reps)
        ]
    )
    zero = V <= 1e-28 * V.max()
    # zero variance (mc2 on the last layer): every draw is exact
    torch.testing.assert_close(draws[:, zero], F[zero].expand(reps, -1), rtol=1e-12, atol=1e-14 * float(F.max()))
    d = draws[:, ~zero]
    mean_ratio = (d.mean(0) - F[~zero]).abs() / (Z * (V[~zero] / reps).sqrt())
    c = d - d.mean(0)
    s2 = (c**2).sum(0) / (reps - 1)
    m4 = (c**4).mean(0)
    var_bound = Z * ((m4 - s2**2).clamp_min(0) / reps).sqrt()
    return (mean_ratio.max(), ((s2 - V[~zero]).abs() / var_bound).max(), s2, V[~zero], var_bound, zero)


@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("lik_name", ["bernoulli", "poisson"])
def test_monte_carlo_mean_and_variance(lik_name, estimator):
    """R = 600 draws: mean within 5 sigma (closed-form V), s² within 5 sqrt((m4 - s⁴)/R) of V."""
    model, x = tiny_case("mlp-sigmoid", 2)
    lik = make_likelihood(lik_name)
    mean_ratio, var_ratio, s2, V, bound, zero = monte_carlo_check(model, x, lik, estimator, 1, 600, seed=3)
    assert mean_ratio <= 1 and var_ratio <= 1, (mean_ratio, var_ratio)
    assert int(zero.sum()) == (12 if estimator == "mc2" else 0)  # last layer 3x3 + 3
    # the check has power: a variance off by the factor 2 of a wrong N (or of the sum-vs-mean slip) fails it
    assert bool(((s2 - 2 * V).abs() > bound).any()) and bool(((s2 - V / 2).abs() > bound).any())


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("model_name,reps", [("mlp-tanh", 10000), ("cnn-sigmoid", 4000)])
def test_monte_carlo_mean_and_variance_heavy(model_name, reps, lik_name, estimator):
    """R draws with N = 2 and M = 2 on the MLP and the CNN: the same checks, and power against a V without 1/N."""
    model, x = tiny_case(model_name, 2)
    lik = make_likelihood(lik_name)
    mean_ratio, var_ratio, s2, V, bound, _ = monte_carlo_check(model, x, lik, estimator, 2, reps, seed=5)
    assert mean_ratio <= 1 and var_ratio <= 1, (mean_ratio, var_ratio)
    assert bool(((s2 - 2 * V).abs() > bound).any())


# =========================================================================================================
# item 5: the Gaussian exact law
@pytest.mark.parametrize("model_name", ["mlp-sigmoid", "cnn-sigmoid"])
def test_gaussian_closed_form(model_name):
    """Gaussian(sigma=0.7): V₁ = 2F²/N per parameter (M = 1), and V₂ = ||u||²/(N sigma²), exactly."""
    lik = Gaussian(sigma=0.7)
    model, x = tiny_case(model_name, 2)
    names, h, J, U = per_input_derivatives(model, x, lik)
    n_samples = 3
    for m in range(2):
        xm = x[m : m + 1]
        F = flat(diagonal_fisher(model, xm, likelihood=lik, estimator="exact"))
        torch.testing.assert_close(F, J[m].pow(2).sum(0) / 0.49, rtol=1e-10, atol=0)
        V1 = fisher_variance(model, xm, likelihood=lik, estimator="mc1", n_samples=n_samples)
        assert_flat_close(V1, 2 * F**2 / n_samples, rtol=1e-10)
        V2 = fisher_variance(model, xm, likelihood=lik, estimator="mc2", n_samples=n_samples)
        assert_flat_close(V2, U[m].pow(2).sum(0) / (n_samples * 0.49), rtol=1e-10)
    # M inputs: (1/M²) sum_m 2 F_m² / N, with sum_m F_m² from fisher_moments
    mom = fisher_moments(model, x, likelihood=lik, with_v2=False, with_fisher_sq=True)
    V1 = fisher_variance(model, x, likelihood=lik, estimator="mc1", n_samples=n_samples)
    assert_flat_close(V1, 2 * flat(mom.fisher_sq) / (4 * n_samples), rtol=1e-10)


def test_gaussian_exact_law_monte_carlo():
    """N Î₁/F ~ chi²_N and (Î₂ - F)/sqrt(V₂) ~ N(0, 1): KS tests at alpha = 1e-4 (Bonferroni), and power."""
    stats = pytest.importorskip("scipy.stats")
    lik = Gaussian(sigma=0.7)
    model, x = tiny_case("mlp-sigmoid", 1)
    n_samples, reps = 3, 400
    F = flat(diagonal_fisher(model, x, likelihood=lik, estimator="exact"))
    V2 = flat(fisher_variance(model, x, likelihood=lik, estimator="mc2", n_samples=n_samples))
    # one parameter per first-layer tensor and per hidden tensor (the last layer has V₂ = 0)
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    picks = [int(offsets[k]) for k in range(len(sizes) - 2)]
    alpha = 1e-4 / (2 * len(picks))
    g = gen(9)
    i1 = torch.stack(
        [flat(diagonal_fisher(model, x, likelihood=lik, estimator="mc1", n_samples=n_samples, generator=g))
         for _ in range(reps)]
    )  # fmt: skip
    i2 = torch.stack(
        [flat(diagonal_fisher(model, x, likelihood=lik, estimator="mc2", n_samples=n_samples, generator=g))
         for _ in range(reps)]
    )  # fmt: skip
    for i in picks:
        chi = (n_samples * i1[:, i] / F[i]).numpy()
        assert stats.kstest(chi, "chi2", args=(n_samples,)).pvalue > alpha, i
        std = ((i2[:, i] - F[i]) / V2[i].sqrt()).numpy()
        assert stats.kstest(std, "norm").pvalue > alpha, i
        # power: the laws of a variance that forgot its 1/N are rejected
        assert stats.kstest(chi, "chi2", args=(1,)).pvalue < alpha
        assert stats.kstest(std / math.sqrt(n_samples), "norm").pvalue < alpha


# =========================================================================================================
# item 7: cumulant identities
@pytest.mark.parametrize("lik_name,classes", [("categorical", 3), ("categorical", 4)] + [
    (n, 3) for n in ("bernoulli", "gaussian", "poisson")
])  # fmt: skip
def test_fourth_moment_equals_cumulants_plus_pairings(lik_name, classes):
    """K (outcome table) == moment4_operator == kappa + I⊗I + I_ac I_bd + I_ad I_bc (Lemma 5), rtol 1e-8."""
    lik = make_likelihood(lik_name)
    for h in random_rows(lik_name, 3, classes, seed=classes):
        eta, I_enum, K_enum = central_moments(lik, h)
        I_auto, kappa = derivative_tensors(lik, h)
        torch.testing.assert_close(eta, lik.mean(h.unsqueeze(0))[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(I_enum, I_auto, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(lik.fisher(h.unsqueeze(0))[0], I_auto, rtol=1e-10, atol=1e-14)
        pairings = (
            torch.einsum("ab,cd->abcd", I_auto, I_auto)
            + torch.einsum("ac,bd->abcd", I_auto, I_auto)
            + torch.einsum("ad,bc->abcd", I_auto, I_auto)
        )
        torch.testing.assert_close(K_enum, kappa + pairings, rtol=1e-8, atol=1e-12)
        K_lib, I_lib = moment4_operator(lik, h)
        torch.testing.assert_close(K_lib, K_enum, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(I_lib, I_auto, rtol=1e-10, atol=1e-14)
        if lik.factorized:  # kappa is diagonal: kappa_aaaa = unit_kappa4
            torch.testing.assert_close(
                torch.diagonal(kappa.reshape(classes**2, classes**2))[:: classes + 1],
                lik.unit_kappa4(h.unsqueeze(0))[0],
                rtol=1e-8,
                atol=1e-12,
            )


@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
def test_moment_contractions(lik_name):
    """For directions v, u: Var((vᵀs)²) = kappa(v⁴) + 2 F² = d⁴/ds⁴ F(h+sv) + 2(d²/ds² F(h+sv))² = moment4;
    Var(uᵀt) = d²/ds² F(h+su) = fisher_quad (docs/fisher-math.md §3.2)."""
    lik = make_likelihood(lik_name)
    c, b = (2 if lik_name == "poisson" else 3), 4  # Poisson: keep the count table small
    h = random_rows(lik_name, b, c, seed=11)
    v = torch.randn(c, b, 2, generator=gen(12), dtype=DTYPE)  # directions stacked on axis 0 (C x B x ...)
    lib4 = lik.moment4(h, v)
    lib2 = lik.fisher_quad(h, v)
    logZ = log_partition(lik)
    for i in range(b):
        probs, t = outcome_table(lik, h[i])
        s = t - probs @ t
        for j in range(2):
            w = v[:, i, j]
            proj = s @ w
            var_sq = probs @ proj**4 - (probs @ proj**2) ** 2

            def along(sc, w=w, i=i):
                return logZ(h[i] + sc * w)

            s0 = torch.zeros((), dtype=DTYPE)
            d2 = torch.func.hessian(along)(s0)
            d4 = torch.func.hessian(torch.func.hessian(along))(s0)
            torch.testing.assert_close(lib4[i, j], var_sq, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(lib4[i, j], d4 + 2 * d2**2, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(lib2[i, j], d2, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(lib2[i, j], probs @ proj**2, rtol=1e-8, atol=1e-12)


ONE_D = {
    # name: (I, kappa4, K, K - I²) as functions of the mean parameter (docs/fisher-math.md §5.1, P21 Table 1)
    "bernoulli": (
        lambda p: p * (1 - p),
        lambda p: p * (1 - p) * (6 * p**2 - 6 * p + 1),
        lambda p: p * (1 - p) * (3 * p**2 - 3 * p + 1),
        lambda p: p * (1 - p) * (1 - 2 * p) ** 2,
    ),
    "gaussian": (lambda m: 1 + 0 * m, lambda m: 0 * m, lambda m: 3 + 0 * m, lambda m: 2 + 0 * m),
    "poisson": (lambda lam: lam, lambda lam: lam, lambda lam: lam + 3 * lam**2, lambda lam: lam + 2 * lam**2),
}


@pytest.mark.parametrize("lik_name", list(ONE_D))
def test_one_dimensional_rows(lik_name):
    """§5.1: I = F'', kappa4 = F'''', K = kappa4 + 3 I², N V₁/v⁴ = K - I², for several h (sigma = 1 normal)."""
    lik = {"bernoulli": Bernoulli(), "gaussian": Gaussian(), "poisson": Poisson()}[lik_name]
    I_f, k4_f, K_f, M_f = ONE_D[lik_name]
    hs = torch.tensor([-2.0, -0.7, 0.0, 0.4, 1.3], dtype=DTYPE)
    for h in hs:
        row = h.reshape(1, 1)
        mean = lik.mean(row)[0, 0]
        _, I_enum, K_enum = central_moments(lik, h.reshape(1))
        I_auto, kappa = derivative_tensors(lik, h.reshape(1))
        expected = [f(mean) for f in (I_f, k4_f, K_f, M_f)]
        got = {
            "I (outcomes)": I_enum.reshape(()),
            "I (autograd)": I_auto.reshape(()),
            "I (unit_variance)": lik.unit_variance(row)[0, 0],
            "kappa4 (autograd)": kappa.reshape(()),
            "kappa4 (unit_kappa4)": lik.unit_kappa4(row)[0, 0],
            "K (outcomes)": K_enum.reshape(()),
            "K - I^2 (moment4, v = 1)": lik.moment4(row, torch.ones(1, 1, dtype=DTYPE))[0],
        }
        want = {
            "I (outcomes)": expected[0], "I (autograd)": expected[0], "I (unit_variance)": expected[0],
            "kappa4 (autograd)": expected[1], "kappa4 (unit_kappa4)": expected[1],
            "K (outcomes)": expected[2], "K - I^2 (moment4, v = 1)": expected[3],
        }  # fmt: skip
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-8, atol=1e-12, msg=f"{lik_name} h={h}: {key}")
    if lik_name == "bernoulli":  # K - I² <= I everywhere, and 0 at p = 1/2 (Î₁ exact there)
        p = torch.linspace(0, 1, 101, dtype=DTYPE)
        assert bool((M_f(p) <= I_f(p) + 1e-15).all()) and M_f(torch.tensor(0.5)) == 0


def test_categorical_two_classes_is_the_bernoulli_row():
    """C = 2 softmax: N V₁ = p(1-p)(1-2p)² (v₁ - v₂)⁴ with p = p₁ (docs/fisher-math.md §5.3)."""
    h = torch.randn(5, 2, generator=gen(4), dtype=DTYPE)
    v = torch.randn(2, 5, generator=gen(5), dtype=DTYPE)
    p = torch.softmax(h, -1)[:, 0]
    expected = p * (1 - p) * (1 - 2 * p) ** 2 * (v[0] - v[1]) ** 4
    torch.testing.assert_close(Categorical().moment4(h, v), expected, rtol=1e-10, atol=0)


# =========================================================================================================
# item 11: the joint estimator with random inputs
@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("model_name,batch", [("mlp-sigmoid", 3), ("mlp-tanh", 4), ("cnn-sigmoid", 3)])
def test_joint_variance_equals_enumeration(model_name, batch, estimator):
    """Uniform p(x) over the M = ``batch`` inputs.

    ``joint_variance`` returns, per parameter, the variance of the design "draw M inputs i.i.d. from p(x),
    N labels each, average the M per-input estimates":

        total = (1/M) [ Var_x F(x) + (1/N) E_x ṽ(x) ],   input = (1/M) Var_x F,   output = (1/(M N)) E_x ṽ

    (Var_x the population variance over the M inputs).  The single-pair estimator (one input, N labels)
    therefore has variance M · total: checked by enumerating every (input, label tuple) with probability
    (1/M) prod_k p(y_k | x).  For M = 3, N = 1 the M-draw design itself is enumerated too ((3 C)^3 outcomes)
    and its variance is ``total``.
    """
    model, x = tiny_case(model_name, batch)
    lik = Categorical()
    names, h, J, U = per_input_derivatives(model, x, lik)
    Fm = torch.einsum("map,mab,mbp->mp", J, lik.fisher(h), J)  # (M, P)
    pick = 0 if estimator == "mc1" else 1
    for n_samples in (1, 2):
        out = joint_variance(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples)
        assert set(out) == {"input", "output", "total"}
        values, probs, cond_var = [], [], []
        for m in range(batch):
            labels, pr = enumerate_draws(lik, h[m : m + 1], n_samples)
            est = estimators_per_draw(lik, h[m : m + 1], J[m : m + 1], U[m : m + 1], labels)[pick]
            values.append(est)
            probs.append(pr / batch)
            cond_var.append(exact_moments(est, pr)[1])  # V(x_m) = ṽ(x_m) / N
        values, probs = torch.cat(values), torch.cat(probs)
        mean, var = exact_moments(values, probs)
        scale = float(Fm.abs().max()) ** 2
        torch.testing.assert_close(mean, Fm.mean(0), rtol=1e-10, atol=1e-14 * scale**0.5)
        assert_flat_close(out["total"], var / batch, rtol=1e-10, atol=1e-14 * scale)
        assert_flat_close(out["input"], Fm.var(0, correction=0) / batch, rtol=1e-10, atol=1e-14 * scale)
        assert_flat_close(out["output"], torch.stack(cond_var).mean(0) / batch, rtol=1e-10, atol=1e-14 * scale)
        assert_flat_close(out["total"], flat(out["input"]) + flat(out["output"]), rtol=1e-14)
    if batch == 3:  # the M-draw design, N = 1: outcomes (m_1, y_1, m_2, y_2, m_3, y_3)
        labels, pr = enumerate_draws(lik, h[:1], 1)  # labels of one input: (C, 1, 1)
        single = torch.cat(
            [estimators_per_draw(lik, h[m : m + 1], J[m : m + 1], U[m : m + 1], labels)[pick] for m in range(3)]
        )  # (3C, P): pair (m, y)
        pair_prob = torch.cat([torch.softmax(h[m], -1) / 3 for m in range(3)])
        idx = torch.tensor(list(itertools.product(range(len(pair_prob)), repeat=3)))
        design = single[idx].mean(1)
        design_prob = pair_prob[idx].prod(1)
        _, var = exact_moments(design, design_prob)
        out = joint_variance(model, x, likelihood=lik, estimator=estimator)
        assert_flat_close(out["total"], var, rtol=1e-10, atol=1e-14 * float(Fm.abs().max()) ** 2)


# =========================================================================================================
# item 12 / docs/fisher-math.md §8: the empirical Fisher (data labels from q)
def test_empirical_fisher_mean_and_bias_by_enumeration():
    """Targets from the model: EF (and the empirical Hessian) are unbiased.  From q != p: the bias is
    vᵀ(Σ_q + δδᵀ - I)v for Ĩ₁ and -uᵀδ for Ĩ₂, with the per-pair variances of docs/fisher-math.md §8."""
    model, x = tiny_case("mlp-sigmoid", 2)
    lik = Categorical()
    names, h, J, U = per_input_derivatives(model, x, lik)
    p = torch.softmax(h, -1)
    q = torch.softmax(torch.randn(2, 3, generator=gen(8), dtype=DTYPE), -1)
    exact = flat(diagonal_fisher(model, x, likelihood=lik, estimator="exact"))
    tuples = torch.tensor(list(itertools.product(range(3), repeat=2)))  # one data label per input
    ef = torch.stack(
        [flat(diagonal_fisher(model, x, likelihood=lik, estimator="empirical", targets=t)) for t in tuples]
    )
    eh = estimators_per_draw(lik, h, J, U, tuples.unsqueeze(1))[1]  # Ĩ₂: Î₂ with the data labels
    for dist, unbiased in ((p, True), (q, False)):
        prob = dist[0, tuples[:, 0]] * dist[1, tuples[:, 1]]
        mean1, var1 = exact_moments(ef, prob)
        mean2, var2 = exact_moments(eh, prob)
        delta = dist - p  # (M, C)
        sigma_q = torch.diag_embed(dist) - dist.unsqueeze(-1) * dist.unsqueeze(-2)
        second = sigma_q + delta.unsqueeze(-1) * delta.unsqueeze(-2)  # E_q[(t - eta)(t - eta)ᵀ]
        bias1 = torch.einsum("map,mab,mbp->p", J, second - lik.fisher(h), J) / 2
        bias2 = -torch.einsum("ma,map->p", delta, U) / 2
        scale = float(exact.abs().max())
        torch.testing.assert_close(mean1 - exact, bias1, rtol=1e-9, atol=1e-13 * scale)
        torch.testing.assert_close(mean2 - exact, bias2, rtol=1e-9, atol=1e-13 * scale)
        if unbiased:
            assert float(bias1.abs().max()) < 1e-13 * scale and float(bias2.abs().max()) < 1e-13 * scale
        else:
            assert float(bias1.abs().max()) > 1e-3 * scale
        # per-pair variances: E_q[(vᵀ(t - eta))⁴] - (vᵀ E_q[ssᵀ] v)², and uᵀ Σ_q u; the mean over M has 1/M²
        s = torch.eye(3, dtype=DTYPE) - p.unsqueeze(1)  # (M, y, C): t(y) - eta
        proj = torch.einsum("mya,map->myp", s, J)
        m4 = torch.einsum("my,myp->mp", dist, proj**4)
        m2 = torch.einsum("map,mab,mbp->mp", J, second, J)
        torch.testing.assert_close(var1, (m4 - m2**2).sum(0) / 4, rtol=1e-8, atol=1e-13 * scale**2)
        torch.testing.assert_close(
            var2, torch.einsum("map,mab,mbp->p", U, sigma_q, U) / 4, rtol=1e-8, atol=1e-13 * scale**2
        )
    # with the data fixed the EF draws nothing: zero variance, as for the exact Fisher
    for estimator in ("exact", "empirical"):
        V = fisher_variance(model, x, likelihood=lik, estimator=estimator)
        assert list(V) == names and all(float(v.abs().max()) == 0 and v.dtype == DTYPE for v in V.values())


def test_moments_are_detached_on_the_hvp_route():
    """Regression: V₂ from the HVP route once came back attached to the probe's autograd graph."""
    model, x = tiny_case("cnn-sigmoid", 2)
    mom = fisher_moments(model, x, likelihood="categorical", with_fisher_sq=True)
    joint = joint_variance(model, x, likelihood="categorical", estimator="mc2")
    tensors = [*mom.fisher.values(), *mom.fisher_sq.values(), *mom.v1.values(), *mom.v2.values()]
    tensors += [t for part in joint.values() for t in part.values()]
    assert not any(t.requires_grad for t in tensors)


# =========================================================================================================
# layer_summary, errors
def test_layer_summary_pinned():
    model, x = tiny_case("mlp-sigmoid", 3)
    F = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    V = fisher_variance(model, x, likelihood="categorical", estimator="mc2", n_samples=2)
    out = layer_summary(F, V)
    assert list(out) == list(F)
    for n in F:
        f, v = F[n].double(), V[n].double()
        rec = out[n]
        assert set(rec) == {"trace_fisher", "mean_fisher", "trace_variance", "mean_variance", "rse"}
        assert math.isclose(rec["trace_fisher"], float(f.sum()), rel_tol=1e-12)
        assert math.isclose(rec["mean_fisher"], float(f.sum()) / f.numel(), rel_tol=1e-12)
        assert math.isclose(rec["trace_variance"], float(v.sum()), rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(rec["mean_variance"], float(v.sum()) / v.numel(), rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(rec["rse"], math.sqrt(float(v.mean())) / float(f.mean()), rel_tol=1e-12)
    assert out["2.weight"]["rse"] > 0 and out["4.weight"]["rse"] == 0.0  # Î₂ exact on the last layer
    # degenerate entries: F = V = 0 gives 0, F = 0 < V gives inf, empty tensors give zeros
    z = {"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(0)}
    out = layer_summary(z, {"a": torch.zeros(3), "b": torch.ones(2), "c": torch.zeros(0)})
    assert out["a"]["rse"] == 0.0 and out["b"]["rse"] == math.inf and out["c"]["mean_fisher"] == 0.0


@pytest.mark.parametrize(
    "fn,kwargs,match",
    [
        (fisher_variance, {"estimator": "mc3"}, "Invalid estimator: 'mc3'"),
        (fisher_variance, {"estimator": "mc1", "n_samples": 0}, "Invalid n_samples: 0"),
        (fisher_variance, {"estimator": "mc1", "n_samples": 1.5}, "Invalid n_samples: 1.5"),
        (fisher_variance, {"estimator": "mc1", "n_samples": True}, "Invalid n_samples: True"),
        (fisher_variance, {"estimator": "mc1", "reduction": "max"}, "Invalid reduction: 'max'"),
        (fisher_variance, {"estimator": "mc1", "likelihood": "cauchy"}, "Invalid likelihood: 'cauchy'"),
        (joint_variance, {"estimator": "exact"}, "Invalid estimator: 'exact'"),
        (joint_variance, {"estimator": "mc2", "n_samples": 0}, "Invalid n_samples: 0"),
        (fisher_moments, {"likelihood": "cauchy"}, "Invalid likelihood: 'cauchy'"),
    ],
)
def test_invalid_arguments(fn, kwargs, match):
    model, x = tiny_case("mlp-sigmoid", 2)
    kwargs = {"likelihood": "categorical", **kwargs}
    with pytest.raises(ValueError, match=match):
        fn(model, x, **kwargs)


def test_empty_batch_raises():
    model, _ = tiny_case("mlp-sigmoid", 2)
    with pytest.raises(ValueError, match="non-empty batch"):
        fisher_variance(model, torch.zeros(0, 4, dtype=DTYPE), likelihood="categorical", estimator="mc1")


def test_state_untouched():
    """fisher_variance runs in eval mode and restores the flags; no .grad appears; parameters unchanged."""
    model, x = tiny_case("mlp-sigmoid", 2)
    model.train()
    model[1].eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for estimator in ("mc1", "mc2"):
        fisher_variance(model, x, likelihood="categorical", estimator=estimator)
    assert model.training and not model[1].training and model[0].training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# =========================================================================================================
# benchmark smoke run (docs/design.md §7: benchmarks run inside the test suite so they cannot rot)
@pytest.mark.bench
def test_variance_cost_benchmark_smoke(tmp_path):
    from benchmarks import variance_cost as bench

    threads = torch.get_num_threads()
    results = bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert [r["case"].key for r in results] == [c.key for c in bench.make_cases(smoke=True)]
    for res in results:
        stats = res["stats"]
        assert set(stats) == set(bench.METHODS) | {bench.BASELINE, bench.PLAIN}
        assert stats[bench.BASELINE]["ratio"] == 1.0
        assert all(math.isfinite(s["ratio"]) and s["ratio"] > 0 for s in stats.values())
        assert all(v <= 1e-9 for v in res["agreement"].values()) and res["agreement"]
        assert len(res["breakdown"]) == 8 and all(math.isfinite(v) for v in res["breakdown"].values())
        assert len(bench.target_rows(res)) == 7
        assert all(s["flops"] > 0 for s in stats.values())  # matmul FLOPs are counted
    md = (tmp_path / "variance_cost.md").read_text()
    assert "python benchmarks/variance_cost.py --smoke --threads 1 --out" in md
    assert md.count("| fisher_moments (F, V₁, V₂) |") == len(results)
    assert md.count("Where the time goes") == len(results)


@pytest.mark.bench
def test_variance_cost_benchmark_invalid_arguments():
    from benchmarks import variance_cost as bench

    for argv, match in (
        (["--smoke", "--rounds", "0"], "Invalid rounds: 0"),
        (["--smoke", "--threads", "0"], "Invalid threads: 0"),
        (["--smoke", "--models", "rnn"], "Invalid models"),
    ):
        with pytest.raises(ValueError, match=match):
            bench.main(argv)
