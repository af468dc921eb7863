r"""Exponential-family output likelihoods (spec §1, §5).

A network output row ``h`` (one row per input) holds the natural parameters of
:math:`p(y \mid h) = \exp(t(y)^\top h - F(h))`.  Every likelihood here provides

* ``sample(h, n, generator)``: ``n`` labels per input, shape ``(n, B, ...)``;
* ``nll(h, y)``: per-input negative log-likelihood, summed over output units, shape ``(B,)``;
* ``mean(h)``: :math:`\eta(h) = \nabla F(h)`;
* ``grad(h, y)``: :math:`\partial(-\log p)/\partial h = \eta(h) - t(y)` (the per-input score seed);
* ``fisher(h)`` and ``fisher_factor(h)``: :math:`I(h)` (``B x C x C``) and ``S`` with :math:`S S^\top = I(h)`;
* ``fisher_quad(h, v)``: :math:`v^\top I(h) v` for directions ``v`` stacked on axis 0 (``C x B x ...``);
* ``moment4(h, v)``: :math:`\mathcal M(v,v,v,v) = \mathrm{Var}\big((v^\top(t-\eta))^2\big)
  = \kappa(v^4) + 2 (v^\top I v)^2`, the single-sample variance of :math:`\hat I_1` along ``v`` (spec §3.2).

Outputs are flattened to ``(B, C)``: ``categorical`` needs a 2-D output (one row of ``C`` logits per
input); the factorised families (``bernoulli``, ``gaussian``, ``poisson``) treat every output entry of an
input as one independent unit, so an output of shape ``(B, 1, 28, 28)`` is ``C = 784`` units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "Likelihood",
    "Categorical",
    "Bernoulli",
    "Gaussian",
    "Poisson",
    "get_likelihood",
    "LIKELIHOODS",
]


def _wsum(w: Tensor, x: Tensor) -> Tensor:
    r""":math:`\sum_c w[c, b]\, x[c, b, \ldots]` for ``w`` (``C x B``) and ``x`` (``C x B x ...``) -> ``B x ...``.

    One batched ``(1 x C) @ (C x rest)`` product per input: a broadcast multiply of ``w`` against the trailing
    dimensions (stride 0 innermost) followed by ``sum(0)`` is several times slower on CPU.
    """
    c, b = x.shape[:2]
    rest = x.shape[2:]
    xf = x.reshape(c, b, -1).transpose(0, 1)  # (B, C, n): a view when x is contiguous
    out = torch.bmm(w.T.to(x.dtype).unsqueeze(1), xf)  # (B, 1, n)
    return out.reshape(b, *rest)


class Likelihood:
    """Base class. Subclasses define the family; see the module docstring for the contract."""

    name: str = "likelihood"
    #: output units are independent (``I(h)`` diagonal)
    factorized: bool = True

    def flatten(self, h: Tensor) -> Tensor:
        """Network output -> ``(B, C)`` natural parameters."""
        if h.dim() < 1:
            raise ValueError(f"{self.name}: model output must have a batch dimension, got shape {tuple(h.shape)}")
        return h.reshape(h.shape[0], -1)

    # -- per-family pieces ----------------------------------------------------------------------
    def check_targets(self, h: Tensor, y: Tensor) -> Tensor:
        """Validate targets for output ``h`` (``B x C``); return them as ``(..., B, C)`` floats or indices."""
        raise NotImplementedError

    def sample(self, h: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def mean(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def sufficient(self, y: Tensor, h: Tensor) -> Tensor:
        """:math:`t(y)` scaled so that ``grad = mean - sufficient`` (``(..., B, C)``)."""
        return y.to(h.dtype)

    def nll(self, h: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def unit_variance(self, h: Tensor) -> Tensor:
        """Diagonal of ``I(h)`` (``B x C``); for factorised families this is all of ``I(h)``."""
        raise NotImplementedError

    def unit_kappa4(self, h: Tensor) -> Tensor:
        """Fourth cumulant :math:`F''''(h_a)` per unit for factorised families (``B x C``)."""
        raise NotImplementedError

    def unit_moment4(self, h: Tensor) -> Tensor:
        r""":math:`\mathcal M(e_a, e_a, e_a, e_a)` per unit ``a`` (``B x C``): ``moment4`` along the unit directions,
        i.e. ``Var((t_a - eta_a)^2)`` (the output layer's single-sample Î₁ variance per ``a_k^4``)."""
        var = self.unit_variance(h)
        return self.unit_kappa4(h) + 2 * var * var

    # -- generic derived quantities ---------------------------------------------------------------
    def grad(self, h: Tensor, y: Tensor) -> Tensor:
        r""":math:`\partial(-\log p(y|h))/\partial h` for targets ``y`` of shape ``(..., B, ...)``."""
        return self.mean(h) - self.sufficient(y, h)

    def fisher(self, h: Tensor) -> Tensor:
        """:math:`I(h)`, ``B x C x C``."""
        return torch.diag_embed(self.unit_variance(h))

    def fisher_factor(self, h: Tensor) -> Tensor:
        """``S`` (``B x C x K``) with ``S S^T = I(h)``; its ``K`` columns are the exact-Fisher seeds."""
        return torch.diag_embed(self.unit_variance(h).clamp_min(0).sqrt())

    def fisher_quad(self, h: Tensor, v: Tensor) -> Tensor:
        r""":math:`v^\top I(h) v` per input for directions ``v`` (``C x B x ...``) -> ``B x ...``."""
        return _wsum(self.unit_variance(h).T, v * v)

    def moment4(self, h: Tensor, v: Tensor) -> Tensor:
        r""":math:`\kappa(v,v,v,v) + 2 (v^\top I v)^2` per input (spec §5.2) -> ``B x ...``."""
        return self.quad_and_moment4(h, v)[1]

    def quad_and_moment4(self, h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(fisher_quad(h, v), moment4(h, v))`` in one pass (shared squares): ``(B x ..., B x ...)``."""
        v2 = v * v
        quad = _wsum(self.unit_variance(h).T, v2)
        return quad, _wsum(self.unit_kappa4(h).T, v2.square_()) + 2 * quad * quad

    def lambda_max_fisher(self, h: Tensor) -> Tensor:
        """Largest eigenvalue of ``I(h)`` per input (``B``)."""
        return self.unit_variance(h).amax(-1)

    def lambda_min_fisher(self, h: Tensor) -> Tensor:
        """Smallest eigenvalue of ``I(h)`` per input (``B``)."""
        return self.unit_variance(h).amin(-1)

    def lambda_max_moment4(self, h: Tensor) -> Tensor:
        r"""Largest eigenvalue of :math:`\mathcal M = K - I\otimes I` as a ``C^2 x C^2`` matrix (``B``).

        For independent units, ``M`` is block-structured: entries ``(aa),(aa)`` hold
        ``K_aaaa - I_aa^2 = kappa4_a + 2 I_aa^2``, the ``(ab)`` pairs with ``a != b`` hold
        ``Cov(s_a s_b, s_c s_d)`` which is ``I_aa I_bb`` on the symmetric pair, i.e. eigenvalue
        ``2 I_aa I_bb`` on ``(e_ab + e_ba)/sqrt 2``.
        """
        var = self.unit_variance(h)
        k4 = self.unit_kappa4(h)
        diag = (k4 + 2 * var * var).amax(-1)
        top2 = var.topk(min(2, var.shape[-1]), dim=-1).values
        off = 2 * top2[:, 0] * top2[:, -1] if var.shape[-1] > 1 else torch.zeros_like(diag)
        return torch.maximum(diag, off)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    r"""Softmax over ``C`` logits; targets are class indices in ``[0, C)``.

    ``t(y) = e_y``, ``eta = p = softmax(h)``, ``I = diag(p) - p p^T``, ``nll = logsumexp(h) - h_y``.
    """

    name = "categorical"
    factorized = False

    def flatten(self, h: Tensor) -> Tensor:
        if h.dim() != 2:
            raise ValueError(
                f"categorical: model output must have shape (batch, classes), got {tuple(h.shape)}"
            )
        if h.shape[1] < 2:
            raise ValueError(
                f"categorical: the model output has {h.shape[1]} class; a softmax over one class is constant and its "
                "Fisher is zero. A regression output takes likelihood='gaussian'; a binary one 'bernoulli'"
            )
        return h

    def check_targets(self, h: Tensor, y: Tensor) -> Tensor:
        y = torch.as_tensor(y, device=h.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"categorical: targets must be integer class indices, got dtype {y.dtype}")
        if y.shape[-1:] != h.shape[:1] or y.dim() > 2:
            raise ValueError(
                f"categorical: targets must have shape ({h.shape[0]},) (one class index per input), "
                f"got {tuple(y.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= h.shape[-1]):
            raise ValueError(
                f"categorical: class index out of range [0, {h.shape[-1]}): "
                f"min {int(y.min())}, max {int(y.max())}"
            )
        return y.long()

    def sample(self, h, n, generator=None):
        p = torch.softmax(h.detach(), -1)
        idx = torch.multinomial(p.reshape(-1, p.shape[-1]).float(), n, replacement=True, generator=generator)
        return idx.T.contiguous()  # (n, B)

    def mean(self, h):
        return torch.softmax(h, -1)

    def sufficient(self, y, h):
        return torch.nn.functional.one_hot(y, h.shape[-1]).to(h.dtype)

    def nll(self, h, y):
        return torch.logsumexp(h, -1) - h.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def unit_variance(self, h):
        p = torch.softmax(h, -1)
        return p * (1 - p)

    def unit_moment4(self, h):
        # t_a - p_a is 1 - p_a with probability p_a, else -p_a: E d^4 - (E d^2)^2
        p = torch.softmax(h, -1)
        q = 1 - p
        var = p * q
        return var * (q**3 + p**3) - var * var

    def fisher(self, h):
        p = torch.softmax(h, -1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def fisher_factor(self, h):
        # BackPACK's factor: S = diag(sqrt p) - p sqrt(p)^T, S S^T = diag(p) - p p^T (spec §7.2).
        p = torch.softmax(h, -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)

    @staticmethod
    def _centered_sq(h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(p^T as C x B, d^2)`` with ``d = v - sum_c p_c v_c`` (one fresh tensor, squared in place)."""
        pt = torch.softmax(h, -1).T
        return pt, (v - _wsum(pt, v).unsqueeze(0)).square_()

    def fisher_quad(self, h, v):
        pt, d2 = self._centered_sq(h, v)
        return _wsum(pt, d2)

    def moment4(self, h, v):
        # Var_p((v_Y - vbar)^2) = sum_c p_c d_c^4 - (sum_c p_c d_c^2)^2 (spec §5.3).
        return self.quad_and_moment4(h, v)[1]

    def quad_and_moment4(self, h, v):
        pt, d2 = self._centered_sq(h, v)
        quad = _wsum(pt, d2)
        return quad, _wsum(pt, d2.mul_(d2)) - quad * quad

    def lambda_max_fisher(self, h):
        return torch.linalg.eigvalsh(self.fisher(h)).amax(-1)

    def lambda_min_fisher(self, h):
        """Smallest eigenvalue on the complement of the all-ones vector (``I 1 = 0`` always)."""
        c = h.shape[-1]
        ev = torch.linalg.eigvalsh(self.fisher(h))
        return ev[..., 1] if c > 1 else ev[..., 0]

    def lambda_max_moment4(self, h):
        r""":math:`\lambda_{max}(\mathcal M)` by the ``C x C`` Gram route (spec §4.2)."""
        p = torch.softmax(h, -1)
        c = p.shape[-1]
        s = torch.eye(c, dtype=p.dtype, device=p.device) - p.unsqueeze(-2)  # rows s_y = e_y - p
        g = (s @ s.transpose(-1, -2)) ** 2
        gp = g @ p.unsqueeze(-1)
        pgp = (p.unsqueeze(-2) @ gp).squeeze(-1)
        ones = torch.ones_like(gp)
        gc = g - gp @ ones.transpose(-1, -2) - ones @ gp.transpose(-1, -2) + pgp.unsqueeze(-1) * (
            ones @ ones.transpose(-1, -2)
        )
        sq = p.sqrt()
        return torch.linalg.eigvalsh(sq.unsqueeze(-1) * gc * sq.unsqueeze(-2)).amax(-1)


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
    ``grad = (f - y)/sigma^2``, ``I = I_C / sigma^2``, ``kappa4 = 0`` (spec §5.5).  Note that a summed
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


LIKELIHOODS = {
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "poisson": Poisson,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Resolve a likelihood name (``categorical``, ``bernoulli``, ``gaussian``, ``poisson``) or object.

    >>> get_likelihood("gaussian")
    Gaussian(sigma=1.0)
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood]()
    raise ValueError(f"Invalid likelihood: {likelihood!r}. Must be one of {list(LIKELIHOODS)} or a Likelihood")
