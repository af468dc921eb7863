"""Modules without a fast per-layer rule (the torch.func route) and fast layers used in unusual ways.

Every model here is compared with the brute-force ``torch.func`` reference of ``tests/reference.py`` (eval mode,
float64) for ``exact``, ``mc1`` (labels reproduced from the same seed) and ``empirical``; ``mc2`` where the
Hessian routes support the model, and a ``ValueError`` naming the module where they do not.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import (
    DTYPE,
    assert_params_close,
    data_targets,
    draw_labels,
    gen,
    init_,
    inputs,
    make_likelihood,
)
from reference import (
    empirical_diag,
    exact_diag,
    frozen_batch_statistics_copy,
    mc1_diag,
    mc2_diag,
    per_input_derivatives,
    split,
)
from torch import nn

from fisher_optim import diagonal_fisher
from fisher_optim.hessian import plan

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 13


class Residual(nn.Module):
    """Linear -> [x + W2 tanh(W1 x)] -> sigmoid -> Linear (a custom forward with a skip connection)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.f1 = nn.Linear(4, 4)
        self.f2 = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        z = self.inp(x)
        z = z + self.f2(torch.tanh(self.f1(z)))
        return self.out(torch.sigmoid(z))


class ScaledLinear(nn.Module):
    """A custom module with its own nn.Parameter used in forward (next to a Linear child)."""

    def __init__(self, i, o):
        super().__init__()
        self.lin = nn.Linear(i, o)
        self.scale = nn.Parameter(torch.ones(o))

    def forward(self, x):
        return self.lin(x) * self.scale


class Shared(nn.Module):
    """One Linear called twice in a forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        z = torch.tanh(self.inp(x))
        z = torch.sigmoid(self.shared(z))
        z = torch.tanh(self.shared(z))
        return self.out(z)


class ResConv(nn.Module):
    """Smooth residual conv net, not a Sequential: conv -> tanh -> [y + conv(sigmoid(y))] -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        y = torch.tanh(self.c1(x))
        y = y + self.c2(torch.sigmoid(y))
        return self.fc(torch.tanh(y).flatten(1))


def layernorm():
    return nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


def embedding():
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Tanh(), nn.Linear(3 * 4, 3))


def batchnorm():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


def conv_single_position():
    """The second convolution has a 1x1 output map: the Linear-like factored rule."""
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))


def batchnorm1d():
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def batchnorm1d_seq():
    """BatchNorm1d on (B, C, L) inputs."""
    return nn.Sequential(nn.BatchNorm1d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5, 3))


def batchnorm_relu_inplace():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


@torch.no_grad()
def with_running_stats(model):
    """Non-trivial BatchNorm running statistics (so eval and train mode differ)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            g = gen(3)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DTYPE))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DTYPE))
            m.num_batches_tracked.fill_(5)
    return model


def grouped_conv():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.Sigmoid(), nn.Conv2d(4, 2, 3, groups=2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )


def inplace_relu():
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def custom_param():
    return nn.Sequential(ScaledLinear(3, 4), nn.Sigmoid(), nn.Linear(4, 3))


def frozen():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3))
    m[0].bias.requires_grad_(False)
    m[2].weight.requires_grad_(False)
    return m


def token_inputs(b):
    return torch.randint(0, 7, (b, 3), generator=gen(2))


#: name -> (factory, inputs(b), mc2 supported, train mode)
CASES = {
    "layernorm": (layernorm, lambda b: inputs((b, 3)), False, False),
    "embedding": (embedding, token_inputs, False, False),
    "batchnorm-eval": (lambda: with_running_stats(batchnorm()), lambda b: inputs((b, 2, 6, 6)), False, False),
    "batchnorm-train": (lambda: with_running_stats(batchnorm()), lambda b: inputs((b, 2, 6, 6)), False, True),
    "conv-1x1-output": (conv_single_position, lambda b: inputs((b, 2, 6, 6)), True, False),
    "batchnorm1d-eval": (lambda: with_running_stats(batchnorm1d()), lambda b: inputs((b, 3)), False, False),
    "batchnorm1d-seq": (lambda: with_running_stats(batchnorm1d_seq()), lambda b: inputs((b, 2, 5)), False, False),
    "batchnorm-relu-inplace": (lambda: with_running_stats(batchnorm_relu_inplace()), lambda b: inputs((b, 2, 6, 6)),
                               False, False),  # fmt: skip
    "residual": (Residual, lambda b: inputs((b, 3)), True, False),
    "custom-param": (custom_param, lambda b: inputs((b, 3)), False, False),
    "shared-linear": (Shared, lambda b: inputs((b, 3)), True, False),
    "conv-groups2": (grouped_conv, lambda b: inputs((b, 2, 6, 6)), True, False),
    "relu-inplace": (inplace_relu, lambda b: inputs((b, 3)), True, False),
    "resconv": (ResConv, lambda b: inputs((b, 1, 4, 4)), True, False),
    "frozen-params": (frozen, lambda b: inputs((b, 3)), True, False),
}


def build(name, batch=4):
    factory, make_x, _, train = CASES[name]
    model = init_(factory(), seed=SEED)
    model.train(train)
    return model, make_x(batch)


@functools.cache
def reference(name):
    """Brute force on an eval-mode copy (the reference must not touch the model under test); BatchNorm in train
    mode holds the batch's statistics (:func:`reference.frozen_batch_statistics_copy`)."""
    model, x = build(name)
    ref_model = frozen_batch_statistics_copy(model, x) if model.training else copy.deepcopy(model).eval()
    hess = CASES[name][2]
    return per_input_derivatives(ref_model, x, make_likelihood("categorical"), hessians=hess)


