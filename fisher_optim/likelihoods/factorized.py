"""The factorised families: every output entry an independent unit (docs/fisher-math.md §5.2, §5.4-§5.6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Likelihood

__all__ = ["Bernoulli", "Gaussian", "Poisson"]


class Bernoulli(Likelihood):
    r"""Independent sigmoid units (multi-label); targets in ``{0, 1}`` with the output's shape.

    ``p = sigmoid(h)``, ``I_aa = p(1-p)``, ``kappa4 = p(1-p)(6p^2-6p+1)``,
    ``nll = softplus(h) - y h`` summed over units.
    """

    name = "bernoulli"

    def check_targets(self, h, y):
        y = torch.as_tensor(y, device=h.device)
        y = _flat_targets(self, h, y)
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("bernoulli: targets must be 0 or 1")
        return y.to(h.dtype)

    def sample(self, h, n, generator=None):
        p = torch.sigmoid(h.detach())
        return torch.bernoulli(p.expand(n, *p.shape), generator=generator)

    def mean(self, h):
        return torch.sigmoid(h)

    def nll(self, h, y):
        return (torch.nn.functional.softplus(h) - y * h).sum(-1)

    def unit_variance(self, h):
        p = torch.sigmoid(h)
        return p * (1 - p)

    def unit_kappa4(self, h):
        p = torch.sigmoid(h)
        return p * (1 - p) * (6 * p * p - 6 * p + 1)


class Gaussian(Likelihood):
    r"""Independent Gaussian units with fixed standard deviation ``sigma`` (default 1).

    The output ``f`` is the mean; ``nll = ||y - f||^2 / (2 sigma^2) + const`` (the constant is dropped).
    ``grad = (f - y)/sigma^2``, ``I = I_C / sigma^2``, ``kappa4 = 0`` (docs/fisher-math.md §5.5).  Note that a summed
    ``MSELoss`` equals ``2 sigma^2`` times this NLL with ``sigma^2 = 1/2``: the Fisher always refers to the
    normalised log-likelihood, never to the raw loss.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Invalid sigma: {sigma}")
        self.sigma = float(sigma)

    def check_targets(self, h, y):
        y = _flat_targets(self, h, torch.as_tensor(y, device=h.device))
        if y.numel() and not bool(torch.isfinite(y).all()):
            raise ValueError("gaussian: targets must be finite")
        return y.to(h.dtype)

    def sample(self, h, n, generator=None):
        f = h.detach()
        noise = torch.randn((n, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return f + self.sigma * noise

    def mean(self, h):
        return h / self.sigma**2

    def sufficient(self, y, h):
        return y.to(h.dtype) / self.sigma**2

    def nll(self, h, y):
        return ((y - h) ** 2).sum(-1) / (2 * self.sigma**2)

    def unit_variance(self, h):
        return torch.full_like(h, 1.0 / self.sigma**2)

    def unit_kappa4(self, h):
        return torch.zeros_like(h)

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma})"


class Poisson(Likelihood):
    r"""Independent Poisson counts with log-rate outputs ``h = log(lambda)``.

    ``I_aa = kappa4 = lambda``, ``nll = exp(h) - y h + log(y!)`` (the constant is dropped).
    """

    name = "poisson"

    def check_targets(self, h, y):
        y = _flat_targets(self, h, torch.as_tensor(y, device=h.device))
        if y.numel() and not bool((torch.isfinite(y) & (y >= 0)).all()):
            raise ValueError("poisson: targets must be non-negative counts")
        return y.to(h.dtype)

    def sample(self, h, n, generator=None):
        rate = torch.exp(h.detach())
        return torch.poisson(rate.expand(n, *rate.shape).contiguous(), generator=generator)

    def mean(self, h):
        return torch.exp(h)

    def nll(self, h, y):
        return (torch.exp(h) - y * h).sum(-1)

    def unit_variance(self, h):
        return torch.exp(h)

    def unit_kappa4(self, h):
        return torch.exp(h)


def _flat_targets(lik: Likelihood, h: Tensor, y: Tensor) -> Tensor:
    """Bring targets of the model output's shape (or ``(n, *output)``) to ``(..., B, C)``."""
    b, c = h.shape
    if y.dim() >= 1 and y.shape[0] == b and y.numel() == b * c:
        return y.reshape(b, c)
    if y.dim() >= 2 and y.shape[1] == b and y.numel() == y.shape[0] * b * c:
        return y.reshape(y.shape[0], b, c)
    raise ValueError(
        f"{lik.name}: targets must have the model output's shape ({b} inputs x {c} units), "
        f"got {tuple(y.shape)}"
    )
