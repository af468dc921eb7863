"""diagonal_fisher against brute-force float64 references
(docs/fisher-math.md §2, §3, §6, §7, §10 items 1, 2, 4, 6, 8, 9).

Every expected value comes from ``tests/reference.py``: ``J = dh/dtheta`` and ``U = diag d^2 h/dtheta^2`` per
input by ``torch.func`` (jacrev/hessian), and the estimator formulas written directly on them.  Sampled labels
are reproduced with an identically seeded ``torch.Generator`` (``diagonal_fisher`` makes one
``likelihood.sample(h, n_samples, generator)`` call) or forced through a likelihood whose ``sample`` returns
chosen labels.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import (
    DTYPE,
    ESTIMATOR_NAMES,
    LIKELIHOOD_NAMES,
    MODELS,
    assert_params_close,
    data_targets,
    draw_labels,
    forced,
    gen,
    init_,
    inputs,
    make_likelihood,
    mlp,
    model_output,
    reference_case,
)
from reference import (
    closed_form_variances,
    empirical_diag,
    exact_diag,
    mc1_diag,
    mc2_diag,
    per_input_derivatives,
    split,
)
from torch import nn

from fisher_optim import diagonal_fisher, estimate_plan
from fisher_optim.hessian import plan
from fisher_optim.likelihoods import Bernoulli, Categorical, Gaussian, Poisson

pytestmark = pytest.mark.usefixtures("single_thread")

LABEL_SEED = 11


def expected_for(estimator, lik, model, x, names, h, J, U, n_samples, seed, targets=None):
    """Flat expected vector for one estimator call (labels reproduced from ``seed``)."""
    if estimator == "exact":
        return exact_diag(lik, h, J)
    if estimator == "empirical":
        return empirical_diag(lik, h, J, lik.check_targets(h, targets))
    y = draw_labels(model, x, lik, n_samples, seed)
    if estimator == "mc1":
        return mc1_diag(lik, h, J, y)
    return mc2_diag(lik, h, J, U, y)


# -- 1. every estimator vs brute force ----------------------------------------------------------------
STANDARD = [f"{k}-{a}" for k in ("mlp", "cnn") for a in ("sigmoid", "tanh", "relu")]


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
@pytest.mark.parametrize("batch", [3, 4])
@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("model_name", STANDARD + ["token-linear", "nested-flatten"])
def test_matches_bruteforce(model_name, lik_name, batch, estimator):
    model, x, names, h, J, U = reference_case(model_name, batch)
    lik = make_likelihood(lik_name)
    n_samples = 2 if batch == 3 else 1
    targets = data_targets(lik, h) if estimator == "empirical" else None
    kwargs = {"targets": targets} if estimator == "empirical" else {}
    if estimator in ("mc1", "mc2"):
        kwargs = {"n_samples": n_samples, "generator": gen(LABEL_SEED)}
    out = diagonal_fisher(model, x, likelihood=lik, estimator=estimator, **kwargs)
    exp = expected_for(estimator, lik, model, x, names, h, J, U, n_samples, LABEL_SEED, targets)
    assert_params_close(out, split(model, names, exp))


def test_standard_models_cover_the_intended_routes():
    """The table above exercises the chain route (MLP) and the HVP route (CNN, Linear on (B, T, d))."""
    routes = {}
    for name in ("mlp-sigmoid", "mlp-relu", "cnn-tanh", "cnn-relu", "token-linear", "nested-flatten"):
        model = MODELS[name][0]()
        routes[name] = plan(model, dict(model.named_parameters())).route
    assert routes == {
        "mlp-sigmoid": "chain",
        "mlp-relu": "zero",
        "cnn-tanh": "hvp",
        "cnn-relu": "zero",
        "token-linear": "hvp",
        "nested-flatten": "chain",
    }


@pytest.mark.parametrize("n_samples", [1, 5])
@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
def test_sampled_estimators_any_n(estimator, n_samples):
    model, x, names, h, J, U = reference_case("mlp-tanh", 4)
    lik = Categorical()
    for seed in (0, 1, 2):
        out = diagonal_fisher(
            model, x, likelihood=lik, estimator=estimator, n_samples=n_samples, generator=gen(seed)
        )
        exp = expected_for(estimator, lik, model, x, names, h, J, U, n_samples, seed)
        assert_params_close(out, split(model, names, exp))


def test_generator_none_uses_global_rng():
    model, x, names, h, J, U = reference_case("mlp-sigmoid", 4)
    lik = Categorical()
    torch.manual_seed(123)
    out = diagonal_fisher(model, x, likelihood=lik, estimator="mc1", n_samples=3)
    torch.manual_seed(123)
    y = lik.sample(lik.flatten(model(x)).detach(), 3)
    assert_params_close(out, split(model, names, mc1_diag(lik, h, J, y)))


def test_sample_called_once_with_detached_batch_output():
    model, x, names, h, J, U = reference_case("mlp-sigmoid", 4)
    labels = torch.randint(0, 3, (2, 4), generator=gen(0))
    for estimator in ("mc1", "mc2"):
        lik = forced(Categorical(), labels)
        diagonal_fisher(model, x, likelihood=lik, estimator=estimator, n_samples=2)
        assert lik.calls == [((4, 3), 2, False)]


# -- 2. docs/fisher-math.md §10 item 1: exact enumeration over all label tuples ----------------------------------------
@pytest.mark.parametrize("n_samples", [1, 2])
@pytest.mark.parametrize("classes", [2, 3, 4])
def test_enumeration_mean_and_variance(classes, n_samples):
    """E[Î₁] = E[Î₂] = F and Var = closed-form V₁, V₂, by summing over all C^N label tuples (no Monte Carlo).

    Also: ``diagonal_fisher`` fed each tuple (through a likelihood whose ``sample`` returns it) returns the
    formula, and the probability-weighted sum of its outputs is its own ``exact`` output.
    """
    model = mlp("sigmoid", widths=(3, 4, classes), seed=classes)
    x = inputs((2, 3), seed=classes)
    lik = Categorical()
    names, h, J, U = per_input_derivatives(model, x, lik)
    p = torch.softmax(h, -1)
    tuples = list(itertools.product(range(classes), repeat=n_samples))
    assert len(tuples) == classes**n_samples
    for m in range(x.shape[0]):
        hm, Jm, Um, xm = h[m : m + 1], J[m : m + 1], U[m : m + 1], x[m : m + 1]
        F = exact_diag(lik, hm, Jm)
        V1, V2 = closed_form_variances(lik, hm, Jm, Um, n_samples)
        probs = torch.stack([math.prod(p[m, c] for c in t) for t in tuples])
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=DTYPE), rtol=1e-14, atol=0)
        est1 = torch.stack([mc1_diag(lik, hm, Jm, torch.tensor(t).view(-1, 1)) for t in tuples])
        est2 = torch.stack([mc2_diag(lik, hm, Jm, Um, torch.tensor(t).view(-1, 1)) for t in tuples])
        for est, V in ((est1, V1), (est2, V2)):
            mean = probs @ est
            var = probs @ (est - mean) ** 2
            scale = float(F.abs().max())
            torch.testing.assert_close(mean, F, rtol=1e-10, atol=1e-12 * scale)
            torch.testing.assert_close(var, V, rtol=1e-10, atol=1e-12 * scale**2)
        # the library, one forced label tuple at a time
        exact = diagonal_fisher(model, xm, likelihood=lik, estimator="exact")
        for estimator, est in (("mc1", est1), ("mc2", est2)):
            weighted = {n: torch.zeros_like(v) for n, v in exact.items()}
            for t, pt, e in zip(tuples, probs, est):
                labels = torch.tensor(t).view(-1, 1)
                out = diagonal_fisher(
                    model, xm, likelihood=forced(lik, labels), estimator=estimator, n_samples=n_samples
                )
                assert_params_close(out, split(model, names, e))
                for n in weighted:
                    weighted[n] += pt * out[n]
            assert_params_close(weighted, exact)


# -- 3. docs/fisher-math.md §10 item 4: zero-variance identities -----------------------------------------------------
def last_layer_names(model):
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    ids = {id(p) for p in last.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("model_name", ["mlp-sigmoid", "cnn-tanh", "token-linear"])
def test_mc2_exact_on_last_layer(model_name, lik_name):
    model, x, names, h, J, U = reference_case(model_name, 4)
    lik = make_likelihood(lik_name)
    exact = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
    last = last_layer_names(model)
    assert len(last) == 2
    moved = 0.0
    for seed in range(4):
        out = diagonal_fisher(model, x, likelihood=lik, estimator="mc2", n_samples=1 + seed, generator=gen(seed))
        assert_params_close({n: out[n] for n in last}, {n: exact[n] for n in last}, rtol=1e-12)
        moved = max(moved, max(float((out[n] - exact[n]).abs().max()) for n in out if n not in last))
    assert moved > 1e-6  # the other layers did see the sampled labels


class ZeroOutput(nn.Module):
    """``h = g(x) - g(x).detach()``: exactly 0 (p = 1/2) with the Jacobian of the MLP ``g``."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        out = self.g(x)
        return out - out.detach()


