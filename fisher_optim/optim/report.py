"""The Fisher optimizers' report: per parameter, the estimator in use and the running Fisher's mean; run counters."""

from __future__ import annotations

import math

__all__ = ["FisherReport", "report_row"]


class FisherReport(dict):
    """``{parameter name: {estimator, n_samples, rse, cost, reason, fisher_mean}}`` plus run counters.

    ``rse`` is the predicted relative standard error of the running estimate and ``cost`` the predicted
    cost of one refresh for that tensor (in ``cost_unit``: ``"s"`` with the measured cost model,
    ``"param-units"`` with the flops model), both from :func:`fisher_optim.selection.select` (``nan`` for a
    fixed estimator); ``fisher_mean`` is the mean entry of the bias-corrected running Fisher.  Attributes:
    ``steps`` (successful steps), ``refreshes``, ``selections``, ``skipped_steps`` (non-finite steps), and in
    auto mode ``plan_cost`` / ``exact_cost`` (the last selection's predicted seconds of one refresh with its plan
    and with exact everywhere, :meth:`fisher_optim.selection.Costs.refresh_cost`; ``nan`` before it) and
    ``select_every`` (refreshes from one selection to the next, grown while the plan holds) and ``summary``
    (:attr:`fisher_optim.selection.Selection.summary`: the plan against exact everywhere and all-Î₁).
    """

    steps: int = 0
    refreshes: int = 0
    selections: int = 0
    skipped_steps: int = 0
    plan_cost: float = math.nan
    exact_cost: float = math.nan
    select_every: int = 0
    summary: str = ""
    cost_unit: str = "s"

    def count(self, schedule, auto: bool) -> None:
        """Copy the run counters of ``schedule`` (:class:`fisher_optim.schedule.Schedule`), and in auto mode its last
        selection's costs, summary and interval."""
        self.steps, self.refreshes, self.selections, self.skipped_steps = (
            schedule.steps, schedule.refreshes, schedule.selections, schedule.skipped,
        )  # fmt: skip
        if auto:
            self.plan_cost, self.exact_cost = schedule.plan_costs
            self.summary = schedule.plan_summary
            self.select_every = schedule.select_every

    def table(self) -> str:
        """The report as a fixed-width text table."""
        w = max([len("parameter"), *map(len, self)])
        cost = f"cost [{self.cost_unit}]"
        lines = [f"{'parameter':<{w}}  estimator  N   rse       {cost:<9} mean F     reason"]
        for name, r in self.items():
            lines.append(
                f"{name:<{w}}  {r['estimator']:<9}  {r['n_samples']:<3} {r['rse']:<9.3g} {r['cost']:<9.3g} "
                f"{r['fisher_mean']:<10.3g} {r['reason']}"
            )
        lines.append(
            f"steps {self.steps}, refreshes {self.refreshes}, selections {self.selections}, "
            f"skipped (non-finite) {self.skipped_steps}"
        )
        if self.plan_cost == self.plan_cost:
            lines.append(f"last selection: {self.summary}; next selection {self.select_every} refreshes after it")
        return "\n".join(lines)


def report_row(estimator: str, n_samples: int, choice: dict | None) -> dict:
    """One parameter's row before its ``fisher_mean``: a fixed estimator's, or in auto mode the last selection's
    ``choice`` (``None`` before the first selection; choices saved before the source was reported lack it)."""
    if estimator != "auto":
        return dict(estimator=estimator, n_samples=n_samples, rse=math.nan, cost=math.nan,
                    reason=f"fixed (estimator={estimator!r})", source="-")  # fmt: skip
    if choice is None:
        return dict(estimator="-", n_samples=0, rse=math.nan, cost=math.nan, reason="not selected yet", source="-")
    return {"source": "-", **choice}
