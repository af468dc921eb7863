"""Outputs with positions (docs/fisher-math.md §12): language models, token taggers, 1-D segmentation, with masks.

The reference is written from the definitions, independently of the library's likelihood code: per input
``m``, the raw model output is brought to ``(T, C)`` (classes last), its Jacobian ``J_t = dh_t/dtheta`` and
the diagonal of its Hessian ``U_t`` come from ``torch.func`` in float64, and

* exact:  ``F(x) = sum_t w_t diag(J_t^T (diag p_t - p_t p_t^T) J_t)`` (``w_t = 0`` at masked positions);
* Î₁:     the square of the whole input's score ``g = sum_t w_t J_t^T (p_t - e_{y_t})``, labels drawn at every
  position; its variance ``sum_t kappa_t + 2 F^2`` and Î₂'s ``sum_t w_t u_t^T I_t u_t`` per input;
* the per-input moments are checked once more by enumerating every label sequence (``C^T`` of them).

Models: a per-position MLP tagger, MLPs whose output is unflattened to positions, a Conv1d segmenter with the
``class_dim=1`` layout, and tiny causal Transformer and LSTM language models (benchmarks/lm_data.py; their
Embedding, LayerNorm, attention and LSTM parameters take the engine's general route).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DTYPE, gen, init_
from reference import flat_params, split, unflatten
from torch import nn
from torch.func import functional_call, hessian, jacrev

from benchmarks.lm_data import char_lstm, char_transformer
from fisher_optim import EWC, Categorical, FisherAdam, diagonal_fisher, fisher_variance

pytestmark = pytest.mark.usefixtures("single_thread")

M, T, C, V = 3, 3, 4, 4  # inputs, positions, classes (tagger/segmenter), vocabulary (LM)


# -- models ---------------------------------------------------------------------------------------------
def tagger(seed: int = 0) -> nn.Module:
    """A tanh MLP applied at every position: (M, T, 3) -> (M, T, C)."""
    return init_(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)), seed)


def tagger_inputs(seed: int = 1):
    return torch.randn(M, T, 3, generator=gen(seed), dtype=DTYPE)


def segmenter(seed: int = 0) -> nn.Module:
    """Conv1d segmenter: (M, 2, L) -> (M, C, L), the F.cross_entropy layout."""
    return init_(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, C, 1)), seed)


def segmenter_inputs(seed: int = 1):
    return torch.randn(M, 2, T, generator=gen(seed), dtype=DTYPE)


def unflattened(class_dim: int, seed: int = 0) -> nn.Module:
    """An MLP whose last Linear (2-D input) is reshaped to (M, T, C) or (M, C, T): the output layer's seedless
    exact rule (classes last: h is that Linear's output) and the Î₂ routes see positions through a reshape."""
    shape = (T, C) if class_dim == -1 else (C, T)
    return init_(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, T * C), nn.Unflatten(1, shape)), seed)


def flat_inputs(seed: int = 1):
    return torch.randn(M, 3, generator=gen(seed), dtype=DTYPE)


def transformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # nn.MultiheadAttention initialises from the global RNG; init_ overwrites it all
    return init_(char_transformer(vocab=V, d_model=4, n_heads=2, n_layers=1, max_len=T, dim_ff=6), seed, 1.0)


def lstm(seed: int = 0) -> nn.Module:
    return init_(char_lstm(vocab=V, d_embed=3, hidden=3), seed, 1.0)


def token_inputs(seed: int = 1):
    return torch.randint(0, V, (M, T), generator=gen(seed))


CASES = {
    "tagger": (tagger, tagger_inputs, Categorical),
    "segmenter": (segmenter, segmenter_inputs, lambda: Categorical(class_dim=1)),
    "transformer": (transformer, token_inputs, Categorical),
    "lstm": (lstm, token_inputs, Categorical),
    "unflatten-last": (lambda: unflattened(-1), flat_inputs, Categorical),
    "unflatten-first": (lambda: unflattened(1), flat_inputs, lambda: Categorical(class_dim=1)),
}

#: targets with masked positions (ignore_index = -100): a partly masked input, a full one, an all-masked one
MASKED = torch.tensor([[0, -100, 2], [1, 3, 0], [-100, -100, -100]])
FULL = torch.tensor([[0, 1, 2], [1, 3, 0], [2, 2, 1]])