@pytest.mark.parametrize("n_samples", [1, 3])
def test_mc1_exact_for_bernoulli_at_half(n_samples):
    g = mlp("sigmoid", widths=(3, 4, 1), seed=4)
    model = ZeroOutput(g)
    x = inputs((3, 3), seed=4)
    lik = Bernoulli()
    assert torch.equal(model(x), torch.zeros(3, 1, dtype=DTYPE))
    names, h, J, _ = per_input_derivatives(model, x, lik, hessians=False)
    exact = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
    assert_params_close(exact, split(model, names, (J[:, 0] ** 2).mean(0) / 4))
    for seed in range(5):
        out = diagonal_fisher(model, x, likelihood=lik, estimator="mc1", n_samples=n_samples, generator=gen(seed))
        assert_params_close(out, exact, rtol=1e-12)
    # control: the same network with its own (nonzero) output is random under mc1
    outs = [diagonal_fisher(g, x, likelihood=lik, estimator="mc1", generator=gen(s)) for s in range(3)]
    assert any(not torch.allclose(o["0.weight"], outs[0]["0.weight"]) for o in outs[1:])


@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
@pytest.mark.parametrize("model_name", ["mlp-relu", "cnn-relu"])
def test_mc2_exact_for_relu_networks(model_name, lik_name):
    model, x, names, h, J, U = reference_case(model_name, 4)
    assert float(U.abs().max()) == 0.0  # piecewise linear: d^2 h / d theta_i^2 = 0 (a.e.)
    lik = make_likelihood(lik_name)
    exact = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
    for seed in range(3):
        out = diagonal_fisher(model, x, likelihood=lik, estimator="mc2", n_samples=2, generator=gen(seed))
        assert_params_close(out, exact, rtol=1e-12)


