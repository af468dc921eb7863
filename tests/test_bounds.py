"""Variance bounds (docs/fisher-math.md §4; §10 items 10 and 12): they hold, they are the documented quantities, and the
eigenvalue routes agree with dense references.

* per-parameter and trace bounds ``lower <= V <= upper`` for the four likelihoods, Î₁ and Î₂, on a tiny MLP
  and a tiny CNN (slack 1e-12 * max(|UB|, tiny)); the upper bounds re-derived here from the brute-force
  ``J``/``U`` and dense eigenvalues of the ``C² x C²`` matrix ``K - I⊗I``;
* ``lambda_max`` of the 4th-moment operator by the ``C x C`` Gram route (categorical) and by the block formula
  (factorised families) against ``eigvalsh`` of the ``C² x C²`` matrix; categorical ``lambda_max(I) <=
  min(max p, 1/2)``; the Gaussian bounds are tight;
* the Frobenius bounds of Soen & Sun (2021), Thm 7 and 8 with the derived Lemma 9, with the covariance norms
  recomputed here from the brute-force Jacobian / Hessian (by a Gram identity and, on a very small model, by
  the dense ``P⁴`` tensors);
* Î₂ negativity: ``Î₂(θ_i) >= F_i - sum_a |u_a| |t̄_a - η_a|`` on every enumerated label draw (and the
  full-matrix Thm 11), ``Î₁ >= 0``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE, LIKELIHOOD_NAMES, forced, gen, inputs, make_likelihood, mlp
from reference import (
    central_moments,
    enumerate_draws,
    estimators_per_draw,
    exact_diag,
    flat,
    output_fisher_eigenvalues_numpy,
    per_input_derivatives,
)
from test_variance import random_rows, tiny_case
from torch.func import functional_call, hessian, jacrev

from fisher_optim import diagonal_fisher, fisher_variance, frobenius_bounds, trace_bounds, variance_bounds
from fisher_optim.bounds import lambda_min_moment4_tensor, moment4_operator
from fisher_optim.likelihoods import Categorical, Gaussian

TINY = 1e-300


def moment4_matrix(lik, h: torch.Tensor) -> torch.Tensor:
    """``K - I⊗I`` as a ``C² x C²`` matrix (pair index (ab), (cd)), K from an independent outcome table."""
    c = h.shape[0]
    _, I, K = central_moments(lik, h)
    return (K - torch.einsum("ab,cd->abcd", I, I)).reshape(c * c, c * c)


def assert_between(lower, value, upper, what=""):
    """``lower <= value <= upper`` with slack 1e-12 * max(|upper|, tiny) (docs/fisher-math.md §10 item 10)."""
    slack = 1e-12 * max(float(torch.as_tensor(upper).abs().max()), TINY)
    lower, value, upper = (torch.as_tensor(t) for t in (lower, value, upper))
    assert bool((lower <= value + slack).all()), f"{what}: lower bound violated by {float((lower - value).max())}"
    assert bool((value <= upper + slack).all()), f"{what}: upper bound violated by {float((value - upper).max())}"


# -- the parameter-wise and trace bounds ----------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("model_name", ["mlp-sigmoid", "cnn-sigmoid"])
def test_bounds_hold_and_match_dense_eigenvalues(model_name, lik_name, estimator):
    model, x = tiny_case(model_name, 3 if model_name.startswith("mlp") else 2)
    lik = make_likelihood(lik_name)
    n_samples, m = 2, x.shape[0]
    V = fisher_variance(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples)
    lower, upper = variance_bounds(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples)
    assert list(lower) == list(V) == list(upper)
    for n in V:
        assert lower[n].shape == V[n].shape == upper[n].shape
        assert bool((lower[n] >= 0).all())
        assert_between(lower[n], V[n], upper[n], n)
    for n, (lo, up) in trace_bounds(lower, upper).items():
        assert_between(torch.tensor(lo, dtype=DTYPE), V[n].sum(), torch.tensor(up, dtype=DTYPE), f"trace {n}")
    # the upper bound is the documented one: (1/(N M²)) sum_m lambda_max(A_m) ||P d_m||^(4 or 2) with A = K - I⊗I
    # (mc1, d = v) or I (mc2, d = u), P the projection on 1-perp for softmax (identity otherwise)
    names, h, J, U = per_input_derivatives(model, x, lik, hessians=estimator == "mc2")
    D = J if estimator == "mc1" else U
    if isinstance(lik, Categorical):
        D = D - D.mean(1, keepdim=True)
    # the lower bound likewise with lambda_min(I) on 1-perp (mc2) or the tensor bound (mc1, checked for validity in
    # test_tensor_lambda_min_is_a_valid_lower_bound)
    expected_up = torch.zeros(D.shape[-1], dtype=DTYPE)
    expected_lo = torch.zeros(D.shape[-1], dtype=DTYPE)
    c = h.shape[1]
    basis = torch.linalg.qr(torch.eye(c, dtype=DTYPE) - 1.0 / c)[0][:, : c - 1]  # orthonormal basis of 1-perp
    for i in range(m):
        if estimator == "mc1":
            lam = torch.linalg.eigvalsh(moment4_matrix(lik, h[i]))[-1]
            expected_up += lam * D[i].pow(2).sum(0) ** 2
            expected_lo += lambda_min_moment4_tensor(lik, h[i : i + 1])[0] * D[i].pow(2).sum(0) ** 2
        else:
            I = lik.fisher(h[i : i + 1])[0]
            expected_up += torch.linalg.eigvalsh(I)[-1] * D[i].pow(2).sum(0)
            restricted = basis.T @ I @ basis if isinstance(lik, Categorical) else I
            expected_lo += torch.linalg.eigvalsh(restricted)[0] * D[i].pow(2).sum(0)
    torch.testing.assert_close(flat(upper), expected_up / (n_samples * m * m), rtol=1e-8, atol=0)
    torch.testing.assert_close(flat(lower), expected_lo / (n_samples * m * m), rtol=1e-8, atol=0)
    # the lower bound is informative for Î₂ and for Gaussian/Poisson Î₁; for categorical Î₁ there is no useful
    # eigenvalue lower bound (docs/fisher-math.md §4.2) and the library returns 0; Bernoulli Î₁ can be 0 legitimately
    # (a unit at p = 1/2 has Var(s_a²) = 0)
    if estimator == "mc2":  # zero on the last layer only (u = 0 there)
        assert bool((flat(lower) > 0).any())
    elif lik_name in ("gaussian", "poisson"):
        assert bool((flat(lower) > 0).all())
    elif lik_name == "categorical":
        assert float(flat(lower).abs().max()) == 0


@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
def test_lambda_max_moment4_equals_dense_eigenvalue(lik_name):
    """``lik.lambda_max_moment4`` (C x C Gram route / block formula) == top eigenvalue of the C² x C² matrix."""
    lik = make_likelihood(lik_name)
    for c in (2, 3, 5) if lik_name == "categorical" else (2, 3):
        h = random_rows(lik_name, 4, c, seed=c)
        lib = lik.lambda_max_moment4(h)
        assert lib.shape == (4,)
        for i in range(4):
            Mmat = moment4_matrix(lik, h[i])
            torch.testing.assert_close(Mmat, Mmat.T, rtol=0, atol=1e-13)
            ev = torch.linalg.eigvalsh(Mmat)
            assert float(ev[0]) > -1e-12  # M = Cov(s_a s_b, s_c s_d) is PSD
            torch.testing.assert_close(lib[i], ev[-1], rtol=1e-8, atol=1e-14)
            # the library's own C⁴ operator agrees
            K, I = moment4_operator(lik, h[i])
            ev_lib = torch.linalg.eigvalsh((K - torch.einsum("ab,cd->abcd", I, I)).reshape(c * c, c * c))
            torch.testing.assert_close(ev_lib[-1], ev[-1], rtol=1e-8, atol=1e-14)


def test_categorical_fisher_eigenvalues():
    """lambda_max(I) <= min(max p, 1/2); lambda_min on 1-perp; I 1 = 0 (docs/fisher-math.md §4.4).

    The reference matrix is ``diag(p) - p pᵀ`` built by hand from the softmax probabilities in numpy
    (tests/reference.py), its eigenvalues from ``numpy.linalg.eigvalsh``: no ``lik.fisher`` involved."""
    lik = Categorical()
    for c in (2, 3, 4, 7):
        h = 2.5 * torch.randn(50, c, generator=gen(c), dtype=DTYPE)
        p = torch.softmax(h, -1)
        ref_max, ref_min = output_fisher_eigenvalues_numpy("categorical", h.numpy())
        lam_max, lam_min = lik.lambda_max_fisher(h), lik.lambda_min_fisher(h)
        torch.testing.assert_close(lam_max, torch.from_numpy(ref_max), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(lam_min, torch.from_numpy(ref_min), rtol=1e-9, atol=1e-14)
        assert bool((lam_max <= torch.minimum(p.amax(-1), torch.full_like(lam_max, 0.5)) + 1e-15).all())
        assert bool((lam_min > 0).all())  # every p_c > 0: I is positive definite on 1-perp
        torch.testing.assert_close(lik.fisher(h).sum(-1), torch.zeros(50, c, dtype=DTYPE), rtol=0, atol=1e-15)
    # the bound 1/2 is attained at p = (1/2, 1/2, 0)
    h = torch.tensor([[0.0, 0.0, -80.0]], dtype=DTYPE)
    torch.testing.assert_close(lik.lambda_max_fisher(h), torch.tensor([0.5], dtype=DTYPE), rtol=1e-12, atol=0)


@pytest.mark.parametrize("lik_name", ["bernoulli", "gaussian", "poisson"])
def test_tensor_lambda_min_is_a_valid_lower_bound(lik_name):
    """min over unit w of M(w,w,w,w) >= lambda_min_moment4_tensor (random, axis and diagonal directions)."""
    lik = make_likelihood(lik_name)
    c = 3
    h = random_rows(lik_name, 5, c, seed=31)
    lb = lambda_min_moment4_tensor(lik, h)
    w = torch.randn(4000, c, generator=gen(32), dtype=DTYPE)
    w = torch.cat([w, torch.eye(c, dtype=DTYPE), torch.ones(1, c, dtype=DTYPE)])
    w = w / w.norm(dim=-1, keepdim=True)
    for i in range(5):
        Mmat = moment4_matrix(lik, h[i]).reshape(c, c, c, c)
        values = torch.einsum("abcd,na,nb,nc,nd->n", Mmat, w, w, w, w)
        assert float(lb[i]) <= float(values.min()) + 1e-12
        if lik_name != "bernoulli":  # Bernoulli: 0 when a unit is near p = 1/2 (M(e_a⁴) = 0 at p = 1/2)
            assert float(lb[i]) > 0
        if lik_name == "gaussian":  # exact: M(w⁴) = 2 / sigma⁴ on the sphere
            torch.testing.assert_close(values, torch.full_like(values, 2 / 0.7**4), rtol=1e-10, atol=0)
            torch.testing.assert_close(lb[i], torch.tensor(2 / 0.7**4, dtype=DTYPE), rtol=1e-12, atol=0)
    assert torch.equal(lambda_min_moment4_tensor(Categorical(), h), torch.zeros(5, dtype=DTYPE))


@pytest.mark.parametrize("model_name", ["mlp-sigmoid", "cnn-sigmoid"])
def test_gaussian_bounds_are_tight(model_name):
    """Gaussian(sigma): lower == V == upper, V₁ = 2||v||⁴/(N sigma⁴), V₂ = ||u||²/(N sigma²)
    (docs/fisher-math.md §4.4)."""
    lik = Gaussian(sigma=0.7)
    model, x = tiny_case(model_name, 1)
    names, h, J, U = per_input_derivatives(model, x, lik)
    n_samples = 3
    for estimator, expected in (
        ("mc1", 2 * J[0].pow(2).sum(0) ** 2 / (n_samples * 0.7**4)),
        ("mc2", U[0].pow(2).sum(0) / (n_samples * 0.49)),
    ):
        V = flat(fisher_variance(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples))
        lower, upper = variance_bounds(model, x, likelihood=lik, estimator=estimator, n_samples=n_samples)
        torch.testing.assert_close(V, expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(flat(lower), expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(flat(upper), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"estimator": "exact"}, "Invalid estimator: 'exact'"),
        ({"estimator": "empirical"}, "Invalid estimator: 'empirical'"),
        ({"estimator": "mc1", "n_samples": 0}, "Invalid n_samples: 0"),
        ({"estimator": "mc2", "likelihood": "cauchy"}, "Invalid likelihood: 'cauchy'"),
    ],
)
def test_variance_bounds_invalid_arguments(kwargs, match):
    model, x = tiny_case("mlp-sigmoid", 2)
    with pytest.raises(ValueError, match=match):
        variance_bounds(model, x, **{"likelihood": "categorical", **kwargs})


# -- Frobenius bounds (Soen & Sun 2021, Thm 7, 8, Lemma 9 derived form) ----------------------------------
def full_derivatives(model, x):
    """h (C), J (C x P) and the full Hessian H (C x P x P) of the flattened output at one input ``x``."""
    names = [n for n, p in model.named_parameters()]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(t):
        pd, off = {}, 0
        for n in names:
            pd[n] = t[off : off + params[n].numel()].view_as(params[n])
            off += params[n].numel()
        return functional_call(model, pd, (x,)).reshape(-1)

    model.eval()
    return f(theta).detach(), jacrev(f)(theta), hessian(f)(theta)


def covariance_norms(lik, h, J, H, n_samples):
    """``||Cov(Î₁)||_F`` and ``||Cov(Î₂)||_F`` of the full P⁴ tensors (docs/fisher-math.md §3.1) by Gram identities:

    ``||Cov₁||² = sum M_abcd M_a'b'c'd' G_aa' G_bb' G_cc' G_dd'`` with ``G = J Jᵀ`` and
    ``||Cov₂||² = tr(I Q I Q)`` with ``Q_ab = <H_a, H_b>_F`` — no P⁴ tensor, and no library formula
    (K and I from the outcome table)."""
    c = h.shape[0]
    _, I, K = central_moments(lik, h)
    Mop = K - torch.einsum("ab,cd->abcd", I, I)
    G = J @ J.T
    t = torch.einsum("abcd,ae,bf,cg,dh->efgh", Mop, G, G, G, G)
    cov1 = torch.sqrt((Mop * t).sum()) / n_samples
    Q = H.reshape(c, -1) @ H.reshape(c, -1).T
    cov2 = torch.sqrt(torch.trace(I @ Q @ I @ Q)) / n_samples
    return float(cov1), float(cov2), Mop, I


@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
def test_frobenius_bounds(lik_name):
    lik = make_likelihood(lik_name)
    model = mlp("sigmoid", widths=(2, 3, 3), seed=21)  # P = 21: the library forms the P⁴ tensors
    for i, n_samples in enumerate((1, 3)):
        x = inputs((1, 2), seed=22 + i)
        out = frobenius_bounds(model, x, likelihood=lik, n_samples=n_samples)
        assert set(out) == {"cov1_fro", "thm7", "thm7_lemma9", "cov2_fro", "thm8", "thm8_lemma9"}
        assert out["cov1_fro"] <= out["thm7"] * (1 + 1e-12) and out["thm7"] <= out["thm7_lemma9"] * (1 + 1e-12)
        assert out["cov2_fro"] <= out["thm8"] * (1 + 1e-12) and out["thm8"] <= out["thm8_lemma9"] * (1 + 1e-12)
        h, J, H = full_derivatives(model, x)
        cov1, cov2, Mop, I = covariance_norms(lik, h, J, H, n_samples)
        assert cov1 > 0 and cov2 > 0
        assert abs(out["cov1_fro"] - cov1) <= 1e-9 * cov1
        assert abs(out["cov2_fro"] - cov2) <= 1e-9 * cov2
        # the bounds themselves, from their definitions
        thm7 = float(J.pow(2).sum() ** 2 * Mop.norm() / n_samples)
        kdiag = torch.stack([central_moments(lik, h)[2][a, a, a, a] for a in range(h.shape[0])])
        lemma9 = float(kdiag.sqrt().sum() ** 2 + torch.diagonal(I).sum() ** 2)
        assert float(Mop.norm()) <= lemma9
        thm8 = float(H.pow(2).sum() * I.norm() / n_samples)
        for key, val in (
            ("thm7", thm7),
            ("thm7_lemma9", float(J.pow(2).sum() ** 2) * lemma9 / n_samples),
            ("thm8", thm8),
            ("thm8_lemma9", float(H.pow(2).sum() * torch.diagonal(I).sum()) / n_samples),
        ):
            assert abs(out[key] - val) <= 1e-9 * val, key


def test_covariance_norm_gram_identity_against_dense_tensors():
    """The Gram identities used above equal the norms of the dense P⁴ covariance tensors (P = 9)."""
    lik = Categorical()
    model = mlp("tanh", widths=(1, 2, 3), seed=23)
    x = inputs((1, 1), seed=24)
    h, J, H = full_derivatives(model, x)
    cov1, cov2, Mop, I = covariance_norms(lik, h, J, H, 2)
    dense1 = torch.einsum("ai,bj,ck,dl,abcd->ijkl", J, J, J, J, Mop) / 2
    dense2 = torch.einsum("aij,bkl,ab->ijkl", H, H, I) / 2
    assert abs(float(dense1.norm()) - cov1) <= 1e-10 * cov1
    assert abs(float(dense2.norm()) - cov2) <= 1e-10 * cov2
    # the diagonal of the dense Cov(Î₁) is N V₁ / N = fisher_variance (M = 1): ties the two worlds together
    V1 = flat(fisher_variance(model, x, likelihood=lik, estimator="mc1", n_samples=2))
    idx = torch.arange(J.shape[1])
    torch.testing.assert_close(dense1[idx, idx, idx, idx], V1, rtol=1e-10, atol=0)


def test_frobenius_bounds_invalid_arguments():
    model = mlp("sigmoid", widths=(3, 4, 3), seed=21)
    with pytest.raises(ValueError, match="Invalid n_samples: 0"):
        frobenius_bounds(model, inputs((1, 3)), likelihood="categorical", n_samples=0)


# -- item 12: Î₂ negativity and its deterministic lower bound ---------------------------------------------
# (The full-matrix result of Soen & Sun 2021, Thm 11, lambda_min(Î₂) >= -sum_a rho(d²h_a) |η_a - t̄_a|, used to be
# checked here too, on P x P matrices built in the test itself: that exercised no library code, since
# fisher_optim never forms the full Î₂, so it was removed.  The statement is in docs/fisher-math.md §4.1.)
@pytest.mark.parametrize("n_samples", [1, 2, 3])
def test_mc2_lower_bound_on_every_draw(n_samples):
    """For every enumerated label tuple, the library's estimates (``diagonal_fisher`` with those labels):
    Î₂(θ_i) >= F_i - sum_a |u_ia| |t̄_a - η_a| (docs/fisher-math.md §4.3), some Î₂ < 0 (so the bound
    matters), Î₁ >= 0, and both equal the brute-force per-draw values (u, v from torch.func)."""
    model = mlp("sigmoid", widths=(2, 3, 3), seed=41)
    x = inputs((1, 2), seed=42)
    lik = Categorical()
    names, h, J, U = per_input_derivatives(model, x, lik)
    labels, probs = enumerate_draws(lik, h, n_samples)
    ref1, ref2 = estimators_per_draw(lik, h, J, U, labels)
    F = flat(diagonal_fisher(model, x, likelihood=lik, estimator="exact"))
    torch.testing.assert_close(F, exact_diag(lik, h, J), rtol=1e-10, atol=0)
    scale = float(F.abs().max())
    negative = False
    for t, lab in enumerate(labels):  # lab: (N, M) labels of this draw
        i1 = flat(diagonal_fisher(model, x, likelihood=forced(lik, lab), estimator="mc1", n_samples=n_samples))
        i2 = flat(diagonal_fisher(model, x, likelihood=forced(lik, lab), estimator="mc2", n_samples=n_samples))
        torch.testing.assert_close(i1, ref1[t], rtol=1e-10, atol=1e-14 * scale)
        torch.testing.assert_close(i2, ref2[t], rtol=1e-10, atol=1e-14 * scale)
        gap = (torch.softmax(h[0], -1) - torch.nn.functional.one_hot(lab[:, 0], 3).to(DTYPE).mean(0)).abs()
        lower = F - gap @ U[0].abs()  # |t̄ - η| from the one-hot labels and the softmax, by hand
        assert bool((i2 >= lower - 1e-12 * scale).all())
        assert bool((i1 >= 0).all())
        negative |= bool((i2 < 0).any())
    assert negative  # Î₂ does go negative on some parameters for some draws
