"""The exponential-family interface (:class:`Likelihood`) and the shared contraction :func:`wsum`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Likelihood", "wsum"]


def wsum(w: Tensor, x: Tensor) -> Tensor:
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

    def target_mask(self, h: Tensor, y: Tensor) -> Tensor | None:
        """``(B, C)`` seed mask from targets (0 where a unit has no label), ``None`` when nothing is masked.

        Only :class:`Categorical` has unlabelled positions (``ignore_index``); the factorised families use
        targets as labels only.
        """
        raise ValueError(f"{self.name}: targets are only used by estimator 'empirical' (masks need 'categorical')")

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
        return wsum(self.unit_variance(h).T, v * v)

    def moment4(self, h: Tensor, v: Tensor) -> Tensor:
        r""":math:`\kappa(v,v,v,v) + 2 (v^\top I v)^2` per input (docs/fisher-math.md §5.2) -> ``B x ...``."""
        return self.quad_and_moment4(h, v)[1]

    def quad_and_moment4(self, h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(fisher_quad(h, v), moment4(h, v))`` in one pass (shared squares): ``(B x ..., B x ...)``."""
        v2 = v * v
        quad = wsum(self.unit_variance(h).T, v2)
        return quad, wsum(self.unit_kappa4(h).T, v2.square_()) + 2 * quad * quad

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