@pytest.mark.parametrize(
    "lik,out_features",
    [(Gaussian(), 1), (Gaussian(sigma=2.0), 2), (Bernoulli(), 1), (Categorical(), 3), (Poisson(), 2)],
    ids=["linear-regression", "gaussian-sigma2", "logistic", "multinomial-logistic", "poisson-regression"],
)
def test_mc2_exact_for_glm(lik, out_features):
    model = init_(nn.Linear(4, out_features), seed=5)
    x = inputs((6, 4), seed=5)
    names, h, J, _ = per_input_derivatives(model, x, lik, hessians=False)
    exact = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
    assert_params_close(exact, split(model, names, exact_diag(lik, h, J)))
    for seed in range(3):
        out = diagonal_fisher(model, x, likelihood=lik, estimator="mc2", n_samples=1, generator=gen(seed))
        assert_params_close(out, exact, rtol=1e-12)


# -- 4. docs/fisher-math.md §10 item 8: the diagonal-only Hessian propagation is wrong ---------------------------------
def recursions(model, x):
    """Per-input diagonal output Hessians of every Linear weight of a sigmoid MLP, by two recursions.

    ``full``: H_l = D_l W_{l+1}^T H_{l+1} W_{l+1} D_l + diag(sigma''(z_l) * (B_{l+1} W_{l+1})[a])
    (docs/fisher-math.md §7.1).
    ``diag_only``: the same with diag(W^T H W) replaced by (W*W)^T diag(H) — the tempting, wrong shortcut.
    Returns ``{name: (C, *shape)}`` for each.
    """
    lins = [m for m in model if isinstance(m, nn.Linear)]
    L = len(lins)
    W = [lin.weight.detach() for lin in lins]
    acts, zs = [x], []
    for i, lin in enumerate(lins):
        z = lin(acts[-1]).detach()
        zs.append(z)
        if i < L - 1:
            acts.append(torch.sigmoid(z))
    s = [torch.sigmoid(z) for z in zs]
    d1 = [si * (1 - si) for si in s]
    d2 = [d * (1 - 2 * si) for d, si in zip(d1, s)]
    C = zs[-1].shape[-1]
    B = [None] * L
    B[L - 1] = torch.eye(C, dtype=DTYPE)
    for i in range(L - 2, -1, -1):
        B[i] = (B[i + 1] @ W[i + 1]) * d1[i]
    H = [None] * L
    H[L - 1] = torch.zeros(C, C, C, dtype=DTYPE)
    Gw = [None] * L
    Gw[L - 1] = torch.zeros(C, C, dtype=DTYPE)
    for i in range(L - 2, -1, -1):
        resid = d2[i] * (B[i + 1] @ W[i + 1])  # (C, n_i)
        D = torch.diag(d1[i])
        H[i] = D @ W[i + 1].T @ H[i + 1] @ W[i + 1] @ D + torch.diag_embed(resid)
        Gw[i] = d1[i] ** 2 * (Gw[i + 1] @ (W[i + 1] ** 2)) + resid
    names = [n for n, _ in model.named_parameters()]
    full, diag_only = {}, {}
    for i in range(L):
        a2 = acts[i] ** 2
        g_full = torch.diagonal(H[i], dim1=-2, dim2=-1)
        full[names[2 * i]] = g_full[:, :, None] * a2
        full[names[2 * i + 1]] = g_full
        diag_only[names[2 * i]] = Gw[i][:, :, None] * a2
        diag_only[names[2 * i + 1]] = Gw[i]
    return full, diag_only


