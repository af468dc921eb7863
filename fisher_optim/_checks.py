"""Argument validators shared by the library: one home, torch.optim's message form ``Invalid <name>: <value>``
(followed by what was expected where it is not obvious).  Each returns the validated value."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "ESTIMATORS",
    "check_choice",
    "check_estimator",
    "check_n_samples",
    "check_reduction",
    "check_positive_int",
    "check_positive_float",
    "check_nonnegative",
    "check_finite_nonnegative",
    "check_decay",
    "check_clip",
    "check_output_spec",
]

#: the estimators of :func:`fisher_optim.diagonal_fisher`
ESTIMATORS = ("exact", "mc1", "mc2", "empirical", "hutchinson", "hutchinson_batch", "gnb")

def check_choice(name: str, value, allowed) -> Any:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        quoted = " or ".join(repr(a) for a in allowed) if len(allowed) == 2 else f"one of {list(allowed)}"
        raise ValueError(f"Invalid {name}: {value!r}. Must be {quoted}")
    return value


def check_estimator(estimator: str, allowed=ESTIMATORS) -> str:
    if estimator not in allowed:
        raise ValueError(f"Invalid estimator: {estimator!r}. Must be one of {list(allowed)}")
    return estimator


def check_positive_int(name: str, value, allow_none: bool = False) -> int | None:
    """An integer ``>= 1`` (not a bool); ``None`` too with ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value}")
    return int(value)


def check_n_samples(n_samples) -> int:
    return check_positive_int("n_samples", n_samples)


def check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid reduction: {reduction!r}. Must be 'mean' or 'sum'")
    return reduction


def check_positive_float(name: str, value) -> float:
    """A real number ``> 0`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def check_nonnegative(label: str, value) -> float:
    """A number ``>= 0``; ``label`` as torch.optim words it (``"learning rate"``, ``"weight_decay value"``)."""
    if not 0.0 <= value:
        raise ValueError(f"Invalid {label}: {value}")
    return value


def check_finite_nonnegative(name: str, value) -> float:
    """A finite real number ``>= 0`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def check_decay(label: str, value) -> float:
    """A decay or momentum in ``[0, 1)``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {label}: {value}")
    return value


def check_clip(clip) -> float | None:
    """A per-coordinate step bound ``> 0``, or ``None`` (no clip)."""
    if clip is not None and not clip > 0.0:
        raise ValueError(f"Invalid clip value: {clip}")
    return clip


def check_output_spec(output: Any) -> Any:
    """Validate ``output=`` at construction time: ``None``, a key, an index or a callable."""
    if output is None or (isinstance(output, (str, int)) and not isinstance(output, bool)) or callable(output):
        return output
    raise ValueError(f"Invalid output: {output!r}")
