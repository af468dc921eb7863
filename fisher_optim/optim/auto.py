r"""Auto mode's estimation steps for the Fisher optimizers: the first refresh and a selection.

* :func:`start_plan`: before any selection there is no plan.  On outputs with at most
  :data:`~fisher_optim.selection.CLOSED_FORM_SEEDS` seeds per input (classes, or positions x classes) the first
  refresh is exact (an estimate at once; the selection at the next refresh times a warm exact pass); past it (a
  language model: ``T*C`` seeds per input, an exact pass takes seconds) it is :data:`START`, Hutchinson with one
  probe per input (unbiased, relative std at most :math:`\sqrt2` per input and coordinate whatever the softmax):
  no pass with the exact pass's seeds ever runs.
* :func:`select`: :func:`~fisher_optim.selection.run_selection` with the schedule's cached costs and the
  optimizer's online variance trackers (``online``, fed by every selection's per-probe draws past
  ``CLOSED_FORM_SEEDS``, docs/fisher-math.md §14), as plain-typed choices for the schedule and the report.

Scaling: every estimate is the mean over the inputs of the per-input Fisher (positions summed within an input).
"""

from __future__ import annotations

from torch import Tensor

from ..schedule import Schedule
from ..selection import CLOSED_FORM_SEEDS, run_selection

__all__ = ["START", "select", "start_plan"]

#: auto mode's first plan past ``CLOSED_FORM_SEEDS`` seeds per input: Hutchinson, one probe per input
START = ("hutchinson", 1)

_KEYS = ("estimator", "n_samples", "rse", "cost", "reason", "source")


def start_plan(names: list[str], output_size: int | None) -> dict[str, tuple[str, int]]:
    """The first refresh's plan: exact, or :data:`START` when the output has more than ``CLOSED_FORM_SEEDS``
    entries per input (``output_size``: positions x classes of the captured output, the exact pass's seeds)."""
    long = output_size is not None and output_size > CLOSED_FORM_SEEDS
    return dict.fromkeys(names, START if long else ("exact", 1))


def select(
    net, x, lik, output, generator, names: list[str], schedule: Schedule, online: dict, targets: Tensor | None,
    **settings,
) -> tuple[dict, dict[str, Tensor]]:
    """A selection on ``x``: ``(info, fisher)`` with ``info`` the plain-typed choices, whether the plan changed,
    its predicted costs and summary, and ``fisher`` the Fisher of ``x`` the selection computed (exact up to
    ``CLOSED_FORM_SEEDS`` seeds per input, else the unbiased mean of its draws).  ``settings``: ``target_rse``,
    ``ema_decay``, ``max_samples``, ``cost_model`` of :func:`~fisher_optim.selection.run_selection`."""
    key = (tuple(x.first.shape), x.first.dtype, tuple(sorted(names)))
    cached = schedule.cached_costs(key)
    sel = run_selection(
        net, x, likelihood=lik, output=output, generator=generator, names=names, costs=cached,
        current=schedule.plan, targets=targets, online=online, **settings,
    )  # fmt: skip
    schedule.remember_costs(key, sel.costs, reused=cached is not None)
    info = {
        "choices": {n: {k: getattr(c, k) for k in _KEYS} for n, c in sel.choices.items()},
        "changed": sel.changed, "plan_cost": sel.plan_cost, "exact_cost": sel.exact_cost, "summary": sel.summary,
    }  # fmt: skip
    return info, sel.fisher
