"""The seedless exact rule for the output layer (``Probe.exact_output_layer``), float64 against brute force.

When an ``nn.Linear`` produces ``h`` itself, ``F(W[j,k]) = I_jj(h) a_k^2``: no seeds.  The rule must be used
exactly when the layer's output *is* ``h`` (also through a view, e.g. ``nn.Unflatten`` for a pixel-wise
output) and never when something changes the output after the layer (an in-place activation, a scale, a
slice), and the Fisher must match the ``torch.func`` brute force in every case.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_close, init_, inputs
from reference import exact_diag, per_input_derivatives, split
from torch import nn

from fisher_optim import diagonal_fisher
from fisher_optim.engine import Probe
from fisher_optim.likelihoods import get_likelihood
from fisher_optim.selection import estimate_plan


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x):
        return 2.0 * self.body(x)


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))

    def forward(self, x):
        return self.body(x)[:, :3]


def _models():
    return {
        "plain": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), True, "categorical"),
        "unflatten": (
            nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 6), nn.Unflatten(1, (1, 2, 3))),
            True,
            "bernoulli",
        ),
        "inplace_after": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.ReLU(inplace=True)), False,
                          "poisson"),  # fmt: skip
        "activation_after": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh()), False,
                             "gaussian"),  # fmt: skip
        "scaled": (Scaled(), False, "categorical"),
        "sliced": (Sliced(), False, "categorical"),
    }


@pytest.mark.parametrize("name", sorted(_models()))
def test_output_layer_rule_used_exactly_when_the_layer_output_is_h(name):
    model, expected, lik_name = _models()[name]
    model = init_(model.double(), seed=3)
    x = inputs((5, 3), seed=2)
    lik = get_likelihood(lik_name)
    with Probe(model, x, lik) as probe:
        assert (probe.output_index is not None) == expected
        vals, done = probe.exact_output_layer()
        assert bool(done) == expected
    names, h, J, _ = per_input_derivatives(model, x, lik, hessians=False)
    ref = split(model, names, exact_diag(lik, h, J))
    assert_params_close(diagonal_fisher(model, x, likelihood=lik, estimator="exact"), ref)
    plan = {n: ("exact", 1) for n in names}
    assert_params_close(estimate_plan(model, x, likelihood=lik, plan=plan), ref)
    if expected:
        m = x.shape[0]
        for n, v in vals.items():
            torch.testing.assert_close(v / m, ref[n], rtol=1e-10, atol=1e-14)


def test_output_layer_rule_respects_names():
    model = init_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double(), seed=1)
    x = inputs((4, 3), seed=0)
    with Probe(model, x, get_likelihood("categorical")) as probe:
        vals, done = probe.exact_output_layer(names=["2.bias", "0.weight"])
    assert done == {"2.bias"} and set(vals) == {"2.bias"}


@pytest.mark.parametrize("name", ["plain", "unflatten", "activation_after"])
def test_diagonal_seed_shortcut_equals_the_full_backward(name):
    """``output_grads(..., diagonal=s)`` for seeds ``s[b,k] e_k`` starts the backward at the output layer's input
    (``s[b,k] W[k,:]``) when that layer produces ``h``; the gradients must equal the plain batched backward."""
    model, _, lik_name = _models()[name]
    model = init_(model.double(), seed=5)
    x = inputs((4, 3), seed=6)
    with Probe(model, x, get_likelihood(lik_name)) as probe:
        c = probe.h.shape[1]
        s = torch.rand(probe.h.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
        seeds = torch.diag_embed(s).permute(1, 0, 2)  # seeds[k, b, c] = s[b, k] delta_kc
        assert seeds.shape == (c, *probe.h.shape)
        full = probe.output_grads(seeds)
        short = probe.output_grads(seeds, diagonal=s)
    assert len(full) == len(short)
    for a, b in zip(full, short):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
