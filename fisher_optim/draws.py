r"""Per-probe draws of the sampled estimators, for the selection where the closed-form moments are too dear.

On a language model the closed-form moments (:func:`~fisher_optim.variance.moments_from_probe`,
:func:`~fisher_optim.variance.factor_moments`) need one seed per position and class, ``T*C`` per input, as many as
the exact pass.  :func:`probe_draws` instead runs ``K`` probes per input of Î₁ and of Hutchinson (``2K`` seeds per
input) and keeps every probe's estimate apart, so that (docs/fisher-math.md §14):

* their mean is an unbiased estimate of :math:`\sum_m F_i(x_m)` (sum over inputs, positions summed within an input);
* the sample variance over the ``K`` probes of one family is unbiased for the variance of that family's
  one-probe estimate of the sum over inputs, :math:`\sum_m v(\theta_i|x_m)` (the probes of different inputs are
  independent), the quantity :class:`~fisher_optim.variance.OnlineVariance` pools over refreshes;
* the product of two independent Hutchinson probes' per-input squares, summed over inputs, is unbiased for
  :math:`\sum_m F_i(x_m)^2` (the input noise of :func:`~fisher_optim.plan_search.unit_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Probe
from .estimators import hutchinson_seeds, sampled_seeds

__all__ = ["DRAW_PROBES", "Draws", "SampledMoments", "probe_draws"]

#: probes per input and family in :func:`probe_draws` (at least 2: a sample variance needs two)
DRAW_PROBES = 4


@dataclass
class Draws:
    """What :func:`probe_draws` returns, every entry a sum over inputs (not divided by ``M``).

    ``per_probe[family][name]``: ``(K, *shape)``, one estimate of :math:`\\sum_m F_i(x_m)` per probe;
    ``pair[name]``: :math:`\\sum_m \\hat F^{(0)}_i(x_m) \\hat F^{(1)}_i(x_m)` over two Hutchinson probes;
    ``m``: the number of inputs."""

    per_probe: dict[str, dict[str, Tensor]]
    pair: dict[str, Tensor]
    m: int

    def cross(self) -> dict[str, Tensor]:
        r"""Î₁'s mean times Hutchinson's, entry by entry: independent given the inputs, so unbiased for
        :math:`(\sum_m F_i(x_m))^2` (the square of one estimate is biased up by its variance)."""
        mc1, hut = self.per_probe["mc1"], self.per_probe["hutchinson"]
        return {n: mc1[n].mean(0) * hut[n].mean(0) for n in mc1}

    def fisher(self) -> dict[str, Tensor]:
        """The mean over every probe of every family: unbiased for :math:`\\sum_m F_i(x_m)`."""
        fams = list(self.per_probe.values())
        return {n: sum(f[n].mean(0) for f in fams) / len(fams) for n in fams[0]}


@dataclass
class SampledMoments:
    """The moments :func:`~fisher_optim.plan_search.unit_stats` reads (as :class:`~fisher_optim.variance.FisherMoments`:
    sums over inputs), from draws: ``fisher`` their mean, ``fisher_sq`` :attr:`Draws.pair`, ``v1`` a one-probe
    variance, ``cross`` :meth:`Draws.cross` (the unbiased square of ``fisher``, which
    :func:`~fisher_optim.plan_search.tensor_sums` uses in place of ``fisher ** 2``)."""

    fisher: dict[str, Tensor]
    fisher_sq: dict[str, Tensor]
    v1: dict[str, Tensor]
    cross: dict[str, Tensor]
    v2: None = None


def _per_probe_stats(k: int):
    def fn(x: Tensor, idx: slice) -> tuple[Tensor, ...]:
        sq = [x[j] * x[j] for j in range(k)]
        return (*sq, sq[0] * sq[1])

    return fn, (2,) * k + (4,)


def _reduce(probe: Probe, seeds: Tensor, names: list[str]) -> list[dict[str, Tensor]]:
    """Per probe ``sum_m g_mk^2`` and ``sum_m g_m0^2 g_m1^2`` for ``names`` (zeros for unused parameters)."""
    k = seeds.shape[0]
    fn, degrees = _per_probe_stats(k)
    outs: list[dict[str, Tensor]] = [{} for _ in degrees]
    for rec, keys in probe.seeded(seeds, names=names):
        for out, vals in zip(outs, rec.reduce_many(fn, degrees)):
            for key, name in keys.items():
                out[name] = vals[key].reshape(probe.params[name].shape)
    zero = torch.contiguous_format
    return [{n: o[n] if n in o else torch.zeros_like(probe.params[n], memory_format=zero) for n in names} for o in outs]


def probe_draws(
    probe: Probe, generator: torch.Generator | None = None, k: int = DRAW_PROBES, mask: Tensor | None = None,
    names=None,
) -> Draws:
    """``k`` probes per input of Î₁ (sampled labels) and of Hutchinson (Rademacher through the per-position factor),
    each reduced on its own (one seeded backward of ``k`` seeds per family), for ``names`` (default: all of the
    probe's parameters).  ``mask`` (``B x D``) zeroes unlabelled positions, as in the estimators."""
    if k < 2:
        raise ValueError(f"Invalid k: {k}")
    names = list(probe.params) if names is None else [n for n in probe.params if n in set(names)]
    _, s_mc1 = sampled_seeds(probe, k, generator, mask)
    s_h = hutchinson_seeds(probe, k, generator, mask)
    mc1 = _reduce(probe, s_mc1, names)
    hut = _reduce(probe, s_h, names)
    per_probe = {
        "mc1": {n: torch.stack([mc1[j][n] for j in range(k)]) for n in names},
        "hutchinson": {n: torch.stack([hut[j][n] for j in range(k)]) for n in names},
    }
    return Draws(per_probe, hut[k], int(probe.h.shape[0]))