# -- float64 brute force ------------------------------------------------------------------------------
def brute(model, x, class_dim=-1, hessians=False):
    """Per input: p (T, C), J (T, C, P), U (T, C, P) or None; the raw output with classes last."""
    names, flat = flat_params(model)
    model.eval()

    def f(theta, xm):
        out = functional_call(model, unflatten(model, names, theta), (xm.unsqueeze(0),))[0]
        out = out.movedim(class_dim - 1 if class_dim > 0 else class_dim, -1)
        return out.reshape(-1, out.shape[-1])

    ps, Js, Us = [], [], []
    for m in range(x.shape[0]):
        ps.append(torch.softmax(f(flat, x[m]), -1).detach())
        Js.append(jacrev(f)(flat, x[m]))
        if hessians:
            Us.append(torch.diagonal(hessian(f)(flat, x[m]), dim1=-2, dim2=-1))
    return names, torch.stack(ps), torch.stack(Js), (torch.stack(Us) if hessians else None)


def weights(targets):
    return torch.ones(M, T, dtype=DTYPE) if targets is None else (targets != -100).to(DTYPE)


def info(p):
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def exact_per_input(p, J, w):
    """(M, P): sum_t w_t diag(J_t^T I_t J_t)."""
    return torch.einsum("mt,mtap,mtab,mtbp->mp", w, J, info(p), J)


def moments_per_input(p, J, w, U=None):
    """Per input (M, P): F, the single-draw variance of Î₁ (sum_t kappa_t + 2 F^2) and of Î₂."""
    s = torch.eye(p.shape[-1], dtype=DTYPE) - p.unsqueeze(-2)  # (M, T, y, C): rows e_y - p_t
    u = torch.einsum("mtyc,mtcp->mtyp", s, J)  # v_t^T (e_y - p_t) for every label y
    q = torch.einsum("mty,mtyp->mtp", p, u**2)
    kappa = torch.einsum("mty,mtyp->mtp", p, u**4) - 3 * q**2
    f = torch.einsum("mt,mtp->mp", w, q)
    v1 = torch.einsum("mt,mtp->mp", w, kappa) + 2 * f**2
    v2 = None if U is None else torch.einsum("mt,mtap,mtab,mtbp->mp", w, U, info(p), U)
    return f, v1, v2


# -- exact against brute force ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_exact_matches_bruteforce(case, masked):
    make, make_x, make_lik = CASES[case]
    model, x = make(), make_x()
    targets = MASKED if masked else None
    lik = make_lik()
    names, p, J, _ = brute(model, x, lik.class_dim)
    ref = split(model, names, exact_per_input(p, J, weights(targets)).mean(0))
    got = diagonal_fisher(model, x, likelihood=lik, estimator="exact", targets=targets)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    if masked:
        full = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
        assert any(not torch.allclose(full[n], got[n]) for n in names)


def test_exact_chunked_over_positions(monkeypatch):
    """The exact seeds go in chunks of positions when T*C*B*D is large: same result with one position a chunk."""
    import fisher_optim.seeds as seeds

    model, x = tagger(), tagger_inputs()
    whole = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=MASKED)
    monkeypatch.setattr(seeds, "EXACT_SEED_ELEMENTS", 1)
    chunked = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=MASKED)
    for n in whole:
        torch.testing.assert_close(chunked[n], whole[n], rtol=1e-12, atol=1e-14)


def test_exact_skips_positions_masked_in_every_input():
    """Padding at the same positions of every input: no seeds there, same Fisher as the unpadded inputs."""
    model, x = tagger(), tagger_inputs()
    y = FULL.clone()
    y[:, 1] = -100
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=y)
    ref = diagonal_fisher(model, x[:, [0, 2]], likelihood="categorical", estimator="exact")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)
    none = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=torch.full((M, T), -100))
    assert all(float(v.abs().max()) == 0 for v in none.values())


def test_one_input_is_the_sum_over_its_positions():
    """A per-position tagger: one input's Fisher is the sum of its positions' Fisher (the mean stays over inputs)."""
    model, x = tagger(), tagger_inputs()
    seq = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    flat = diagonal_fisher(model, x.reshape(M * T, 3), likelihood="categorical", estimator="exact", reduction="sum")
    for n in seq:
        torch.testing.assert_close(seq[n] * M, flat[n], rtol=1e-10, atol=1e-14)


def test_class_dim_1_equals_classes_last():
    model, x = segmenter(), segmenter_inputs()

    class Permuted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(z).transpose(1, 2)  # (M, C, L) -> (M, L, C)

    a = diagonal_fisher(model, x, likelihood=Categorical(class_dim=1), estimator="exact", targets=MASKED)
    b = diagonal_fisher(Permuted(model), x, likelihood="categorical", estimator="exact", targets=MASKED)
    for n in a:
        torch.testing.assert_close(a[n], b["inner." + n], rtol=1e-12, atol=1e-14)


