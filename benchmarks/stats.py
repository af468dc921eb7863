r"""Statistics of the optimizer benchmark's report: medians with bootstrap intervals and paired comparisons.

Everything is seeded (``numpy.random.default_rng(seed)``, seed 0 unless given), so a report renders the same
numbers from the same results.

* :func:`median_ci`: the median over seeds and a percentile bootstrap interval (resampling the seeds with
  replacement, ``n_boot`` times).  A run that never reached the target counts as ``inf``, so a median or a bound
  is ``inf`` when half or more of the (resampled) runs never got there.
* :func:`paired_ratio`: per seed :math:`r_s = a_s / b_s` (the same seed gives both optimizers the same initial
  parameters and mini-batch order), the median of :math:`r_s` and its bootstrap interval, and the sign count
  (seeds where ``a`` is smaller, larger, equal) with a two-sided exact sign-test p-value.  A seed where neither
  reached the target is left out of a steps/time ratio (no information); one where only ``a`` did gives
  :math:`r_s = 0`, only ``b``: :math:`r_s = \infty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_PAIRS = 3  # fewer seed pairs than this never give a verdict (the bootstrap interval would be degenerate)

__all__ = ["median_ci", "paired_ratio", "paired_difference", "Paired", "sign_test"]


def median_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(median, low, high)`` over ``values`` (``inf`` allowed; NaN entries dropped); NaNs if none are left."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    med = float(np.median(x))
    if x.size == 1:
        return med, med, med
    rng = np.random.default_rng(seed)
    boots = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return med, float(lo), float(hi)


def sign_test(n_less: int, n_more: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a split at least this uneven | each side has chance 1/2)."""
    n = n_less + n_more
    if n == 0:
        return 1.0
    k = min(n_less, n_more)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class Paired:
    """A paired comparison of ``a`` with ``b`` over seeds (see the module docstring)."""

    median: float
    low: float
    high: float
    n: int  # seeds used
    n_less: int  # seeds where a < b
    n_more: int  # seeds where a > b
    p: float  # sign test

    @property
    def verdict(self) -> str:
        """``"less"`` / ``"more"`` when the whole interval is on one side of the null value (with at least
        ``MIN_PAIRS`` pairs), else ``"unclear"``."""
        return self._verdict(1.0)

    def _verdict(self, null: float) -> str:
        if self.n < MIN_PAIRS or math.isnan(self.median):
            return "unclear"
        return "less" if self.high < null else "more" if self.low > null else "unclear"


def _pairs(a: dict[int, float], b: dict[int, float]) -> list[tuple[float, float]]:
    return [(a[s], b[s]) for s in sorted(set(a) & set(b)) if not (math.isnan(a[s]) or math.isnan(b[s]))]


def paired_ratio(a: dict[int, float], b: dict[int, float], **kw) -> Paired:
    """Per-seed ratios ``a[s] / b[s]`` over the seeds both have (``inf`` = never reached; both ``inf``: left out)."""
    ratios, less, more = [], 0, 0
    for x, y in _pairs(a, b):
        if math.isinf(x) and math.isinf(y):
            continue
        if y == 0:  # the reference reached the target before its first step (a smoke run's easy target)
            ratios.append(1.0 if x == 0 else math.inf)
        else:
            ratios.append(0.0 if math.isinf(y) else math.inf if math.isinf(x) else x / y)
        less += x < y
        more += x > y
    med, lo, hi = median_ci(ratios, **kw)
    return Paired(med, lo, hi, len(ratios), less, more, sign_test(less, more))


class PairedDifference(Paired):
    @property
    def verdict(self) -> str:
        return self._verdict(0.0)


def paired_difference(a: dict[int, float], b: dict[int, float], **kw) -> PairedDifference:
    """Per-seed differences ``a[s] - b[s]`` (finite values only), e.g. of a final validation metric."""
    diffs = [x - y for x, y in _pairs(a, b) if math.isfinite(x) and math.isfinite(y)]
    less = sum(d < 0 for d in diffs)
    more = sum(d > 0 for d in diffs)
    med, lo, hi = median_ci(diffs, **kw)
    return PairedDifference(med, lo, hi, len(diffs), less, more, sign_test(less, more))