def test_diagonal_only_hessian_propagation_fails():
    model = mlp("sigmoid", widths=(3, 4, 4, 4, 2), seed=3)  # four Linear layers: the first one needs full H
    assert plan(model, dict(model.named_parameters())).route == "chain"
    x = inputs((2, 3), seed=3)
    lik = Categorical()
    names, h, J, U = per_input_derivatives(model, x, lik)
    labels = torch.tensor([[1, 0]])
    gbar = lik.grad(h, labels).mean(0)  # (M, C)
    F = split(model, names, exact_diag(lik, h, J))
    right = {n: F[n].clone() for n in F}
    wrong = {n: F[n].clone() for n in F}
    for m in range(x.shape[0]):
        Um = split(model, names, U[m])
        full, diag_only = recursions(model, x[m])
        worst = 0.0
        for n in names:
            torch.testing.assert_close(full[n], Um[n], rtol=1e-10, atol=1e-13)
            worst = max(worst, float((diag_only[n] - Um[n]).abs().max() / Um[n].abs().max()))
            right[n] += torch.einsum("a,a...->...", gbar[m], Um[n]) / x.shape[0]
            wrong[n] += torch.einsum("a,a...->...", gbar[m], diag_only[n]) / x.shape[0]
        # the last three layers see a diagonal H_{l+1}: the shortcut is exact there, and wrong on layer 0
        for n in names[2:]:
            torch.testing.assert_close(diag_only[n], Um[n], rtol=1e-10, atol=1e-13)
        assert worst > 1e-2
    out = diagonal_fisher(model, x, likelihood=forced(lik, labels), estimator="mc2")
    assert_params_close(out, right)
    assert not torch.allclose(out["0.weight"], wrong["0.weight"], rtol=1e-3, atol=0)