def test_masked_input_without_positions():
    """(B, C) outputs: a target of -100 drops that input from the sum; the mean still divides by M."""
    model = init_(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)), 0)
    x = torch.randn(M, 3, generator=gen(2), dtype=DTYPE)
    y = torch.tensor([0, -100, 3])
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=y)
    keep = diagonal_fisher(model, x[[0, 2]], likelihood="categorical", estimator="exact", reduction="sum")
    for n in got:
        torch.testing.assert_close(got[n] * M, keep[n], rtol=1e-12, atol=1e-14)


# -- empirical and the one-seed-per-draw Î₁ ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_empirical_matches_bruteforce(case):
    make, make_x, make_lik = CASES[case]
    model, x = make(), make_x()
    lik = make_lik()
    names, p, J, _ = brute(model, x, lik.class_dim)
    w = weights(MASKED)
    onehot = torch.nn.functional.one_hot(MASKED.clamp_min(0), V if case in ("transformer", "lstm") else C).to(DTYPE)
    g = torch.einsum("mt,mtc,mtcp->mp", w, p - onehot, J)
    ref = split(model, names, (g**2).mean(0))
    got = diagonal_fisher(model, x, likelihood=lik, estimator="empirical", targets=MASKED)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_mc1_squares_the_whole_input_score(masked):
    """With the same generator seed, Î₁ (N = 2) is the mean of the squared whole-sequence scores of the labels
    ``Categorical.sample`` draws at every position: one seed per draw, not one per position."""
    model, x = tagger(), tagger_inputs()
    targets = MASKED if masked else None
    names, p, J, _ = brute(model, x)
    lik = Categorical()
    h = lik.flatten(model(x).detach())
    y = lik.sample(h, 2, generator=gen(7))  # (N, M, T)
    assert y.shape == (2, M, T)
    onehot = torch.nn.functional.one_hot(y, C).to(DTYPE)
    g = torch.einsum("mt,nmtc,mtcp->nmp", weights(targets), p - onehot, J)
    ref = split(model, names, (g**2).mean((0, 1)))
    got = diagonal_fisher(
        model, x, likelihood="categorical", estimator="mc1", n_samples=2, generator=gen(7), targets=targets
    )
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


# -- closed-form variances ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tagger", "segmenter", "unflatten-last", "unflatten-first"])
@pytest.mark.parametrize("masked", [False, True])
def test_fisher_variance_matches_bruteforce(case, masked):
    make, make_x, make_lik = CASES[case]
    model, x = make(), make_x()
    targets = MASKED if masked else None
    lik = make_lik()
    names, p, J, U = brute(model, x, lik.class_dim, hessians=True)
    _, v1, v2 = moments_per_input(p, J, weights(targets), U)
    for est, v in (("mc1", v1), ("mc2", v2)):
        ref = split(model, names, v.sum(0) / (3 * M * M))
        got = fisher_variance(model, x, likelihood=lik, estimator=est, n_samples=3, targets=targets)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-8, atol=1e-14)


