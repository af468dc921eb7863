"""Bad inputs to diagonal_fisher: one table of (kwargs, error type, message regex) rows (docs/design.md §4).

Each row overrides the keyword arguments of a valid call on a small categorical/regression MLP; ``model`` and
``inputs`` may be overridden too.  Argument validation follows torch.optim: ``ValueError("Invalid <name>: ...")``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE, gen, inputs, mlp
from torch import nn

from fisher_optim import diagonal_fisher
from fisher_optim.likelihoods import Categorical, Gaussian

pytestmark = pytest.mark.usefixtures("single_thread")

M = 4


def base_call(**over):
    kw = {
        "model": mlp("tanh", widths=(3, 4, 3)),
        "inputs": inputs((M, 3)),
        "likelihood": "categorical",
        "estimator": "exact",
    }
    kw.update(over)
    return kw


def one_d_output():
    return nn.Sequential(mlp("tanh", widths=(3, 4, 1)), nn.Flatten(0))


def three_d_output():
    """Three positions of two classes each (a sequence output)."""
    return nn.Sequential(mlp("tanh", widths=(3, 4, 6)), nn.Unflatten(1, (3, 2)))


ROWS = [
    # estimator / likelihood names
    ({"estimator": "fisher"}, ValueError, r"Invalid estimator: 'fisher'"),
    ({"estimator": None}, ValueError, r"Invalid estimator: None"),
    ({"likelihood": "multinomial"}, ValueError, r"Invalid likelihood: 'multinomial'"),
    ({"likelihood": nn.CrossEntropyLoss()}, ValueError, r"Invalid likelihood"),
    # n_samples
    ({"estimator": "mc1", "n_samples": 0}, ValueError, r"Invalid n_samples: 0"),
    ({"estimator": "mc1", "n_samples": -1}, ValueError, r"Invalid n_samples: -1"),
    ({"estimator": "mc2", "n_samples": 1.5}, ValueError, r"Invalid n_samples: 1.5"),
    ({"estimator": "mc1", "n_samples": True}, ValueError, r"Invalid n_samples: True"),
    ({"estimator": "mc1", "n_samples": "2"}, ValueError, r"Invalid n_samples: 2"),
    # reduction
    ({"reduction": "max"}, ValueError, r"Invalid reduction: 'max'"),
    ({"reduction": None}, ValueError, r"Invalid reduction: None"),
    # targets vs estimator
    ({"estimator": "empirical"}, ValueError, r"'empirical' needs targets"),
    # (categorical targets are a mask for the other estimators; other families' are labels only)
    ({"likelihood": "bernoulli", "estimator": "mc1", "targets": torch.zeros(M, 3)}, ValueError, r"only used by estim"),
    ({"likelihood": "poisson", "estimator": "exact", "targets": torch.zeros(M, 3)}, ValueError, r"only used by estim"),
    ({"estimator": "mc1", "targets": torch.tensor([0, 1, 3, 1])}, ValueError, r"class index out of range"),
    ({"estimator": "exact", "targets": torch.zeros(2, M, dtype=torch.long)}, ValueError, r"one target per input"),
    (
        {"model": three_d_output(), "estimator": "exact", "targets": torch.zeros(M, 2, dtype=torch.long)},
        ValueError,
        r"targets must have shape \(4, 3\) \(one class index per input and position\)",
    ),
    (
        {"model": three_d_output(), "estimator": "exact", "targets": torch.full((M, 3), 2)},
        ValueError,
        r"class index out of range \[0, 2\)",
    ),
    # categorical targets
    ({"estimator": "empirical", "targets": torch.tensor([0, 1, 2, 3])}, ValueError, r"class index out of range"),
    ({"estimator": "empirical", "targets": torch.tensor([0, -1, 2, 1])}, ValueError, r"class index out of range"),
    ({"estimator": "empirical", "targets": torch.tensor([0.0, 1.0, 2.0, 1.0])}, ValueError, r"integer class indices"),
    ({"estimator": "empirical", "targets": torch.tensor([True, False, True, True])}, ValueError, r"integer class"),
    ({"estimator": "empirical", "targets": torch.tensor([0, 1, 2])}, ValueError, r"targets must have shape \(4,\)"),
    ({"estimator": "empirical", "targets": torch.zeros(M, 1, dtype=torch.long)}, ValueError, r"must have shape"),
    ({"estimator": "empirical", "targets": torch.zeros(2, M, dtype=torch.long)}, ValueError, r"one target per input"),
    # other families' targets
    (
        {"likelihood": "bernoulli", "estimator": "empirical", "targets": torch.full((M, 3), 0.5, dtype=DTYPE)},
        ValueError,
        r"bernoulli: targets must be 0 or 1",
    ),
    (
        {"likelihood": "bernoulli", "estimator": "empirical", "targets": 2 * torch.ones(M, 3, dtype=DTYPE)},
        ValueError,
        r"bernoulli: targets must be 0 or 1",
    ),
    (
        {"likelihood": "poisson", "estimator": "empirical", "targets": -torch.ones(M, 3, dtype=DTYPE)},
        ValueError,
        r"poisson: targets must be non-negative counts",
    ),
    (
        {"likelihood": "gaussian", "estimator": "empirical", "targets": torch.zeros(M, 2, dtype=DTYPE)},
        ValueError,
        r"gaussian: targets must have the model output's shape",
    ),
    (
        {"likelihood": "gaussian", "estimator": "empirical", "targets": torch.zeros(M + 1, 3, dtype=DTYPE)},
        ValueError,
        r"gaussian: targets must have the model output's shape",
    ),
    (
        {"likelihood": "gaussian", "estimator": "empirical", "targets": torch.full((M, 3), float("nan"), dtype=DTYPE)},
        ValueError,
        r"gaussian: targets must be finite",
    ),
    # outputs and inputs
    ({"model": one_d_output()}, ValueError, r"categorical: model output must have shape \(batch, classes\)"),
    ({"model": three_d_output(), "likelihood": Categorical(class_dim=3)}, ValueError, r"class_dim=3 is not a non-b"),
    ({"inputs": inputs((0, 3))}, ValueError, r"non-empty batch"),
    ({"inputs": [[0.0, 1.0, 2.0]]}, TypeError, r"inputs must contain a tensor"),
]


@pytest.mark.parametrize("over,error,regex", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_bad_arguments(over, error, regex):
    kw = base_call(**over)
    if kw["estimator"] in ("mc1", "mc2") and "generator" not in kw:
        kw["generator"] = gen(0)
    model, x = kw.pop("model"), kw.pop("inputs")
    with pytest.raises(error, match=regex):
        diagonal_fisher(model, x, **kw)


@pytest.mark.parametrize("kw", [{"class_dim": 0}, {"class_dim": 1.0}, {"class_dim": True}, {"ignore_index": None}])
def test_categorical_arguments(kw):
    with pytest.raises(ValueError, match=r"Invalid (class_dim|ignore_index): "):
        Categorical(**kw)


@pytest.mark.parametrize("sigma", [0, -1.0, 0.0, float("nan"), float("inf"), "1"])
def test_gaussian_sigma(sigma):
    with pytest.raises(ValueError, match=r"Invalid sigma: "):
        Gaussian(sigma=sigma)


def test_the_base_call_is_valid():
    """Every row above differs from a call that works."""
    kw = base_call()
    model, x = kw.pop("model"), kw.pop("inputs")
    out = diagonal_fisher(model, x, **kw)
    assert set(out) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    diagonal_fisher(model, x, **{**kw, "estimator": "empirical", "targets": torch.tensor([0, 1, 2, 2])})
    for lik, t in (("bernoulli", torch.ones(M, 3)), ("poisson", 3 * torch.ones(M, 3)), ("gaussian", torch.ones(M, 3))):
        diagonal_fisher(model, x, likelihood=lik, estimator="empirical", targets=t.to(DTYPE))