# -- 5. docs/fisher-math.md §10 item 9: per-sample squares, not the squared batch gradient ----------------------------
def test_per_sample_square_trick():
    model = mlp("tanh", widths=(3, 5, 4), seed=9)
    x = inputs((4, 3), seed=9)
    lik = Categorical()
    n_samples, seed = 3, 21
    y = draw_labels(model, x, lik, n_samples, seed)  # (N, B)
    params = dict(model.named_parameters())
    loop = {n: torch.zeros_like(p) for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(x.shape[0]):
        for k in range(n_samples):
            nll = lik.nll(model(x[b : b + 1]), y[k, b : b + 1]).sum()
            grads = torch.autograd.grad(nll, list(params.values()))
            for n, g in zip(params, grads):
                loop[n] += g**2
                total[n] += g
    # (G o G)^T (A o A) on the last Linear: rows = (sample, input) pairs
    with torch.no_grad():
        a = model[1](model[0](x))  # (B, 5) last-layer inputs
        h = model(x)
    G = lik.grad(h, y).reshape(-1, h.shape[1])  # (N*B, C) output gradients
    A = a.repeat(n_samples, 1)  # (N*B, 5), rows aligned with G
    torch.testing.assert_close((G * G).T @ (A * A), loop["2.weight"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((G * G).sum(0), loop["2.bias"], rtol=1e-12, atol=1e-14)
    pairs = x.shape[0] * n_samples
    out = diagonal_fisher(model, x, likelihood=lik, estimator="mc1", n_samples=n_samples, generator=gen(seed))
    assert_params_close(out, {n: v / pairs for n, v in loop.items()})
    # the squared batch gradient (any scaling: mean^2, B * mean^2) is a different, biased quantity
    for n in params:
        mean_sq = (total[n] / pairs) ** 2
        for candidate in (mean_sq, pairs * mean_sq):
            rel = float((candidate - out[n]).norm() / out[n].norm())
            assert rel > 0.1, n


# -- 6. Monte-Carlo unbiasedness with the closed-form error bar (docs/fisher-math.md §10 items 2, 3) -------------------
def monte_carlo(lik_name, estimator, reps, n_samples, seed=0):
    model = mlp("sigmoid", widths=(2, 3, 3), seed=17)
    x = inputs((2, 2), seed=17)
    lik = make_likelihood(lik_name)
    names, h, J, U = per_input_derivatives(model, x, lik)
    F = exact_diag(lik, h, J)
    V1, V2 = closed_form_variances(lik, h, J, U, n_samples)
    V = V1 if estimator == "mc1" else V2
    g = gen(seed)
    draws = torch.stack(
        [
            torch.cat(
                [
                    v.reshape(-1)
                    for v in diagonal_fisher(
                        model, x, likelihood=lik, estimator=estimator, n_samples=n_samples, generator=g
                    ).values()
                ]
            )
            for _ in range(reps)
        ]
    )
    return F, V, draws


def check_unbiased(F, V, draws, z=5.0):
    reps = draws.shape[0]
    zero = V <= 1e-28 * V.max()
    assert (~zero).sum() > 0
    scale = float(F.abs().max())
    torch.testing.assert_close(draws[:, zero], F[zero].expand(reps, -1), rtol=1e-12, atol=1e-12 * scale)
    err = (draws[:, ~zero].mean(0) - F[~zero]).abs()
    bound = z * (V[~zero] / reps).sqrt()
    assert bool((err <= bound).all()), (err / bound).max()
    return zero


@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
def test_unbiased_monte_carlo(lik_name, estimator):
    F, V, draws = monte_carlo(lik_name, estimator, reps=2000, n_samples=1)
    zero = check_unbiased(F, V, draws)
    # mc2 is exact on the last layer (3 x 3 weight + 3 bias = the last 12 entries); mc1 nowhere here
    assert zero.sum() == (12 if estimator == "mc2" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
def test_unbiased_and_variance_monte_carlo_heavy(lik_name, estimator):
    """R = 20000 calls with N = 2: mean within 5 sigma, and |s^2 - V| <= 5 sqrt((m4 - s^4)/R)
    (docs/fisher-math.md §10, item 3)."""
    F, V, draws = monte_carlo(lik_name, estimator, reps=20000, n_samples=2, seed=1)
    zero = check_unbiased(F, V, draws)
    d = draws[:, ~zero]
    reps = d.shape[0]
    c = d - d.mean(0)
    s2 = (c**2).sum(0) / (reps - 1)
    m4 = (c**4).mean(0)
    bound = 5 * ((m4 - s2**2).clamp_min(0) / reps).sqrt()
    assert bool(((s2 - V[~zero]).abs() <= bound).all()), ((s2 - V[~zero]).abs() / bound).max()


# -- 7. the mean-over-inputs scaling -------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
@pytest.mark.parametrize("lik_name", LIKELIHOOD_NAMES)
def test_scaling_contract(lik_name, estimator):
    model, x, names, h, J, U = reference_case("mlp-sigmoid", 4)
    lik = make_likelihood(lik_name)
    M, N = x.shape[0], 2
    targets = data_targets(lik, h)
    labels = draw_labels(model, x, lik, N, LABEL_SEED)

    def call(xx, reduction="mean", idx=None):
        reps = xx.shape[0] // M if idx is None else 1
        sel = slice(None) if idx is None else slice(idx, idx + 1)
        kw = {"reduction": reduction}
        if estimator == "empirical":
            kw["targets"] = torch.cat([targets[sel]] * reps)
        lk = lik
        if estimator in ("mc1", "mc2"):
            lk = forced(lik, torch.cat([labels[:, sel]] * reps, dim=1))
            kw["n_samples"] = N
        return diagonal_fisher(model, xx, likelihood=lk, estimator=estimator, **kw)

    base = call(x)
    # duplicating the batch changes nothing (mean over inputs)
    assert_params_close(call(torch.cat([x, x, x])), base)
    # reduction="sum" is M times the mean
    assert_params_close(call(x, "sum"), {n: M * v for n, v in base.items()})
    # one input: the per-input Fisher; the batch result is the mean of those
    singles = [call(x[m : m + 1], idx=m) for m in range(M)]
    for m, single in enumerate(singles):
        if estimator == "exact":
            assert_params_close(single, split(model, names, exact_diag(lik, h[m : m + 1], J[m : m + 1])))
        assert_params_close(call(x[m : m + 1], "sum", idx=m), single)
    assert_params_close(base, {n: sum(s[n] for s in singles) / M for n in base})



def test_mc2_random_stream_where_every_residual_is_zero():
    """Î₂ on a ReLU network is the exact Fisher (every residual zero) and needs no labels: ``diagonal_fisher`` still
    draws its ``N`` (one ``lik.sample`` call, as it always has: its random stream is unchanged), ``estimate_plan``
    draws none (as the optimizers' refreshes always have); the estimates are the exact Fisher either way."""
    model, x, lik = mlp("relu"), inputs((5, 3)), make_likelihood("categorical")
    assert plan(model, dict(model.named_parameters())).route == "zero"
    exact = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
    g, drawn = gen(0), gen(0)
    got = diagonal_fisher(model, x, likelihood=lik, estimator="mc2", n_samples=3, generator=g)
    lik.sample(model_output(model, x, lik), 3, generator=drawn)
    assert torch.equal(g.get_state(), drawn.get_state())
    g = gen(0)
    uniform = {n: ("mc2", 3) for n, _ in model.named_parameters()}
    got_plan = estimate_plan(model, x, likelihood=lik, plan=uniform, generator=g)
    assert torch.equal(g.get_state(), gen(0).get_state())
    for n in exact:
        assert torch.equal(got[n], exact[n]) and torch.equal(got_plan[n], exact[n])