def test_joint_variance_with_positions():
    """The input part is the population variance over the batch of the per-input (summed over positions) Fisher."""
    from fisher_optim import joint_variance

    model, x = tagger(), tagger_inputs()
    names, p, J, _ = brute(model, x)
    f, v1, _ = moments_per_input(p, J, weights(MASKED))
    got = joint_variance(model, x, likelihood="categorical", estimator="mc1", n_samples=2, targets=MASKED)
    ref_in = split(model, names, f.var(0, unbiased=False) / M)
    ref_out = split(model, names, v1.mean(0) / (2 * M))
    for n in names:
        torch.testing.assert_close(got["input"][n], ref_in[n], rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(got["output"][n], ref_out[n], rtol=1e-8, atol=1e-14)


def test_mc1_moments_by_enumeration():
    """Zero-tolerance identities for one input: over all C^T label sequences, E g_i^2 = F_i and
    Var g_i^2 = sum_t kappa_t + 2 F_i^2 (docs/fisher-math.md §12) -- the whole-sequence score, not per-position
    squares."""
    model, x = tagger(), tagger_inputs()[:1]
    names, p, J, _ = brute(model, x)
    p, J = p[0], J[0]
    eye = torch.eye(C, dtype=DTYPE)
    mean = torch.zeros(J.shape[-1], dtype=DTYPE)
    second = torch.zeros_like(mean)
    for ys in itertools.product(range(C), repeat=T):
        prob = math.prod(float(p[t, y]) for t, y in enumerate(ys))
        g = sum((p[t] - eye[y]) @ J[t] for t, y in enumerate(ys))
        mean += prob * g**2
        second += prob * g**4
    lik = Categorical()
    f = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
    v = fisher_variance(model, x, likelihood=lik, estimator="mc1")
    ref_f, ref_v = split(model, names, mean), split(model, names, second - mean**2)
    for n in names:
        torch.testing.assert_close(f[n], ref_f[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(v[n], ref_v[n], rtol=1e-8, atol=1e-14)


# -- Monte-Carlo unbiasedness with closed-form error bars (docs/fisher-math.md §10) ----------------------------------
@pytest.mark.parametrize("estimator", ["mc1", "mc2"])
@pytest.mark.parametrize("masked", [False, True])
def test_unbiased_with_closed_form_error_bars(estimator, masked):
    """``N`` draws in one call: z = (estimate - exact) / sqrt(closed-form variance) is N(0, 1) per coordinate, so
    every |z| < 5 (Bonferroni-safe over the ~60 coordinates).  The coordinates share a few random labels (they are
    strongly correlated, Î₂'s above all), so the mean of z^2 is only loosely bounded; the variance formula itself
    is checked against brute force and enumeration above."""
    model, x = tagger(), tagger_inputs()
    targets = MASKED if masked else None
    n = 4000
    exact = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=targets)
    est = diagonal_fisher(
        model, x, likelihood="categorical", estimator=estimator, n_samples=n, generator=gen(11), targets=targets
    )
    var = fisher_variance(model, x, likelihood="categorical", estimator=estimator, n_samples=n, targets=targets)
    z = []
    for name in exact:
        ok = var[name] > 1e-24
        assert torch.equal(est[name][~ok], exact[name][~ok]) or torch.allclose(
            est[name][~ok], exact[name][~ok], rtol=1e-9, atol=1e-14
        )
        z.append(((est[name] - exact[name])[ok] / var[name][ok].sqrt()).reshape(-1))
    z = torch.cat(z)
    assert z.numel() >= 20  # Î₂: the first layer only (the last layer's residual is zero)
    assert float(z.abs().max()) < 5.0
    assert float((z**2).mean()) < 9.0


# -- the language models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["transformer", "lstm"])
def test_lm_mc1_unbiased(case):
    """Î₁ on the tiny LMs with masked positions: |z| < 5 against the brute-force closed-form error bars."""
    make, make_x, _ = CASES[case]
    model, x = make(), make_x()
    n = 3000
    exact = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=MASKED)
    est = diagonal_fisher(
        model, x, likelihood="categorical", estimator="mc1", n_samples=n, generator=gen(3), targets=MASKED
    )
    names, p, J, _ = brute(model, x)
    _, v1, _ = moments_per_input(p, J, weights(MASKED))
    var = split(model, names, v1.sum(0) / (n * M * M))
    z = torch.cat([((est[k] - exact[k])[var[k] > 1e-24] / var[k][var[k] > 1e-24].sqrt()).reshape(-1) for k in names])
    assert float(z.abs().max()) < 5.0
    assert float((z**2).mean()) < 9.0


# -- optimizers and EWC take the targets as the mask --------------------------------------------------------
@pytest.mark.parametrize("estimator", ["exact", "auto"])
def test_fisher_adam_masks_with_step_targets(estimator):
    """``opt.step(targets=y)``: the running Fisher is the masked one (same EMA scale as without targets); auto's
    first refresh is exact."""
    x = tagger_inputs()

    def first_refresh(targets):
        model = tagger()
        opt = FisherAdam(model, "categorical", estimator=estimator, fisher_interval=1, clip=None, lr=1e-3)
        loss = model(x).sum()
        loss.backward()
        opt.step(targets=targets)
        return {n: opt.state[p]["fisher_ema"].clone() for n, p in model.named_parameters()}

    plain, masked = first_refresh(None), first_refresh(MASKED)
    f_plain = diagonal_fisher(tagger(), x, likelihood="categorical", estimator="exact")
    f_masked = diagonal_fisher(tagger(), x, likelihood="categorical", estimator="exact", targets=MASKED)
    scale = float(plain["2.bias"][0] / f_plain["2.bias"][0])
    for n in plain:
        torch.testing.assert_close(plain[n], scale * f_plain[n], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(masked[n], scale * f_masked[n], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("estimator", ["exact", "auto"])
def test_ewc_consolidate_masks_with_its_targets(estimator):
    """One batch: exact, and auto (whose first batch's estimate is the selection's exact Fisher), both masked."""
    model, x = tagger(), tagger_inputs()
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator=estimator)
    got = ewc.consolidate(x, MASKED)
    ref = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=MASKED)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-14)