@pytest.mark.parametrize("lik_name", ["categorical", "gaussian", "poisson"])
@pytest.mark.parametrize("estimator", ["exact", "mc1", "empirical"])
@pytest.mark.parametrize("name", list(CASES))
def test_general_route_matches_bruteforce(name, estimator, lik_name):
    model, x = build(name)
    names, h, J, _ = reference(name)
    lik = make_likelihood(lik_name)
    if estimator == "exact":
        out = diagonal_fisher(model, x, likelihood=lik, estimator="exact")
        exp = exact_diag(lik, h, J)
    elif estimator == "mc1":
        out = diagonal_fisher(model, x, likelihood=lik, estimator="mc1", n_samples=3, generator=gen(SEED))
        exp = mc1_diag(lik, h, J, lik.sample(h, 3, generator=gen(SEED)))
    else:
        y = data_targets(lik, h)
        out = diagonal_fisher(model, x, likelihood=lik, estimator="empirical", targets=y)
        exp = empirical_diag(lik, h, J, lik.check_targets(h, y))
    assert_params_close(out, split(model, names, exp))


@pytest.mark.parametrize("lik_name", ["categorical", "bernoulli"])
@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[2]])
def test_mc2_general_models(name, lik_name):
    model, x = build(name)
    names, h, J, U = reference(name)
    lik = make_likelihood(lik_name)
    for seed in (0, 1):
        out = diagonal_fisher(model, x, likelihood=lik, estimator="mc2", n_samples=2, generator=gen(seed))
        exp = mc2_diag(lik, h, J, U, draw_labels(model, x, lik, 2, seed))
        assert_params_close(out, split(model, names, exp))


def test_resconv_takes_the_hvp_route():
    model, _ = build("resconv")
    assert plan(model, dict(model.named_parameters())).route == "hvp"


def test_mc2_rejects_layernorm_by_name():
    model, x = build("layernorm")
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\)"):
        diagonal_fisher(model, x, likelihood="categorical", estimator="mc2", generator=gen(0))


def test_batchnorm_train_mode_uses_frozen_batch_statistics_and_keeps_state():
    """Train mode: the Fisher of the function being trained (the batch's own statistics, held constant)."""
    model, x = build("batchnorm-train")
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    assert model.training and bn.training
    eval_model = frozen_batch_statistics_copy(model, x)
    for est in ("exact", "mc1", "empirical"):
        kw = {"generator": gen(0)} if est == "mc1" else {}
        if est == "empirical":
            kw["targets"] = torch.tensor([0, 2, 1, 1])
        out = diagonal_fisher(model, x, likelihood="categorical", estimator=est, **kw)
        kw = {"generator": gen(0)} if est == "mc1" else kw
        ref = diagonal_fisher(eval_model, x, likelihood="categorical", estimator=est, **kw)
        assert_params_close(out, ref, rtol=0, atol_scale=0)
    assert model.training and bn.training
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # control: with the running statistics (eval mode) the function and its Fisher differ
    with torch.no_grad():
        assert torch.allclose(copy.deepcopy(model)(x), eval_model(x))
        assert not torch.allclose(copy.deepcopy(model).eval()(x), eval_model(x))
    ev = diagonal_fisher(copy.deepcopy(model).eval(), x, likelihood="categorical", estimator="exact")
    tr = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    assert not torch.allclose(ev["0.weight"], tr["0.weight"])


def test_frozen_parameters_are_left_out():
    model, x = build("frozen-params")
    out = diagonal_fisher(model, x, likelihood="categorical", estimator="exact")
    assert list(out) == ["0.weight", "2.bias", "4.weight", "4.bias"]


@pytest.mark.parametrize("name", ["batchnorm-eval", "batchnorm1d-eval", "batchnorm1d-seq", "batchnorm-relu-inplace"])
def test_batchnorm_with_running_stats_takes_the_fast_rule(name):
    """BatchNorm in eval mode is a per-channel affine map: a fast rule, not the torch.func route."""
    from fisher_optim.engine import Probe

    model, x = build(name)
    with Probe(model, x, make_likelihood("categorical")) as probe:
        bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bn and any(mname == bn[0] for mname, _, _ in probe.fast)
        assert not probe.general
