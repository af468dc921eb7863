"""The estimation settings of the Fisher optimizers: one frozen value, validated once.

:class:`FisherSettings` groups what decides *how* the Fisher is estimated (the estimator, its sample count, the
refresh schedule, auto mode's selection, the non-finite policy, the label seed, the output rule) and how the estimate
enters the update (the training loss's reduction, the units, the signal term, the floor), so that the optimizers'
constructors keep to what a user tunes (``lr``, the decays, ``damping``, ``weight_decay``, ``clip``)::

    opt = FisherAdam(model, lr=1e-2, settings=FisherSettings(estimator="exact", fisher_interval=5))

**Backwards compatibility.**  The optimizers still accept every setting as a keyword argument
(``FisherAdam(model, estimator="exact")``): :meth:`FisherSettings.build` folds them into the settings (over
``settings=`` when both are given); an unknown keyword raises :class:`TypeError` naming it.  The 0.1.0 keyword
``variance_interval`` (refreshes between selections) is accepted too and converted to ``select_interval`` (steps):
``select_interval = variance_interval * fisher_interval``.

**Units.**  ``fisher_interval`` and ``select_interval`` both count optimizer steps.  ``select_interval`` must be a
multiple of ``fisher_interval`` (selections happen at refreshes); the default ``None`` is
``DEFAULT_SELECT_REFRESHES`` (50) refreshes, i.e. ``50 * fisher_interval`` steps, as in 0.1.0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._checks import (
    ESTIMATORS,
    check_choice,
    check_estimator,
    check_finite_nonnegative,
    check_output_spec,
    check_positive_float,
    check_positive_int,
)

__all__ = ["FisherSettings", "DEFAULT_SELECT_REFRESHES", "COST_UNITS", "LOSS_REDUCTIONS", "UNITS"]

#: refreshes between auto mode's selections when ``select_interval`` is not given
DEFAULT_SELECT_REFRESHES = 50
#: the unit of a predicted cost, by cost model: seconds measured, or parameter-sized units of work (flops model)
COST_UNITS = {"measured": "s", "flops": "param-units"}
#: how the training loss reduces over the batch (fisher_optim.optim.units)
LOSS_REDUCTIONS = ("mean", "element_mean", "sum")
#: the units of FisherAdam's denominator: the training loss's Fisher, or the per-input Fisher (0.1.0)
UNITS = ("loss", "input")


@dataclass(frozen=True)
class FisherSettings:
    r"""How a Fisher optimizer estimates the Fisher (validated at construction; immutable: use
    :func:`dataclasses.replace` for a variant).

    Attributes:
        estimator: ``"auto"`` (per-layer choice of estimator and sample count, :func:`fisher_optim.select`) or a
            fixed estimator of :func:`fisher_optim.diagonal_fisher` (``"exact"``, ``"mc1"``, ``"mc2"``,
            ``"empirical"``, ``"hutchinson"``, ``"hutchinson_batch"``, ``"gnb"``).
        n_samples: labels (or Rademacher probes) drawn per input for a fixed sampled estimator.
        fisher_interval: steps between Fisher refreshes.
        fisher_batch: captured inputs the estimation uses (``None``: all).
        target_rse: auto mode's bound on the relative standard error of the running estimate.
        select_interval: auto mode: steps between selections (a multiple of ``fisher_interval``; ``None``:
            ``DEFAULT_SELECT_REFRESHES`` refreshes), doubled after each selection that keeps the plan (up to 8x).
        max_samples: auto mode's largest Î₁ sample count.
        cost_model: auto mode's cost model, ``"measured"`` (seconds) or ``"flops"`` (deterministic param-units).
        nonfinite: ``"skip"`` or ``"raise"`` on a non-finite loss, gradient or estimate.
        seed: seed of the label-sampling generator (``None``: ``torch.initial_seed()``; plus the rank under DDP).
        output: picks the natural parameters out of the model's output (a key, an index or a callable).
        loss_reduction: how the training loss reduces over the batch (``"mean"`` over inputs, ``"element_mean"``
            over every output element as torch's losses with ``reduction="mean"`` on flattened outputs, ``"sum"``):
            with the captured batch's size it puts the running Fisher in the training loss's units
            (:mod:`fisher_optim.optim.units`, docs/fisher-math.md §15).
        units: ``"loss"`` (the Fisher of the training loss: FisherAdam divides by :math:`\sqrt{F/B}`, Adam's units)
            or ``"input"`` (the per-input Fisher, 0.1.0's FisherAdam: :math:`\sqrt F`).
        signal: Adam's signal term, the squared first moment under FisherAdam's square root (bounds every step by
            the lr without a clip; ScheduleFreeFisherAdam: an EMA of the gradients with decay ``betas[0]``).
        floor: the running Fisher of each tensor is floored at ``floor`` times its mean (0: no floor).
    """

    estimator: str = "auto"
    n_samples: int = 1
    fisher_interval: int = 10
    fisher_batch: int | None = 32
    target_rse: float = 0.1
    select_interval: int | None = None
    max_samples: int = 16
    cost_model: str = "measured"
    nonfinite: str = "skip"
    seed: int | None = None
    output: Any = None
    loss_reduction: str = "mean"
    units: str = "loss"
    signal: bool = False
    floor: float = 0.0

    def __post_init__(self):
        check_estimator(self.estimator, ("auto", *ESTIMATORS))
        for name in ("n_samples", "fisher_interval", "max_samples"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("fisher_batch", self.fisher_batch, allow_none=True)
        object.__setattr__(self, "target_rse", check_positive_float("target_rse", self.target_rse))
        check_positive_int("select_interval", self.select_interval, allow_none=True)
        if self.select_interval is not None and self.select_interval % self.fisher_interval:
            raise ValueError(
                f"Invalid select_interval: {self.select_interval}. Must be a multiple of fisher_interval "
                f"({self.fisher_interval}): selections happen at refreshes"
            )
        check_choice("cost_model", self.cost_model, tuple(COST_UNITS))
        check_choice("nonfinite", self.nonfinite, ("skip", "raise"))
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Invalid seed: {seed}")
        check_output_spec(self.output)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_choice("units", self.units, UNITS)
        if not isinstance(self.signal, bool):
            raise ValueError(f"Invalid signal: {self.signal!r}. Must be True or False")
        object.__setattr__(self, "floor", check_finite_nonnegative("floor", self.floor))

    @property
    def select_refreshes(self) -> int:
        """Refreshes between auto mode's selections (the schedule's unit): ``select_interval / fisher_interval``."""
        if self.select_interval is None:
            return DEFAULT_SELECT_REFRESHES
        return self.select_interval // self.fisher_interval

    @property
    def cost_unit(self) -> str:
        """The unit of the predicted costs in reports: ``"s"`` (measured) or ``"param-units"`` (flops)."""
        return COST_UNITS[self.cost_model]

    @classmethod
    def build(cls, settings: FisherSettings | None = None, owner: str = "FisherSettings", **kwargs) -> FisherSettings:
        """``settings`` (default: the defaults) with ``kwargs`` replaced; the 0.1.0 keyword ``variance_interval``
        (refreshes) becomes ``select_interval`` (steps).  An unknown keyword raises :class:`TypeError`."""
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(f"settings must be a {cls.__name__}, got {type(settings).__name__}")
        base = cls() if settings is None else settings
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in kwargs if k not in names and k != "variance_interval"]
        if unknown:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {unknown[0]!r} (estimation settings: {sorted(names)})"
            )
        if "variance_interval" in kwargs:
            refreshes = check_positive_int("variance_interval", kwargs.pop("variance_interval"))
            if kwargs.get("select_interval") is not None:
                raise TypeError(f"{owner}(): give select_interval (steps) or variance_interval (refreshes), not both")
            fisher_interval = kwargs.get("fisher_interval", base.fisher_interval)
            check_positive_int("fisher_interval", fisher_interval)
            kwargs["select_interval"] = refreshes * fisher_interval
        return dataclasses.replace(base, **kwargs) if kwargs else base
