r"""Exponential-family output likelihoods (docs/fisher-math.md §1, §5).

A network output row ``h`` (one row per input) holds the natural parameters of
:math:`p(y \mid h) = \exp(t(y)^\top h - F(h))`.  Every likelihood here provides

* ``sample(h, n, generator)``: ``n`` labels per input, shape ``(n, B, ...)``;
* ``nll(h, y)``: per-input negative log-likelihood, summed over output units, shape ``(B,)``;
* ``mean(h)``: :math:`\eta(h) = \nabla F(h)`;
* ``grad(h, y)``: :math:`\partial(-\log p)/\partial h = \eta(h) - t(y)` (the per-input score seed);
* ``fisher(h)`` and ``fisher_factor(h)``: :math:`I(h)` (``B x C x C``) and ``S`` with :math:`S S^\top = I(h)`;
* ``fisher_quad(h, v)``: :math:`v^\top I(h) v` for directions ``v`` stacked on axis 0 (``C x B x ...``);
* ``moment4(h, v)``: :math:`\mathcal M(v,v,v,v) = \mathrm{Var}\big((v^\top(t-\eta))^2\big)
  = \kappa(v^4) + 2 (v^\top I v)^2`, the single-sample variance of :math:`\hat I_1` along ``v`` (docs/fisher-math.md
  §3.2).

Outputs are flattened to ``(B, D)``: ``categorical`` takes ``(B, C)`` (one row of ``C`` logits per input)
or outputs with positions, ``(B, ..., C)`` or, with ``class_dim=1``, ``(B, C, ...)``, flattened to
``D = T*C`` with one softmax per position (docs/fisher-math.md §12, :class:`Categorical`); the factorised families
(``bernoulli``, ``gaussian``, ``poisson``) treat every output entry of an input as one independent unit, so
an output of shape ``(B, 1, 28, 28)`` is ``D = 784`` units.


Layout: :mod:`.base` (the interface), :mod:`.categorical`, :mod:`.factorized` (Bernoulli, Gaussian, Poisson).
"""

from __future__ import annotations

from .base import Likelihood, wsum
from .categorical import Categorical
from .factorized import Bernoulli, Gaussian, Poisson

__all__ = [
    "Likelihood",
    "Categorical",
    "Bernoulli",
    "Gaussian",
    "Poisson",
    "get_likelihood",
    "LIKELIHOODS",
    "wsum",
]


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
