r"""Learning-rate tuning for the optimizer benchmark: a half-decade log grid, extended until the best is interior.

Grid.  Learning rates are the points :math:`10^{e/2}` for integer :math:`e` (a factor :math:`\sqrt{10}` apart,
half a decade); the first three are centred on the point nearest the optimizer's default lr
(:func:`start_exponents`).  Every value trains once with seed 0 for the problem's fixed budget of steps.

Choice (on the validation split).  :func:`selection_key`: fewest steps to the validation target; among runs
that tie there, or never reach it, the best final validation metric; a diverged or failed run is worst.
Ties go to the smaller lr.

Extension.  :class:`GridSearch` asks for one more value beyond an edge while the best value sits at that edge:
below the smallest if the smallest is best, above the largest if the largest is best.  It stops when the best
value has a tried neighbour on both sides (interior), or after ``max_values`` values, in which case the choice is
an **edge choice** and the report flags it.  A diverged value beyond the best one makes the best interior, as it
should: the tuned lr is then the largest stable value of the grid or one below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["lr_of", "start_exponents", "selection_key", "GridSearch"]


def lr_of(exponent: int) -> float:
    """The grid point :math:`10^{e/2}` (rounded to 4 significant digits so that it prints and keys stably)."""
    return float(f"{10 ** (exponent / 2):.4g}")


def start_exponents(default_lr: float, n: int = 3) -> list[int]:
    """``n`` consecutive exponents centred on the grid point nearest ``default_lr``."""
    if not default_lr > 0:
        raise ValueError(f"Invalid default lr: {default_lr}")
    centre = round(2 * math.log10(default_lr))
    return [centre + i - (n - 1) // 2 for i in range(n)]


def selection_key(steps_to_target: float, final_val: float, higher_is_better: bool, failed: bool) -> tuple:
    """Smaller is better: (steps to target, minus the goodness of the final validation metric)."""
    if failed or not math.isfinite(final_val):
        return (math.inf, math.inf)
    return (steps_to_target, -final_val if higher_is_better else final_val)


@dataclass
class GridSearch:
    """The tuning state of one (problem, optimizer): tried exponents and their keys, and what to try next.

    The caller runs :meth:`next` and reports its key with :meth:`record` until :meth:`next` says None; ``pending``
    holds the exponents still to run, and once it is empty :meth:`extend` adds one beyond the edge where the best
    sits, if any and if ``max_values`` allows.
    """

    default_lr: float
    max_values: int = 8
    n_start: int = 3
    keys: dict[int, tuple] = field(default_factory=dict)
    pending: list[int] = field(default_factory=list)
    stopped: str = ""  # why tuning stopped early (e.g. the time cap), or ""

    def __post_init__(self):
        if self.max_values < self.n_start:
            raise ValueError(f"Invalid max_values: {self.max_values} (fewer than the {self.n_start} start values)")
        if not self.keys and not self.pending:
            self.pending = start_exponents(self.default_lr, self.n_start)

    def record(self, exponent: int, key: tuple) -> None:
        self.keys[exponent] = key
        if exponent in self.pending:
            self.pending.remove(exponent)

    def best(self) -> int:
        return min(self.keys, key=lambda e: (self.keys[e], e))

    def edge(self) -> str:
        """``"low"`` / ``"high"`` if the best tried value is the smallest / largest tried, else ``""``."""
        if len(self.keys) < 2:
            return "low" if self.keys else ""
        b = self.best()
        return "low" if b == min(self.keys) else "high" if b == max(self.keys) else ""

    def extend(self) -> bool:
        """Queue one more exponent beyond the best's edge; False when interior, stopped, or out of values."""
        if self.pending or self.stopped or len(self.keys) >= self.max_values:
            return False
        side = self.edge()
        if not side:
            return False
        self.pending.append(min(self.keys) - 1 if side == "low" else max(self.keys) + 1)
        return True

    def next(self) -> int | None:
        """The next exponent to run (queuing an extension when one is due), or None when tuning is over."""
        if self.stopped:
            return None
        if not self.pending:
            self.extend()
        return self.pending[0] if self.pending else None


def run_grid(search: GridSearch, train: Callable[[float], tuple]) -> GridSearch:
    """Run ``search`` to completion with ``train(lr) -> selection key`` (one optimizer alone; tests, scripts)."""
    while (e := search.next()) is not None:
        search.record(e, train(lr_of(e)))
    return search
