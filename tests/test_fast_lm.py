"""Fast per-layer rules of language-model layers (issue 13, part 4): nn.Embedding, nn.LayerNorm and the projections
of nn.MultiheadAttention, against float64 brute force (per-input Jacobians by ``torch.func.jacrev``).

exact, mc1 and empirical are checked on models with positions ``(M, T, C)``, with and without masked positions;
mc1 through its definition (the empirical Fisher at the labels it draws, same generator).  Each test also checks
that the layer took the fast route (``probe.fast``), not the general one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE, gen, init_
from reference import flat_params, split, unflatten
from torch import nn
from torch.func import functional_call, jacrev

from fisher_optim import Categorical, diagonal_fisher
from fisher_optim.engine import Probe
from fisher_optim.layers import first_occurrence

pytestmark = pytest.mark.usefixtures("single_thread")

M, T, V, C = 3, 5, 6, 4

#: a partly masked input, a full one, an all-masked one (ignore_index = -100)
MASKED = torch.tensor([[0, -100, 2, 1, -100], [1, 3, 0, 2, 2], [-100] * T])


class EmbedNorm(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> tanh -> LayerNorm(bias=False) -> Linear head, per position."""

    def __init__(self, padding_idx=0):
        super().__init__()
        self.embed = nn.Embedding(V, 3, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(3)
        self.norm2 = nn.LayerNorm(3, bias=False)
        self.head = nn.Linear(3, C)

    def forward(self, x):
        return self.head(self.norm2(torch.tanh(self.norm(self.embed(x)))))


class TinyLM(nn.Module):
    """Token and learned-position embeddings (positions given per input, ``(B, T)``), pre-norm self-attention with
    a causal mask, a LayerNorm'd MLP and a head: every parameter has a fast rule."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.pos = nn.Embedding(T, d)
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        t = x.shape[1]
        z = self.embed(x) + self.pos(torch.arange(t).expand(x.shape[0], t))
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=z.dtype)
        a = self.norm1(z)
        z = z + self.attn(a, a, a, attn_mask=mask, need_weights=False, is_causal=True)[0]
        z = z + torch.tanh(self.ff(self.norm2(z)))
        return self.head(self.norm(z))


def tokens(seed=1):
    x = torch.randint(0, V, (M, T), generator=gen(seed))
    x[0, :3] = 2  # a token repeated within one input: its per-sample gradient row sums three positions
    x[1, 1] = 0  # the padding token (EmbedNorm's padding_idx)
    return x


def brute(model, x):
    """Per input: softmax p (T, C) and Jacobians J (T, C, P) of the logits, float64."""
    names, flat = flat_params(model)
    model.eval()

    def f(theta, xm):
        return functional_call(model, unflatten(model, names, theta), (xm.unsqueeze(0),))[0]

    ps = torch.stack([torch.softmax(f(flat, x[m]), -1).detach() for m in range(x.shape[0])])
    Js = torch.stack([jacrev(f)(flat, x[m]) for m in range(x.shape[0])])
    return names, ps, Js


def weights(targets):
    return torch.ones(M, T, dtype=DTYPE) if targets is None else (targets != -100).to(DTYPE)


def exact_ref(p, J, w):
    info = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("mt,mtap,mtab,mtbp->mp", w, J, info, J).mean(0)


def empirical_ref(p, J, y):
    w = (y != -100).to(DTYPE)
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), C).to(DTYPE)
    score = torch.einsum("mt,mtc,mtcp->mp", w, p - onehot, J)  # the whole input's score
    return (score**2).mean(0)


MODELS = {"embed_norm": EmbedNorm, "tiny_lm": TinyLM}


def model_of(name, seed=0):
    torch.manual_seed(seed)
    return init_(MODELS[name](), seed, 1.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_route_taken(name):
    model, x = model_of(name), tokens()
    with Probe(model, x, Categorical()) as probe:
        fast = {mname for mname, _, _ in probe.fast}
        assert probe.general == []
    mods = {n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))}
    assert mods <= fast
    if name == "tiny_lm":
        assert {"attn.in_proj", "attn.out_proj"} <= fast


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("masked", [False, True])
def test_exact_matches_bruteforce(name, masked):
    model, x = model_of(name), tokens()
    targets = MASKED if masked else None
    names, p, J = brute(model, x)
    ref = split(model, names, exact_ref(p, J, weights(targets)))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=targets)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    if name == "embed_norm":
        assert bool((got["embed.weight"][0] == 0).all())  # the padding row gets no gradient
        assert bool((got["embed.weight"][1:] != 0).any())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("masked", [False, True])
def test_empirical_and_mc1_match_bruteforce(name, masked):
    model, x = model_of(name), tokens()
    names, p, J = brute(model, x)
    y = torch.randint(0, C, (M, T), generator=gen(5))
    if masked:
        y = torch.where(MASKED == -100, MASKED, y)
    ref = split(model, names, empirical_ref(p, J, y))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="empirical", targets=y)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    # mc1 squares the score at labels drawn from the model: the empirical Fisher at those labels
    lik = Categorical()
    drawn = lik.sample(lik.flatten(torch.log(p)), 1, generator=gen(7))[0]
    if masked:
        drawn = torch.where(MASKED == -100, MASKED, drawn)
    ref1 = split(model, names, empirical_ref(p, J, drawn))
    got1 = diagonal_fisher(
        model, x, likelihood="categorical", estimator="mc1", generator=gen(7), targets=MASKED if masked else None
    )
    for n in names:
        torch.testing.assert_close(got1[n], ref1[n], rtol=1e-9, atol=1e-12)


def test_embedding_with_one_token_per_input():
    """Inputs ``(B,)`` (one id each) passed straight to the Embedding: fast, exact."""
    torch.manual_seed(0)
    model = init_(nn.Sequential(nn.Embedding(V, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, C)), 0, 1.0)
    x = torch.tensor([1, 4, 1, 0])
    with Probe(model, x, Categorical()) as probe:
        assert probe.general == []
    names, flat = flat_params(model)
    model.eval()

    def f(theta, xm):
        return functional_call(model, unflatten(model, names, theta), (xm.unsqueeze(0),))

    p = torch.stack([torch.softmax(f(flat, x[m]), -1).detach() for m in range(4)])
    J = torch.stack([jacrev(f)(flat, x[m]) for m in range(4)])  # (M, 1, C, P)
    ref = split(model, names, exact_ref(p, J, torch.ones(4, 1, dtype=DTYPE)))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


class SharedPos(nn.Module):
    """Learned positions ``pos(torch.arange(T))`` shared by the batch (the nanoGPT way), T == M: the shared (T, d)
    output has the batch's leading size.  ``variant``: ``"add"`` (``embed(x) + pos``: the broadcast-add rule),
    ``"scaled"`` (``2 * embed(x) + pos``: the partner is no recorded output) or ``"reused"`` (``pos`` used twice)."""

    def __init__(self, variant="add"):
        super().__init__()
        self.variant = variant
        self.embed = nn.Embedding(V, 3)
        self.pos = nn.Embedding(M, 3)
        self.head = nn.Linear(3, C)

    def forward(self, x):
        p = self.pos(torch.arange(x.shape[1]))
        e = self.embed(x)
        if self.variant == "scaled":
            z = 2 * e + p
        elif self.variant == "reused":
            z = e + p + torch.tanh(p)
        else:
            z = e + p
        return self.head(torch.tanh(z))


@pytest.mark.parametrize("variant", ["add", "scaled", "reused"])
def test_shared_position_index(variant):
    """``embed(x) + pos(arange(T))``: pos takes the Embedding rule with embed's per-input output gradient; any other
    use of the shared output takes the general route.  exact and empirical against brute force either way."""
    model = init_(SharedPos(variant), 0, 1.0)
    x = tokens()[:, :M]
    with Probe(model, x, Categorical()) as probe:
        fast = {f[0] for f in probe.fast}
        assert "embed" in fast
        if variant == "add":
            assert probe.general == [] and "pos" in fast
        else:
            assert probe.general == ["pos.weight"]
    names, p, J = brute(model, x)
    mask = MASKED[:, :M]
    ref = split(model, names, exact_ref(p, J, weights(mask)[:, :M]))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=mask)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    y = torch.randint(0, C, (M, M), generator=gen(5))
    ref = split(model, names, empirical_ref(p, J, y))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="empirical", targets=y)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


def test_first_occurrence():
    idx = torch.tensor([[3, 1, 3, 3, 0, 1], [5, 5, 5, 5, 5, 5]])
    assert first_occurrence(idx).tolist() == [[0, 1, 0, 0, 4, 1], [0, 0, 0, 0, 0, 0]]


class SeqFirstAttention(nn.Module):
    """Self-attention with ``batch_first=False``, attention weights returned (``need_weights=True``), a boolean
    causal mask and a key padding mask (token 0 is padding, never at position 0)."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        z = self.embed(x)
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        pad = x == 0
        pad[:, 0] = False
        zt = z.transpose(0, 1)  # one tensor as query, key and value: self-attention
        a, w = self.attn(zt, zt, zt, key_padding_mask=pad, attn_mask=causal)
        assert w is not None
        return self.head(torch.tanh(a.transpose(0, 1) + z))


def test_attention_seq_first_weights_and_padding_mask():
    torch.manual_seed(0)
    model, x = init_(SeqFirstAttention(), 0, 1.0), tokens()
    with Probe(model, x, Categorical()) as probe:
        assert probe.general == []
        assert {"attn.in_proj", "attn.out_proj"} <= {f[0] for f in probe.fast}
    names, p, J = brute(model, x)
    ref = split(model, names, exact_ref(p, J, weights(MASKED)))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact", targets=MASKED)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


def test_cross_attention_takes_the_general_route():
    """Query different from key/value: the original forward runs, its projections take the general route."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, C)

        def forward(self, x):
            z = self.embed(x)
            return self.head(self.attn(z, torch.tanh(z), torch.tanh(z), need_weights=False)[0])

    torch.manual_seed(0)
    model, x = init_(Cross(), 0, 1.0), tokens()
    with Probe(model, x, Categorical()) as probe:
        assert "attn.in_proj_weight" in probe.general
    names, p, J = brute(model, x)
    ref = split(model, names, exact_ref(p, J, weights(None)))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


def test_sequence_first_layers_take_the_general_route():
    """Linear and LayerNorm applied to (T, B, d) activations: dimension 0 is not the batch, so no fast rule."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, 4)
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, C)

        def forward(self, x):
            z = self.embed(x).transpose(0, 1)  # (T, B, d)
            return self.head(self.norm(torch.tanh(self.lin(z))).transpose(0, 1))

    torch.manual_seed(0)
    model, x = init_(SeqFirst(), 0, 1.0), tokens()
    with Probe(model, x, Categorical()) as probe:
        assert {"lin.weight", "lin.bias", "norm.weight", "norm.bias"} <= set(probe.general)
        assert {"embed", "head"} <= {f[0] for f in probe.fast}
    names, p, J = brute(model, x)
    ref = split(model, names, exact_ref(p, J, weights(None)))
    got = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("masked", [False, True])
def test_mc1_variance_matches_bruteforce(name, masked):
    """The closed-form variance of Î₁ (per input sum_t kappa_t + 2 F^2) through the new records' multi-reducer."""
    from test_sequence import moments_per_input

    from fisher_optim import fisher_variance

    model, x = model_of(name), tokens()
    targets = MASKED if masked else None
    names, p, J = brute(model, x)
    _, v1, _ = moments_per_input(p, J, weights(targets))
    ref = split(model, names, v1.sum(0) / (3 * M * M))
    got = fisher_variance(model, x, likelihood="categorical", estimator="mc1", n_samples=3, targets=targets)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-8, atol=1e-14)
