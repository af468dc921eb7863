"""One training run of the optimizer benchmark as it is saved (``Run``) and read back (``runs_of``).

Shared by ``benchmarks/optimizers.py`` (which trains and saves the runs) and ``benchmarks/optimizers_report.py``
(which reads them back), so that the report does not import the runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Run", "runs_of"]


@dataclass
class Run:
    problem: str
    optimizer: str
    lr: float
    seed: int
    steps: int = 0  # steps taken
    train_s: float = 0.0  # training wall-clock, evaluation excluded
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_s, validation metric)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean training loss since the last eval)
    steps_to_target: float = math.inf
    time_to_target: float = math.inf
    final_val: float = math.nan
    test: float = math.nan
    diverged: bool = False
    capped: bool = False  # stopped by the problem's time cap
    error: str = ""

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.train_s / self.steps if self.steps else math.nan


def runs_of(res: dict, problem: str, kind: str, opt: str) -> list[Run]:
    """The saved runs of one optimizer on one problem (``kind``: ``"tuning"`` or ``"final"``)."""
    return [Run(**{**d, "curve": [tuple(c) for c in d["curve"]], "losses": [tuple(c) for c in d.get("losses", [])]})
            for d in res["problems"][problem][kind][opt]]  # fmt: skip
