r"""Machinery shared by the Fisher optimizers: Fisher refresh, auto selection, non-finite handling and
checkpoints.  Input capture is in :mod:`~fisher_optim.optim.capture`, the DDP helpers in
:mod:`~fisher_optim.optim.distributed`, the report in :mod:`~fisher_optim.optim.report` and the refresh/selection
schedule (counters, plan in use, back-off, cost cache) in :mod:`fisher_optim.schedule`.

:class:`FisherOptimizer` is a :class:`torch.optim.Optimizer` that owns everything except the update rule.
A subclass only validates its own hyperparameters and gives three sets of constants: those of
:func:`~fisher_optim.optim._functional.preconditioned_update` (the per-step update),
:func:`~fisher_optim.optim._functional.refresh_fisher` (the Fisher refresh) and
:func:`~fisher_optim.optim._functional.precondition` (the stored preconditioner), the first and the last as functions
of the loss's size (:class:`~fisher_optim.optim.units.LossScale`: inputs in the captured batch, elements per input,
ranks).

One ``step()``:

1. collect the parameters that have a gradient and require one (the others are skipped, state included);
2. if a refresh is due (the first step, then every ``fisher_interval`` steps, or when a parameter has no
   Fisher state yet): :func:`fisher_optim.selection.estimate_plan` on the first ``fisher_batch`` captured
   inputs (one shared forward, eval mode, its own backward passes; ``.grad`` is never touched) with the
   fixed estimator or, in auto mode, the plan in use ``name -> (estimator, n_samples)``; when a selection is due
   (:class:`fisher_optim.schedule.Schedule`, :mod:`~fisher_optim.optim.auto`) its variance pass gives this
   refresh's estimate.  Under DDP only rank 0 selects (its choices are broadcast) and the estimates are averaged
   over ranks (one ``all_reduce``);
3. check that the gradients, the new estimates and the closure's loss are finite: one fused reduction
   (``torch._foreach_norm``) per device and dtype and **one host synchronisation per step**
   (the same price as ``torch.amp.GradScaler``'s inf check).  On failure, ``nonfinite="skip"`` leaves every
   parameter and every state entry as it was (the label generator is rewound too) and counts the step in
   :meth:`FisherOptimizer.fisher_report`; ``nonfinite="raise"`` raises :class:`FloatingPointError` and
   changes nothing either;
4. fold the estimates into the running Fisher (:func:`~fisher_optim.optim._functional.refresh_fisher`), derive the
   stored preconditioner from it in the training loss's units (:func:`~fisher_optim.optim._functional.precondition`:
   after a refresh, and for every parameter when the captured batch's size changes; :mod:`fisher_optim.optim.units`),
   then run the fused update.
   Steps 2 and 4's refresh stay out of the fused update, which has no host synchronisation.

Selection costs are cached in the schedule (:mod:`fisher_optim.schedule`; not in ``state_dict``: timings belong to
the machine; ``cost_model="flops"`` keeps a resumed run bit-identical).  Inputs come from forward hooks
(:mod:`~fisher_optim.optim.capture`: the backpropagated forwards since the last step, micro-batches joined), removed
by :meth:`FisherOptimizer.close` or at garbage collection; a skipped step puts back the BatchNorm statistics its
forward changed.  The per-parameter state's layout and dtypes: :mod:`~fisher_optim.optim.state`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Iterable
from itertools import chain

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..batch import NonFiniteError
from ..likelihoods import Categorical, Likelihood, get_likelihood
from ..schedule import Schedule
from ..selection import estimate_plan
from ..settings import FisherSettings
from . import auto, distributed
from ._functional import precondition, preconditioned_update, refresh_fisher
from .capture import InputCapture
from .finite import all_finite, all_zero, describe_nonfinite
from .report import FisherReport, report_row
from .state import fisher_mean, new_state, restore
from .units import LossScale

__all__ = ["FisherOptimizer", "FisherReport"]

logger = logging.getLogger("fisher_optim")

_EXTRA = "fisher_optim"

class FisherOptimizer(Optimizer):
    """Base class of the Fisher optimizers (see the module docstring).  Not used directly.

    Subclasses implement ``_update_kwargs(group, scale)``, ``_refresh_kwargs(group)`` and
    ``_precond_kwargs(group, scale)``: the constants of :func:`~fisher_optim.optim._functional.preconditioned_update`,
    :func:`~fisher_optim.optim._functional.refresh_fisher` and :func:`~fisher_optim.optim._functional.precondition`.
    State per parameter: ``step``, ``exp_avg`` (first moment), ``fisher_ema``, ``fisher_count`` (refresh counter)
    and ``precond`` (the stored reciprocal denominator; ``fisher``, the bias-corrected running Fisher in per-input
    units, with the signal term).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        params: Iterable | None,
        defaults: dict,
        settings: FisherSettings,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the network whose Fisher is estimated), got {type(model)}")
        if not isinstance(settings, FisherSettings):
            raise TypeError(f"settings must be a FisherSettings, got {type(settings).__name__}")
        self._settings = settings
        self._scale: LossScale | None = None  # the latest step's loss size (units.py)
        self._precond_cache: tuple | None = None  # the constants the stored preconditioners were derived with
        self._lik = get_likelihood(likelihood)
        self._net, self._pg = distributed.unwrap(model)
        self._names = {id(p): n for n, p in self._net.named_parameters()}

        super().__init__(self._net.parameters() if params is None else params, defaults)

        # label-sampling generator: on the model's device, seeded per rank
        device = next(chain((p.device for g in self.param_groups for p in g["params"]), [torch.device("cpu")]))
        rank = distributed.rank(self._pg)
        base = torch.initial_seed() if settings.seed is None else settings.seed
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed((base + rank) % 2**63)
        self._schedule = Schedule(settings.fisher_interval, settings.select_refreshes)
        self._online: dict = {}  # auto mode: per-family OnlineVariance of the selections' draws (not checkpointed)

        self._capture = InputCapture(model, output=self.output)
        self._finalizer = weakref.finalize(self, self._capture.remove)

    # -- settings (read-only views of :attr:`settings`) ---------------------------------------------------
    @property
    def settings(self) -> FisherSettings:
        """The estimation settings (:class:`fisher_optim.FisherSettings`, frozen)."""
        return self._settings

    estimator = property(lambda self: self._settings.estimator, doc="FisherSettings.estimator")
    n_samples = property(lambda self: self._settings.n_samples, doc="FisherSettings.n_samples")
    fisher_interval = property(lambda self: self._settings.fisher_interval, doc="FisherSettings.fisher_interval")
    fisher_batch = property(lambda self: self._settings.fisher_batch, doc="FisherSettings.fisher_batch")
    target_rse = property(lambda self: self._settings.target_rse, doc="FisherSettings.target_rse")
    select_interval = property(lambda self: self._settings.select_interval, doc="FisherSettings.select_interval")
    max_samples = property(lambda self: self._settings.max_samples, doc="FisherSettings.max_samples")
    cost_model = property(lambda self: self._settings.cost_model, doc="FisherSettings.cost_model")
    output = property(lambda self: self._settings.output, doc="FisherSettings.output")

    @property
    def variance_interval(self) -> int:
        """0.1.0's name: refreshes between selections (``settings.select_refreshes``)."""
        return self._settings.select_refreshes

    @property
    def nonfinite(self) -> str:
        """``"skip"`` or ``"raise"`` (FisherSettings.nonfinite); may be changed during training."""
        return self._settings.nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        self._settings = dataclasses.replace(self._settings, nonfinite=value)

    @property
    def fisher_decay(self) -> float:
        """Decay per refresh of the running Fisher (FisherAdam's ``betas[1]``, NaturalGradient's ``fisher_decay``;
        the smallest over parameter groups), the ``ema_decay`` that auto mode's selection assumes."""
        return min(self._refresh_kwargs(g)["beta2"] for g in self.param_groups)

    @property
    def schedule(self) -> Schedule:
        """The refresh/selection schedule: counters, the plan in use, the selection interval, the cost cache
        (:class:`fisher_optim.schedule.Schedule`; read it, do not change it)."""
        return self._schedule

    @property
    def generator(self) -> torch.Generator:
        """The label-sampling generator (saved in :meth:`state_dict`)."""
        return self._generator

    # -- torch.optim plumbing ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and id(p) not in self._names:
                raise ValueError(
                    f"parameter {i} of the new group (shape {tuple(p.shape)}) is not a parameter of `model`: "
                    "the optimizer can only precondition parameters whose Fisher it can estimate"
                )
        param_group = dict(param_group, params=params)
        super().add_param_group(param_group)

    def close(self) -> None:
        """Remove the input-capturing forward hooks and drop the captured batches (idempotent)."""
        self._finalizer()

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} holds a model and a forward hook: save opt.state_dict() instead")

    def _init_state(self, p: Tensor) -> dict:
        self.state[p] = new_state(p, self._precond_key)
        return self.state[p]

    def state_dict(self) -> dict:
        """torch's ``{"state", "param_groups"}`` plus ``"fisher_optim"``: the label generator's state, the
        auto-mode plan and choices, and the refresh/selection/skip counters (plain types and tensors only, so
        ``torch.load(..., weights_only=True)`` reads it)."""
        sd = super().state_dict()
        sd[_EXTRA] = {
            "generator_state": self._generator.get_state(),
            "loss_scale": None if self._scale is None else dataclasses.asdict(self._scale),
            **self._schedule.state_dict(),
            "estimator": self.estimator,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of :meth:`state_dict`.  Fisher state of bf16/fp16 parameters stays float32 (torch's own
        loader would cast it to the parameter's dtype) and counters keep their dtype, on the parameter's device."""
        sd = dict(state_dict)
        extra = sd.pop(_EXTRA, None)
        if extra is None:
            raise ValueError(f"state_dict has no {_EXTRA!r} entry: it was not saved by a fisher_optim optimizer")
        saved = sd["state"]
        super().load_state_dict(sd)
        # what the update reads ("precond" or, with the signal term, "fisher") is derived from fisher_ema at the
        # next step (a checkpoint of another update rule, or of 0.1.0, loads too)
        other = {"precond": "fisher", "fisher": "precond"}[self._precond_key]
        self.state.update(restore(saved, sd["param_groups"], self.param_groups, drop=other))
        self._precond_cache = None
        scale = extra.get("loss_scale")
        if scale is not None:
            self._scale = LossScale(**scale)
        self._generator.set_state(extra["generator_state"].cpu())
        self._schedule.load_state_dict(extra)

    # -- subclass interface --------------------------------------------------------------------------
    def _update_kwargs(self, group: dict, scale: LossScale) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _refresh_kwargs(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _precond_kwargs(self, group: dict, scale: LossScale | None) -> dict:  # pragma: no cover - abstract
        """The constants of :func:`~fisher_optim.optim._functional.precondition` (``floor``, ``reciprocal``,
        ``fisher_scale``, ``damping``, ``power``, ``eps``)."""
        raise NotImplementedError

    @property
    def _precond_key(self) -> str:
        """The state entry the update reads: ``"precond"`` (a stored reciprocal) or ``"fisher"`` (signal term)."""
        return "fisher" if self._settings.signal else "precond"

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict],
                scale: LossScale) -> None:  # fmt: skip
        """The fused update of one group's parameters (overridden by Schedule-Free)."""
        preconditioned_update(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s[self._precond_key] for s in states],
            [s["step"] for s in states],
            foreach=group["foreach"],
            **self._update_kwargs(group, scale),
        )

    def _precondition(self, refreshed: set[int], scale: LossScale | None) -> None:
        """Derive what the update reads from the running Fisher, for the parameters refreshed this step, and for
        every parameter when the constants changed (the loss's size, a group's damping or eps) or after a load.
        No ordinary step computes anything here."""
        key = tuple(tuple(sorted(self._precond_kwargs(g, scale).items())) for g in self.param_groups)
        everything = key != self._precond_cache
        out = self._precond_key
        for group, kw in zip(self.param_groups, key):
            ps = [p for p in group["params"] if "fisher_count" in self.state.get(p, {})
                  and (everything or id(p) in refreshed)]  # fmt: skip
            if not ps:
                continue
            states = [self.state[p] for p in ps]
            for st in states:
                if out not in st:
                    st[out] = torch.zeros_like(st["fisher_ema"])
            precondition(
                [s["fisher_ema"] for s in states],
                [s["fisher_count"] for s in states],
                [s[out] for s in states],
                beta2=self._refresh_kwargs(group)["beta2"],
                foreach=group["foreach"],
                **dict(kw),
            )
        self._precond_cache = key

    @property
    def loss_scale(self) -> LossScale | None:
        """The latest step's loss size: inputs ``B``, elements per input, DDP ranks (``None`` before a step)."""
        return self._scale

    def _loss_scale(self) -> LossScale | None:
        """The size of the loss of the batch being stepped on, from the captured forwards (no tensor is read);
        the previous step's when nothing was captured."""
        b = self._capture.batch_size()
        if b is not None:
            red, shape = self._settings.loss_reduction, self._capture.output_shape  # K matters to element_mean only
            k = LossScale.elements_per_input(self._lik, shape) if red == "element_mean" else 1
            self._scale = LossScale(inputs=b, elements=k, world=distributed.world_size(self._pg), reduction=red)
        return self._scale

    # -- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, targets: Tensor | None = None):
        """One optimisation step; returns the closure's loss (if a closure is given).

        Args:
            closure: re-evaluates the model and returns the loss (torch.optim convention).  Its loss is
                included in the non-finite check.
            targets: the observed labels of the captured batch, sliced like the inputs, used on refresh
                steps: by ``estimator="empirical"`` (and an auto plan that chose it) as labels, and, for a
                categorical likelihood, by every estimator as a mask: positions (outputs ``(B, ..., C)``) or
                inputs whose target is ``ignore_index`` are left out of the Fisher.  Optional otherwise:
                without them every position counts.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, params with grad, grads)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None and p.requires_grad]
            if ps:
                if any(p.grad.is_sparse for p in ps):
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                work.append((group, ps, [p.grad for p in ps]))
        if not work:
            self._capture.reset()
            return loss
        with_grad = [p for _, ps, _ in work for p in ps]
        # (the state lookups only after the schedule: self.state is a defaultdict and must not grow on a failed step)
        due = self._schedule.refresh_due() or any("fisher_count" not in self.state[p] for p in with_grad)
        gen_state = self._generator.get_state() if due else None  # rewound if the step is skipped
        nonfinite_input = None
        try:
            estimates, pending = self._estimate(targets) if due else (None, None)
        except NonFiniteError as err:  # non-finite inputs or model output: the step is skipped or raises below
            estimates, pending, nonfinite_input = None, None, str(err)

        checked = [g for _, _, gs in work for g in gs] + ([] if estimates is None else list(estimates.values()))
        if isinstance(loss, Tensor):
            checked.append(loss.detach().reshape(-1))
        bad = (
            nonfinite_input is not None
            or not all_finite(checked)
            or (isinstance(loss, float) and not math.isfinite(loss))
        )
        if bad:
            if gen_state is not None:
                self._generator.set_state(gen_state)
            self._capture.restore_buffers()
            self._capture.reset()
            what = nonfinite_input or describe_nonfinite(work, estimates, loss, self._names)
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite {what} at step {self._schedule.steps}; no parameter or state "
                    "was changed (use nonfinite='skip' to skip such steps)"
                )
            self._schedule.after_skip()
            logger.warning("%s: skipped step %d (non-finite %s)", type(self).__name__, self._schedule.steps, what)
            return loss

        scale = self._loss_scale()
        refreshed: set[int] = set()
        if estimates is not None:
            self._apply_refresh(estimates, pending)
            refreshed = {id(p) for p in estimates}
        self._precondition(refreshed, scale)
        blind = set() if estimates is None else self._without_curvature([p for p in with_grad if p in estimates])
        for group, ps, grads in work:
            if blind:  # no curvature information yet: no natural-gradient step for them (see _without_curvature)
                kept = [(p, g) for p, g in zip(ps, grads) if id(p) not in blind]
                ps, grads = [p for p, _ in kept], [g for _, g in kept]
                if not ps:
                    continue
            self._update(group, ps, grads, [self.state[p] for p in ps], scale)
        self._capture.reset()
        self._schedule.after_step()
        return loss

    # -- refresh -------------------------------------------------------------------------------------
    def _without_curvature(self, ps: list[Tensor]) -> set[int]:
        """Parameters whose running Fisher is exactly zero (all below a zero-initialised head, as in torchvision's
        ViT) among ``ps`` (those with a gradient): a ``1/eps`` clipped sign step; they wait, the next step refreshes."""
        blind = {id(p) for p, z in zip(ps, all_zero([self.state[p]["fisher_ema"] for p in ps])) if z}
        if blind:
            self._schedule.refresh_next()
        return blind

    def _fisher_params(self) -> dict[str, Tensor]:
        """Optimized parameters that require grad, by name in ``model.named_parameters()``."""
        return {self._names[id(p)]: p for g in self.param_groups for p in g["params"] if p.requires_grad}

    def _estimate(self, targets):
        """New estimates ``{param: tensor}`` (all-reduced under DDP) and the pending selection."""
        x = self._capture.take(self.fisher_batch)
        if x is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the inputs of the latest forward pass of `model`, and none "
                "was captured: run `loss = criterion(model(x), y); loss.backward()` (with gradients enabled, "
                "the batch in a tensor argument of the forward) before `opt.step()`"
            )
        if targets is not None:
            targets = targets[: x.size]
        fparams = self._fisher_params()
        names = list(fparams)
        pending = None
        self._capture.enabled = False
        try:  # under step()'s no_grad: the Probe enables gradients for its own forward only
            est = None
            # categorical targets mask the positions labelled ignore_index out of every estimator
            mask_targets = targets is not None and isinstance(self._lik, Categorical)
            if self.estimator == "auto" and self._schedule.select_due(names):
                pending, est = self._select(x, names, targets if mask_targets else None)
                if est is None:  # a DDP rank other than 0: the exact Fisher of its own inputs
                    plan = {n: ("exact", 1) for n in names}
            elif self.estimator == "auto" and self._schedule.plan is None:  # exact, or Hutchinson on long outputs
                plan = auto.start_plan(names, self._capture.output_size)
            elif self.estimator == "auto":
                plan = self._schedule.plan_for(names)
            else:
                plan = {n: (self.estimator, self.n_samples) for n in names}
            if est is None:
                empirical = any(e == "empirical" for e, _ in plan.values())
                if empirical and targets is None:
                    raise ValueError(
                        "estimator 'empirical' needs the observed labels of the captured batch: "
                        "call opt.step(targets=y)"
                    )
                est = estimate_plan(
                    self._net, x, likelihood=self._lik, output=self.output, plan=plan, generator=self._generator,
                    targets=targets if empirical or mask_targets else None,
                )  # fmt: skip
        finally:
            self._capture.enabled = True
        if distributed.is_distributed(self._pg):
            est = distributed.all_reduce_mean(est, names, self._pg)
        return {fparams[n]: est[n] for n in names}, pending

    def _select(
        self, x, names: list[str], targets: Tensor | None = None
    ) -> tuple[dict[str, dict], dict[str, Tensor] | None]:
        """Auto mode: per-layer choices from :func:`fisher_optim.selection.run_selection` (rank 0's under DDP)
        and the exact Fisher of ``x`` it computed (``None`` on the other DDP ranks, which do not select)."""
        spread = distributed.is_distributed(self._pg)
        info, fisher = None, None
        if not spread or distributed.rank(self._pg) == 0:
            info, fisher = auto.select(
                self._net, x, self._lik, self.output, self._generator, names, self._schedule, self._online, targets,
                target_rse=self.target_rse, ema_decay=self.fisher_decay, max_samples=self.max_samples,
                cost_model=self.cost_model,
            )  # fmt: skip
        if spread:
            info = distributed.broadcast_from_first(info, self._pg)
        return info, fisher

    def _apply_refresh(self, estimates: dict[Tensor, Tensor], pending: dict | None) -> None:
        if pending is not None:
            self._schedule.after_selection(
                pending["choices"], pending["changed"], pending["plan_cost"], pending["exact_cost"], pending["summary"]
            )
            pending = pending["choices"]
            if logger.isEnabledFor(logging.INFO):
                rows = [
                    f"  {n}: {c['estimator']} N={c['n_samples']} rse={c['rse']:.3g} cost={c['cost']:.3g} "
                    f"({c['reason']})"
                    for n, c in pending.items()
                ]
                logger.info(
                    "%s step %d: estimator selection\n%s", type(self).__name__, self._schedule.steps, "\n".join(rows)
                )
        for group in self.param_groups:
            ps = [p for p in group["params"] if p in estimates]
            if not ps:
                continue
            states = [self.state[p] if "fisher_count" in self.state[p] else self._init_state(p) for p in ps]
            refresh_fisher(
                [s["fisher_ema"] for s in states],
                [s["fisher_count"] for s in states],
                [estimates[p] for p in ps],
                foreach=group["foreach"],
                **self._refresh_kwargs(group),
            )
        self._schedule.after_refresh()

    # -- report (the non-finite check: optim/finite.py) ----------------------------------------------
    def fisher_report(self) -> FisherReport:
        """Per parameter (name in ``model.named_parameters()``): estimator, n_samples, rse, cost, reason, source (of
        the predicted variance: "closed form", "online" or "bound"; "-" before a selection or with a fixed
        estimator) and the mean of the bias-corrected running Fisher; run counters as attributes (see
        :class:`FisherReport`).
        """
        rep = FisherReport()
        rep.cost_unit = self._settings.cost_unit
        for name, p in self._fisher_params().items():
            row = report_row(self.estimator, self.n_samples, self._schedule.choices.get(name))
            row["fisher_mean"] = fisher_mean(self.state.get(p, {}), self._refresh_kwargs(self._group_of(p))["beta2"])
            rep[name] = row
        rep.count(self._schedule, auto=self.estimator == "auto")
        return rep

    def _group_of(self, p: Tensor) -> dict:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter not in this optimizer")
