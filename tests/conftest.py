"""Small shared model/data factories for the correctness tests (float64, deterministic).

Every factory builds its model in float64 and fills the parameters from its own ``torch.Generator``, so
the global RNG is never touched and a model can be rebuilt bit-for-bit from its name.  The brute-force
derivatives of the standard cases are cached per model (``reference_case``): they do not depend on the
likelihood, because every standard model has a 2-D ``(batch, 3)`` output.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from reference import per_input_derivatives
from torch import nn

from fisher_optim.likelihoods import Bernoulli, Categorical, Gaussian, Poisson

# The suite runs tiny tensors: with 2 intra-op threads on a 2-core CI machine thread start-up dominates and the
# whole suite is ~3x slower in CPU time. Tests that need more threads set them themselves.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests run only when asked for (``pytest -m slow``): the default tier stays light."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow tier: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (tiny tensors: thread start-up dominates, worse on a shared CPU)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


DTYPE = torch.float64
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
LIKELIHOOD_NAMES = ("categorical", "bernoulli", "gaussian", "poisson")
ESTIMATOR_NAMES = ("exact", "mc1", "mc2", "empirical")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_likelihood(name: str):
    """Likelihood objects used by the tests (Gaussian with sigma != 1 so the 1/sigma^2 scaling is exercised)."""
    return {
        "categorical": Categorical,
        "bernoulli": Bernoulli,
        "gaussian": lambda: Gaussian(sigma=0.7),
        "poisson": Poisson,
    }[name]()


@torch.no_grad()
def init_(model: nn.Module, seed: int, weight_scale: float = 1.5, bias_scale: float = 0.5) -> nn.Module:
    """Float64 and deterministic parameters: weights ~ N(0, scale^2/fan_in), biases ~ N(0, bias_scale^2)."""
    model.to(DTYPE)
    g = gen(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = weight_scale / math.sqrt(p[0].numel())
        else:
            std = bias_scale
        p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE) * std)
    return model


def inputs(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=DTYPE)


# -- standard models (output (B, 3)) ------------------------------------------------------------------
def mlp(act: str = "sigmoid", widths=(3, 4, 5, 3), seed: int = 0) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return init_(nn.Sequential(*layers), seed)


def cnn(act: str = "sigmoid", seed: int = 0) -> nn.Module:
    """Two convolutions (the second with stride 2, padding 2, dilation 2), Flatten, Linear; input (B, 2, 6, 6)."""
    A = ACTIVATIONS[act]
    return init_(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            A(),
            nn.Conv2d(3, 2, 3, stride=2, padding=2, dilation=2),
            A(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        ),
        seed,
    )


def token_mlp(act: str = "tanh", seed: int = 0) -> nn.Module:
    """A Linear applied to every position of a (B, T=3, d=4) input (extra leading dim), then Flatten, Linear."""
    return init_(
        nn.Sequential(nn.Linear(4, 5), ACTIVATIONS[act](), nn.Flatten(), nn.Linear(3 * 5, 3)), seed
    )


def nested_mlp(seed: int = 0) -> nn.Module:
    """Nested Sequential with a Flatten in front; input (B, 2, 3)."""
    return init_(
        nn.Sequential(
            nn.Flatten(),
            nn.Sequential(nn.Linear(6, 5), nn.Sigmoid()),
            nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 3)),
        ),
        seed,
    )


#: name -> (factory, input shape without the batch dimension)
MODELS = {
    **{f"mlp-{a}": (functools.partial(mlp, a), (3,)) for a in ACTIVATIONS},
    **{f"cnn-{a}": (functools.partial(cnn, a), (2, 6, 6)) for a in ACTIVATIONS},
    "token-linear": (token_mlp, (3, 4)),
    "nested-flatten": (nested_mlp, (2, 3)),
}

#: the largest batch used with the standard models; smaller batches are its leading rows
MAX_BATCH = 4


def model_and_inputs(name: str, batch: int = MAX_BATCH):
    factory, shape = MODELS[name]
    return factory(), inputs((MAX_BATCH, *shape), seed=1)[:batch]


@functools.cache
def _reference(name: str):
    model, x = model_and_inputs(name)
    return per_input_derivatives(model, x, Categorical())


def reference_case(name: str, batch: int = MAX_BATCH):
    """``(model, x, names, h, J, U)`` for ``batch`` inputs (per-input derivatives are sliced from a cache)."""
    model, x = model_and_inputs(name, batch)
    names, h, J, U = _reference(name)
    return model, x, names, h[:batch], J[:batch], U[:batch]


# -- labels ---------------------------------------------------------------------------------------------
@torch.no_grad()
def model_output(model: nn.Module, x: torch.Tensor, lik) -> torch.Tensor:
    """The flattened ``(B, C)`` output in eval mode (train flags restored), as the estimators see it."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return lik.flatten(model(x)).detach()
    finally:
        for m, f in flags:
            m.training = f


def draw_labels(model, x, lik, n_samples: int, seed: int):
    """The labels ``diagonal_fisher(..., generator=gen(seed))`` draws: one ``lik.sample`` call, same seed."""
    return lik.sample(model_output(model, x, lik), n_samples, generator=gen(seed))


def data_targets(lik, h: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Valid observed targets for the empirical Fisher, one per input (independent of the model)."""
    g = gen(seed)
    b, c = h.shape
    if lik.name == "categorical":
        return torch.randint(0, c, (b,), generator=g)
    if lik.name == "bernoulli":
        return torch.randint(0, 2, (b, c), generator=g).to(DTYPE)
    if lik.name == "poisson":
        return torch.randint(0, 5, (b, c), generator=g).to(DTYPE)
    return torch.randn((b, c), generator=g, dtype=DTYPE)


def forced(lik, labels: torch.Tensor):
    """A copy of ``lik`` whose ``sample`` returns ``labels`` (shape checked) and counts its calls."""
    out = copy.copy(lik)
    out.calls = []

    def sample(h, n, generator=None):
        out.calls.append((tuple(h.shape), n, h.requires_grad))
        assert labels.shape[0] == n
        return labels.clone()

    out.sample = sample
    return out


# -- comparisons ----------------------------------------------------------------------------------------
def assert_params_close(actual: dict, expected: dict, rtol: float = 1e-10, atol_scale: float = 1e-12):
    """Same keys, same shapes, and ``|a - e| <= atol + rtol |e|`` with ``atol = atol_scale * max |e|``."""
    assert list(actual) == list(expected)
    scale = max(float(v.abs().max()) for v in expected.values() if v.numel())
    for n in expected:
        assert actual[n].shape == expected[n].shape, n
        assert actual[n].dtype == expected[n].dtype, n
        torch.testing.assert_close(
            actual[n], expected[n], rtol=rtol, atol=atol_scale * scale, msg=lambda m, n=n: f"{n}: {m}"
        )