def test_full_targets_change_nothing():
    """Targets without ignore_index are a no-op mask for exact/mc1 (same draws, same result)."""
    model, x = tagger(), tagger_inputs()
    for est in ("exact", "mc1"):
        a = diagonal_fisher(model, x, likelihood="categorical", estimator=est, generator=gen(5))
        b = diagonal_fisher(model, x, likelihood="categorical", estimator=est, generator=gen(5), targets=FULL)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_variance_bounds_with_positions():
    """Î₂'s eigenvalue bounds hold with the per-position projection; Î₁'s are not implemented for sequences."""
    from fisher_optim.bounds import variance_bounds

    model, x = tagger(), tagger_inputs()
    lo, up = variance_bounds(model, x, likelihood="categorical", estimator="mc2")
    v = fisher_variance(model, x, likelihood="categorical", estimator="mc2")
    for n in v:
        assert bool((lo[n] <= v[n] * (1 + 1e-12) + 1e-30).all() and (v[n] <= up[n] * (1 + 1e-12) + 1e-30).all())
    with pytest.raises(NotImplementedError, match="positions"):
        variance_bounds(model, x, likelihood="categorical", estimator="mc1")


@pytest.mark.parametrize("case", ["transformer", "lstm"])
def test_fisher_adam_and_ewc_on_the_tiny_lm(case):
    """The tiny LMs under FisherAdam (mc1, masked targets) and EWC (exact, masked (x, y) pairs)."""
    model, x = CASES[case][0](), token_inputs()
    opt = FisherAdam(model, "categorical", estimator="mc1", fisher_interval=1, lr=1e-2, seed=0)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), MASKED.clamp_min(0))
        loss.backward()
        opt.step(targets=MASKED)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    fisher = {n: opt.state[p]["fisher_ema"] for n, p in model.named_parameters()}
    assert all(bool(torch.isfinite(f).all()) for f in fisher.values())
    assert float(fisher["head.weight"].sum()) > 0
    ewc = EWC(model, likelihood="categorical", lam=1.0, estimator="exact")
    got = ewc.consolidate([(x[:2], MASKED[:2]), (x[2:], MASKED[2:])])
    ref = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=MASKED)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-14)
    assert float(ewc.penalty()) == 0.0  # at the anchor


def test_lm_data_split_vocabulary_and_windows():
    """benchmarks/lm_data.py: a fixed 90/10 split of pydoc_data.topics, a fixed vocabulary, shifted windows."""
    from benchmarks import lm_data

    text = lm_data.load_text()
    train, val = lm_data.corpus("train"), lm_data.corpus("validation")
    assert train.numel() + val.numel() == len(text) and train.numel() == int(0.9 * len(text))
    assert lm_data.VOCAB_SIZE == 97 and int(train.max()) < lm_data.VOCAB_SIZE
    assert float((train == 0).double().mean()) < 5e-3  # almost every character is in the vocabulary (0.13 %)
    assert lm_data.decode(lm_data.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    a = lm_data.windows("validation", 4, 16, generator=gen(0))
    b = lm_data.windows("validation", 4, 16, generator=gen(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])
    with pytest.raises(ValueError, match="Invalid split"):
        lm_data.corpus("test")


@pytest.mark.parametrize("class_dim", [-1, 1])
def test_likelihood_matches_cross_entropy(class_dim):
    """Categorical with positions: nll is F.cross_entropy summed over positions (ignore_index honoured), grad is
    its gradient in the flattened layout, and sample draws one label per position."""
    out = torch.randn(M, T, C, generator=gen(4), dtype=DTYPE)
    if class_dim == 1:
        out = out.transpose(1, 2).contiguous()  # (M, C, T)
    lik = Categorical(class_dim=class_dim)
    h = lik.flatten(out).requires_grad_(True)
    assert h.shape == (M, T * C) and lik.position_shape(h) == (T,)
    y = lik.check_targets(h, MASKED)
    logits = out if class_dim == 1 else out.transpose(1, 2)
    ref = torch.nn.functional.cross_entropy(logits, MASKED, reduction="none").sum(1)
    nll = lik.nll(h, y)
    torch.testing.assert_close(nll, ref, rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(nll.sum(), h)
    torch.testing.assert_close(lik.grad(h.detach(), y), g, rtol=1e-12, atol=1e-14)
    s = lik.sample(h.detach(), 5, generator=gen(0))
    assert s.shape == (5, M, T) and int(s.min()) >= 0 and int(s.max()) < C
