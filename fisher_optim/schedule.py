r"""The refresh and selection schedule of the Fisher optimizers, as one object with its own ``state_dict``.

:class:`Schedule` holds what decides *when* the Fisher is refreshed and *when* auto mode re-selects its per-layer
plan, and nothing that computes: the plan in use and the choices behind it, the counters (steps, refreshes,
selections, steps since the last refresh, refreshes since the last selection, skipped steps), the selection
interval and its back-off, and the cache of selection costs.  The optimizers
(:class:`~fisher_optim.optim.FisherOptimizer`) and ``benchmarks/estimation_quality_stream.py`` (auto's stream) run the
same object; its tests run it without a model (``tests/test_schedule.py``).

The rules:

* a refresh is due at the first step, then every ``fisher_interval`` steps, and whenever a parameter has no
  Fisher state yet (:meth:`Schedule.refresh_due`);
* auto mode: the first refresh is exact (an estimate at once; the selection at the next refresh times a warm
  exact pass; the optimizer starts with Hutchinson instead on outputs with more than ``CLOSED_FORM_SEEDS``
  positions x classes per input, :mod:`fisher_optim.optim.auto`), the second is the first selection, and
  selections follow every ``select_interval`` refreshes (:meth:`Schedule.select_due`; also when a parameter is
  not in the plan).  Each selection that keeps the plan in use doubles the interval to the next one, at most
  ``SELECT_BACKOFF_MAX`` times ``select_interval``; a changed plan resets it (:func:`next_select_interval`,
  applied by :meth:`Schedule.after_selection`);
* selection costs (:class:`fisher_optim.selection.Costs`) are cached by a key (the optimizer's: the selection
  batch's shape and dtype and the selected parameter names): :meth:`Schedule.cached_costs` returns them until
  they were reused ``COST_REUSE`` times (timings drift with the machine's load), then ``None`` (measure again);
  at most ``COST_CACHE_SIZE`` keys are kept, the oldest dropped first.  The cache is not part of
  :meth:`Schedule.state_dict` (timings belong to the machine, not to the run).

:meth:`Schedule.state_dict` has the layout the optimizers have saved since 0.1.0 under their ``"fisher_optim"``
entry: ``{"plan", "choices", "counters"}``, so old checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .selection import Costs

__all__ = ["Schedule", "next_select_interval", "SELECT_BACKOFF_MAX", "COST_REUSE", "COST_CACHE_SIZE"]

#: a plan that holds doubles the interval between selections, up to this many times the base interval
SELECT_BACKOFF_MAX = 8
#: a cached selection cost is re-measured after this many reuses (timings drift with the machine's load)
COST_REUSE = 10
#: at most this many cached selection costs (keys) are kept, the oldest dropped first
COST_CACHE_SIZE = 8

_CHOICE_KEYS = ("estimator", "n_samples", "rse", "cost", "reason", "source")


def next_select_interval(interval: int, base: int, changed: bool) -> int:
    """Refreshes until the next selection: back to ``base`` when the plan changed, else doubled (at most
    ``SELECT_BACKOFF_MAX * base``): a plan that keeps winning is re-checked less and less often."""
    return base if changed else min(2 * interval, SELECT_BACKOFF_MAX * base)


class Schedule:
    """When to refresh the Fisher and when to re-select the plan (see the module docstring).

    Args:
        fisher_interval: steps between refreshes.
        select_interval: refreshes between selections (the base of the back-off).

    The caller runs, per step: :meth:`refresh_due`; on a refresh, in auto mode, :meth:`select_due` (a
    selection, then :meth:`after_selection`) or :meth:`plan_for`; then :meth:`after_refresh` once the refresh is
    folded in, and :meth:`after_step` (or :meth:`after_skip` for a step skipped for non-finite values).
    """

    def __init__(self, fisher_interval: int, select_interval: int):
        self.fisher_interval = fisher_interval
        self.select_interval = select_interval
        self.plan: dict[str, tuple[str, int]] | None = None  # auto mode: the plan in use
        self.choices: dict[str, dict] = {}  # ... and the choices behind it (report rows)
        self.steps = 0
        self.refreshes = 0
        self.selections = 0
        self.since_refresh = 0
        self.since_select = 0
        self.skipped = 0
        self.select_every = select_interval  # grows while the plan holds
        self.plan_costs: tuple[float, float] = (math.nan, math.nan)  # the last selection's: plan, all exact
        self.plan_summary = ""
        self._cost_cache: dict[Any, list] = {}  # key -> [Costs, reuses]; not in state_dict

    # -- decisions ------------------------------------------------------------------------------------
    def refresh_due(self, missing_state: bool = False) -> bool:
        """Whether this step refreshes: the first step, every ``fisher_interval`` steps, or a parameter
        without Fisher state (``missing_state``; a caller whose check has side effects may instead test it only
        when this returns ``False``)."""
        return self.refreshes == 0 or self.since_refresh >= self.fisher_interval or missing_state

    def select_due(self, names) -> bool:
        """Auto mode, at a refresh: whether it is a selection.  Never the first refresh (exact, see
        :meth:`plan_for`); then when there is no plan, a parameter of ``names`` is not in it, or
        ``select_every`` refreshes have passed since the last selection."""
        if self.plan is None and self.refreshes == 0:
            return False
        return self.plan is None or self.since_select >= self.select_every or any(n not in self.plan for n in names)

    def plan_for(self, names) -> dict[str, tuple[str, int]]:
        """Auto mode, at a refresh that is not a selection: the plan in use for ``names`` (exact everywhere
        before the first selection)."""
        if self.plan is None:
            return {n: ("exact", 1) for n in names}
        return {n: self.plan[n] for n in names}

    # -- transitions ----------------------------------------------------------------------------------
    def after_selection(
        self,
        choices: dict[str, dict],
        changed: bool,
        plan_cost: float = math.nan,
        exact_cost: float = math.nan,
        summary: str = "",
    ) -> None:
        """A selection made ``choices`` (``{name: {estimator, n_samples, rse, cost, reason, source}}``): it becomes the
        plan in use, and the interval to the next selection backs off (kept) or resets (``changed``)."""
        self.select_every = next_select_interval(self.select_every, self.select_interval, changed)
        self.plan_costs, self.plan_summary = (float(plan_cost), float(exact_cost)), summary
        self.choices = {n: {k: c[k] for k in _CHOICE_KEYS if k in c} for n, c in choices.items()}
        self.plan = {n: (c["estimator"], c["n_samples"]) for n, c in self.choices.items()}
        self.selections += 1
        self.since_select = 0

    def after_refresh(self) -> None:
        """A refresh was folded into the running Fisher."""
        self.refreshes += 1
        self.since_refresh = 0
        self.since_select += 1

    def refresh_next(self) -> None:
        """Make the next step a refresh (a parameter has no curvature information yet)."""
        self.since_refresh = max(self.since_refresh, self.fisher_interval - 1)

    def after_step(self) -> None:
        """A step was taken."""
        self.steps += 1
        self.since_refresh += 1

    def after_skip(self) -> None:
        """A step was skipped (non-finite values): nothing but the skip counter changes."""
        self.skipped += 1

    # -- selection costs ------------------------------------------------------------------------------
    def cached_costs(self, key) -> Costs | None:
        """The costs cached for ``key``, or ``None`` when there are none or they were reused ``COST_REUSE``
        times already (measure again)."""
        entry = self._cost_cache.get(key)
        return None if entry is None or entry[1] >= COST_REUSE else entry[0]

    def remember_costs(self, key, costs: Costs, reused: bool) -> None:
        """Cache ``costs`` for ``key``: one more reuse of the cached entry (``reused``) or a fresh measurement;
        keep the newest ``COST_CACHE_SIZE`` keys."""
        entry = self._cost_cache.pop(key, None)
        self._cost_cache[key] = [costs, entry[1] + 1 if reused and entry is not None else 0]
        while len(self._cost_cache) > COST_CACHE_SIZE:
            del self._cost_cache[next(iter(self._cost_cache))]

    @property
    def cost_cache(self) -> dict:
        """Read-only view ``{key: (Costs, reuses)}`` of the cost cache (newest last)."""
        return {k: (v[0], v[1]) for k, v in self._cost_cache.items()}

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"plan", "choices", "counters"}`` in plain types (the layout of 0.1.0's optimizer checkpoints);
        the cost cache is left out."""
        return {
            "plan": None if self.plan is None else {n: [e, k] for n, (e, k) in self.plan.items()},
            "choices": {n: dict(c) for n, c in self.choices.items()},
            "counters": {
                "steps": self.steps,
                "refreshes": self.refreshes,
                "selections": self.selections,
                "since_refresh": self.since_refresh,
                "since_select": self.since_select,
                "select_every": self.select_every,
                "plan_costs": list(self.plan_costs),
                "plan_summary": self.plan_summary,
                "skipped": self.skipped,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`.  ``select_every``, ``plan_costs`` and ``plan_summary`` may be missing
        (checkpoints older than the back-off): they default to ``select_interval``, ``nan`` and ``""``.  The cost
        cache is left as it is."""
        plan = state["plan"]
        self.plan = None if plan is None else {n: (e, int(k)) for n, (e, k) in plan.items()}
        self.choices = {n: dict(c) for n, c in state["choices"].items()}
        c = state["counters"]
        self.steps, self.refreshes, self.selections = c["steps"], c["refreshes"], c["selections"]
        self.since_refresh, self.since_select, self.skipped = c["since_refresh"], c["since_select"], c["skipped"]
        self.select_every = int(c.get("select_every", self.select_interval))
        self.plan_costs = tuple(float(v) for v in c.get("plan_costs", (math.nan, math.nan)))
        self.plan_summary = str(c.get("plan_summary", ""))

    def __repr__(self) -> str:
        return (
            f"Schedule(fisher_interval={self.fisher_interval}, select_interval={self.select_interval}, "
            f"steps={self.steps}, refreshes={self.refreshes}, selections={self.selections}, "
            f"select_every={self.select_every})"
        )
