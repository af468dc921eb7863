r"""The units of the update: how the running Fisher (per input) becomes the scale of the loss being trained.

Every estimate of :mod:`fisher_optim` is the **mean over inputs of the per-input Fisher** :math:`F`
(:func:`fisher_optim.diagonal_fisher`; for outputs with positions the per-input Fisher is the *sum* over
positions).  The optimizers train on a loss :math:`L = w \sum_{m \le B} \ell_m` over the ``B`` inputs of the
mini-batch, :math:`\ell_m` the input's NLL (summed over its positions), averaged by DDP over ``W`` ranks.  Under
the model (labels drawn from it, docs/fisher-math.md §15):

* the **covariance** of :math:`\nabla L` is :math:`w^2 B F / W` (Adam's second moment is about this plus the
  squared mean gradient): FisherAdam's units, ``adam_scale``;
* the **curvature** (Gauss-Newton) of :math:`L` is :math:`w B F`: NaturalGradient's units, ``curvature_scale``.

``FisherSettings.loss_reduction`` says what :math:`w` is:

========================  =====================================================  ===========================
``loss_reduction``         the loss                                               :math:`w`
========================  =====================================================  ===========================
``"mean"`` (default)       mean over the inputs of the per-input NLL (summed over   :math:`1/B`
                           positions): ``F.cross_entropy`` on ``(B, C)`` logits
``"element_mean"``         mean over every output element: torch's losses with      :math:`1/(B K)`
                           ``reduction="mean"`` on flattened ``(B, T, V)`` logits
                           (token mean) or on ``(B, D)`` Bernoulli/Gaussian outputs
``"sum"``                  sum over the inputs                                      :math:`1`
========================  =====================================================  ===========================

``K`` is the number of elements per input: positions for ``categorical`` (``T`` for ``(B, T, V)`` logits, 1 for
``(B, C)``), output units for the other likelihoods.  With ``ignore_index`` padding a token-mean loss averages over
fewer elements than ``B K``; the scale then errs on the small side by the labelled fraction (the Fisher itself
leaves padded positions out when ``targets=`` are given).  ``B`` is the number of inputs of the captured batch:
with gradient accumulation, the micro-batches since the last step joined (not only the ``fisher_batch`` inputs the
estimation uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..likelihoods import Categorical, Likelihood

__all__ = ["LossScale"]


@dataclass(frozen=True)
class LossScale:
    """The training loss's size: ``inputs`` (``B``), ``elements`` per input (``K``; read from the output only for
    ``"element_mean"``, 1 otherwise, where it plays no part), ``world`` (DDP ranks ``W``) and ``reduction``; the two
    factors of the module docstring."""

    inputs: int
    elements: int = 1
    world: int = 1
    reduction: str = "mean"

    def _w(self) -> float:
        if self.reduction == "mean":
            return 1.0 / self.inputs
        if self.reduction == "element_mean":
            return 1.0 / (self.inputs * self.elements)
        return 1.0

    @property
    def adam_scale(self) -> float:
        r""":math:`w^2 B / W`: the running Fisher times this is the covariance of the training gradient."""
        return self._w() ** 2 * self.inputs / self.world

    @property
    def curvature_scale(self) -> float:
        r""":math:`w B`: the running Fisher times this is the Gauss-Newton curvature of the training loss."""
        return self._w() * self.inputs

    @staticmethod
    def elements_per_input(likelihood: Likelihood, output_shape: tuple[int, ...] | None) -> int:
        """``K`` from the shape of the model's natural parameters (1 when unknown)."""
        if output_shape is None or len(output_shape) < 2:
            return 1
        if isinstance(likelihood, Categorical):
            h = likelihood.flatten(torch.empty(output_shape, device="meta"))
            return int(likelihood.n_positions(h))
        return int(math.prod(output_shape[1:]))
