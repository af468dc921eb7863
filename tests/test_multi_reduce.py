"""The multi-reducer (one per-sample pass for several statistics) and the fused moments pass (float64).

``reduce_many`` and ``reduce`` must equal the reduction of the per-sample tensors a record stands for, built here
independently, for every record kind; ``linear_reduce`` stacks the
statistics that multiply the same power of ``a`` into one matmul and must equal separate matmuls; the
likelihoods' ``quad_and_moment4`` must equal its two halves computed by plain broadcasting (the weighted sums
go through ``bmm`` for speed); and ``moments_from_probe`` restricted to some parameters must equal the full
call restricted afterwards.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_optim.engine import Probe
from fisher_optim.layers import ConvRecord, DenseRecord, LinearRecord, UnfoldRecord, linear_reduce, make_record
from fisher_optim.likelihoods import LIKELIHOODS, get_likelihood
from fisher_optim.likelihoods import wsum as _wsum
from fisher_optim.variance import moments_from_probe

DTYPE = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _stats(x, idx):
    """Three statistics of a seed stack ``x`` (K, b, ...), homogeneous of degrees 1, 2, 4 (the records' contract)."""
    return (x.sum(0), (x * x).sum(0), (x**4).sum(0) - (x * x).sum(0) ** 2)


DEGREES = (1, 2, 4)


def _records():
    g = _gen()
    lin = LinearRecord(
        a=torch.randn(5, 4, generator=g, dtype=DTYPE), q=torch.randn(3, 5, 6, generator=g, dtype=DTYPE), has_bias=True
    )
    lin2 = LinearRecord(
        a=torch.randn(5, 4, generator=g, dtype=DTYPE),
        q=torch.randn(3, 5, 6, generator=g, dtype=DTYPE),
        has_bias=False,
        power=2,
    )
    unf = UnfoldRecord(
        X=torch.randn(5, 4, 7, generator=g, dtype=DTYPE),
        g=torch.randn(3, 5, 2, 7, generator=g, dtype=DTYPE),
        has_bias=True,
        weight_shape=torch.Size([2, 4]),
    )
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    inp = torch.randn(4, 2, 5, 5, generator=g, dtype=DTYPE)
    out_grad = torch.randn(2, 4, 3, 5, 5, generator=g, dtype=DTYPE)
    crec = make_record(conv, inp, out_grad, True)
    assert isinstance(crec, ConvRecord)
    dense = DenseRecord({"w": torch.randn(3, 5, 2, 2, generator=g, dtype=DTYPE)})
    return {"linear": lin, "linear_power2": lin2, "unfold": unf, "conv": crec, "dense": dense}


def _per_sample(rec) -> dict[str, torch.Tensor]:
    """The per-sample tensors ``(K, B, *shape)`` a record stands for, built independently of its reduction code."""
    if isinstance(rec, LinearRecord):
        out = {"weight": rec.q.unsqueeze(-1) * (rec.a**rec.power).unsqueeze(0).unsqueeze(2)}
        if rec.has_bias:
            out["bias"] = rec.q
        return out
    if isinstance(rec, UnfoldRecord):
        w = (rec.g.unsqueeze(3) * rec.X.unsqueeze(0).unsqueeze(2)).sum(-1)  # (K, B, O, R)
        out = {"weight": w.reshape(*w.shape[:2], *rec.weight_shape)}
        if rec.has_bias:
            out["bias"] = rec.g.sum(-1)
        return out
    if isinstance(rec, ConvRecord):  # autograd through the convolution, one input and seed at a time
        m = rec.module
        k, b = rec.g.shape[:2]
        w = torch.zeros(k, b, *m.weight.shape, dtype=rec.g.dtype)
        for kk in range(k):
            for bb in range(b):
                weight = m.weight.detach().clone().requires_grad_(True)
                y = torch.nn.functional.conv2d(rec.inp[bb : bb + 1], weight, None, m.stride, m.padding, m.dilation)
                (w[kk, bb],) = torch.autograd.grad((y[0] * rec.g[kk, bb]).sum(), weight)
        out = {"weight": w}
        if rec.has_bias:
            out["bias"] = rec.g.sum((-1, -2))
        return out
    return dict(rec.values)


@pytest.mark.parametrize("kind", ["linear", "linear_power2", "unfold", "conv", "dense"])
def test_reductions_equal_the_reduced_per_sample_tensors(kind):
    """``reduce_many`` (all statistics at once) and ``reduce`` (one) against the per-sample tensors, reduced here."""
    rec = _records()[kind]
    ref = {key: [st.sum(0) for st in _stats(x, slice(None))] for key, x in _per_sample(rec).items()}
    many = rec.reduce_many(_stats, DEGREES)
    for i, d in enumerate(DEGREES):
        one = rec.reduce(lambda x, idx, i=i: _stats(x, idx)[i], d)
        assert set(one) == set(many[i]) == set(ref)
        for key in ref:
            torch.testing.assert_close(many[i][key], ref[key][i], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(one[key], ref[key][i], rtol=1e-10, atol=1e-10)


def test_linear_reduce_stacks_same_exponent_and_matches_separate_matmuls():
    g = _gen(1)
    a = torch.randn(6, 3, generator=g, dtype=DTYPE)
    stats = [torch.randn(6, 4, generator=g, dtype=DTYPE) for _ in range(3)]
    terms = [(stats[0], 2), (stats[1], 4), (stats[2], 4)]
    got = linear_reduce(a, terms, has_bias=True)
    for (st, e), d in zip(terms, got):
        torch.testing.assert_close(d["weight"], st.T @ a**e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d["bias"], st.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rest", [(), (4,), (2, 3)])
def test_wsum_equals_broadcast_sum(rest):
    g = _gen(2)
    w = torch.randn(5, 3, generator=g, dtype=DTYPE)
    x = torch.randn(5, 3, *rest, generator=g, dtype=DTYPE)
    expected = (w.reshape(5, 3, *([1] * len(rest))) * x).sum(0)
    torch.testing.assert_close(_wsum(w, x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_quad_and_moment4_equals_plain_broadcast_formulas(name):
    lik = get_likelihood(name)
    g = _gen(3)
    h = torch.randn(4, 3, generator=g, dtype=DTYPE) * 0.5
    v = torch.randn(3, 4, 2, 5, generator=g, dtype=DTYPE)
    quad, m4 = lik.quad_and_moment4(h, v)
    fisher = lik.fisher(h)  # (B, C, C)
    vb = v.permute(1, 2, 3, 0)  # (B, 2, 5, C)
    expected_quad = torch.einsum("bijc,bcd,bijd->bij", vb, fisher, vb)
    torch.testing.assert_close(quad, expected_quad, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(lik.fisher_quad(h, v), expected_quad, rtol=1e-11, atol=1e-13)
    # the 4th moment by exact enumeration where the support is finite (categorical: C labels)
    if name == "categorical":
        p = torch.softmax(h, -1)  # (B, C)
        score = vb - (vb * p[:, None, None, :]).sum(-1, keepdim=True)  # v_y - vbar, per label y
        s2 = score**2
        mean = (s2 * p[:, None, None, :]).sum(-1)
        expected_m4 = ((s2 - mean[..., None]) ** 2 * p[:, None, None, :]).sum(-1)
        torch.testing.assert_close(m4, expected_m4, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("with_v2", [False, True])
def test_moments_restricted_to_names_equal_full_moments_restricted(with_v2):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=DTYPE)
    lik = get_likelihood("categorical")
    names = ["0.weight", "2.bias"]
    with Probe(net, x, lik) as probe:
        full = moments_from_probe(probe, with_v2=with_v2, with_fisher_sq=True)
    with Probe(net, x, lik) as probe:
        part = moments_from_probe(probe, with_v2=with_v2, with_fisher_sq=True, names=names)
    for field in ("fisher", "fisher_sq", "v1") + (("v2",) if with_v2 else ()):
        got, ref = getattr(part, field), getattr(full, field)
        assert sorted(got) == sorted(names)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_unit_moment4_is_moment4_along_unit_directions(name):
    lik = get_likelihood(name)
    h = torch.randn(4, 3, generator=_gen(4), dtype=DTYPE) * 0.7
    eye = torch.eye(3, dtype=DTYPE).unsqueeze(1).expand(3, 4, 3)  # (C, B, C): direction e_a in column a
    torch.testing.assert_close(lik.unit_moment4(h), lik.moment4(h, eye), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lik.unit_variance(h), lik.fisher_quad(h, eye), rtol=1e-12, atol=1e-15)
