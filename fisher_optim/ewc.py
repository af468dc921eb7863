r"""Elastic weight consolidation (EWC) with an explicit choice of diagonal Fisher.

EWC (Kirkpatrick et al. 2017) protects what a model learned on earlier tasks by adding a quadratic penalty
around the parameters it had at the end of each task, weighted by the diagonal Fisher information there:

.. math::  \mathrm{penalty}(\theta) = \frac{\lambda}{2} \sum_t \sum_i F^{(t)}_i\,
           (\theta_i - \theta^{*(t)}_i)^2.

* ``mode="separate"``: one Fisher :math:`F^{(t)}` and one anchor :math:`\theta^{*(t)}` per consolidated task,
  and the penalty sums over tasks.
* ``mode="online"`` (online EWC, Schwarz et al. 2018, "Progress & Compress"): a single running Fisher
  :math:`F \leftarrow \gamma F + F_\text{new}` (``decay`` = :math:`\gamma`) and a single anchor at the latest
  consolidated parameters.

**Scaling of the Fisher** (the part peers get wrong, see below).  For the ``M`` consolidation examples
:math:`x_1..x_M` (all batches of a DataLoader together, each batch weighted by its size)

.. math::  F_i = \frac{1}{M} \sum_{m=1}^{M} \hat I_{ii}(\theta \mid x_m),

the **mean over examples of per-example squares** (or per-example sampled-label Hessians), computed by
:func:`fisher_optim.diagonal_fisher` (``reduction="sum"`` per batch, divided by ``M`` at the end):

* ``"exact"``: the exact diagonal Fisher / diagonal GGN :math:`v_i^\top I(h) v_i` (``C`` seeded backward
  passes, no sampling);
* ``"mc1"`` (Î₁): squared score of ``n_samples`` labels drawn from the model, averaged over the draws;
* ``"mc2"`` (Î₂): diagonal Hessian of the sampled-label NLL (equal to ``"exact"`` for ReLU networks).
  Unbiased but **not nonnegative**: for smooth activations some entries can be negative, and the penalty
  then pushes those parameters *away* from the anchor.  ``consolidate`` warns when that happens; prefer
  ``"exact"``/``"mc1"`` (or more ``n_samples``) for EWC.  On ``benchmarks/ewc.py`` (tanh MLP, one label)
  this made EWC with Î₂ the least stable choice;
* ``"empirical"``: squared score of the **observed** label of each example (the empirical Fisher; biased).
* ``"auto"``: a per-layer mix of ``"exact"`` and ``"mc1"`` with ``N`` samples, chosen once per
  :meth:`EWC.consolidate` call by :func:`fisher_optim.selection.run_selection` on the first batch (closed-form
  variances: the cheapest estimator whose relative standard error on that batch is at most ``target_rse``;
  defaults in ``AUTO_SELECT_DEFAULTS``, override with ``select_kwargs``); the first batch's estimate is the
  exact Fisher the selection computed anyway, every later batch uses the plan with
  :func:`fisher_optim.selection.estimate_plan`.  The chosen plan is kept in ``EWC.last_plan``.

It is never the square of a mini-batch gradient.  The mini-batch variant used by popular EWC code is
available, for comparison only, as

* ``"batched_empirical"``: for mini-batches :math:`b` of size :math:`B_b` with observed labels,

  .. math::  F^\text{batched}_i = \sum_b \frac{B_b}{M} \Big(\frac{1}{B_b} \sum_{m \in b}
             \partial_i \ell(\tilde y_m \mid x_m)\Big)^2,

  the square of the mini-batch **mean** gradient of the observed-label NLL, averaged over batches, **not**
  multiplied by the batch size.  With equal batch sizes this is exactly Avalanche's ``EWCPlugin``
  importance (squared gradient of the mean cross-entropy per batch, divided by the number of batches;
  maintainers' answer in ContinualAI/avalanche#1224: "The importance is computed in mini-batches, not one
  sample at a time").  Its expectation is the squared mean gradient plus the per-example gradient variance
  divided by ``B``: near a minimum it is roughly the empirical Fisher **divided by the batch size**, and it
  depends on how the data are batched.  Related reports: facebookresearch/GradientEpisodicMemory#7 (square
  of the summed gradient), GT-RIPL/Continual-Learning-Benchmark#10 (mini-batches vs batch size 1), and the
  "which Fisher?" threads GMvandeVen/continual-learning#11 and kuc2477/pytorch-ewc#1; van de Ven (2025,
  arXiv 2502.11756) shows that the choice changes EWC's accuracy.  For a tensor input it takes the batches from
  ``batch_size`` (one batch of all ``M`` examples by default).

Estimation runs the model in eval mode (dropout off, BatchNorm on its running statistics); train/eval
flags, BatchNorm buffers and ``.grad`` fields are left untouched, so ``consolidate`` can be called in the
middle of training.  The penalty is an ordinary differentiable tensor: add it to the loss and use any
optimizer (``torch.optim.Adam``, SGD, or fisher_optim's own).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ._checks import (
    check_choice,
    check_estimator,
    check_finite_nonnegative,
    check_n_samples,
    check_output_spec,
    check_positive_int,
)
from .batch import Batch
from .engine import Probe, trainable_parameters
from .estimators import diagonal_fisher
from .likelihoods import Categorical, Likelihood, get_likelihood

__all__ = ["EWC", "EWC_ESTIMATORS", "EWC_MODES"]

EWC_ESTIMATORS = ("exact", "mc1", "mc2", "empirical", "batched_empirical", "auto")
#: defaults for ``estimator="auto"`` (:func:`fisher_optim.selection.select`): a one-shot estimate (no running
#: average), 10 % relative standard error per batch, and the deterministic size-based cost model
AUTO_SELECT_DEFAULTS = {"target_rse": 0.1, "ema_decay": 0.0, "cost_model": "flops"}
EWC_MODES = ("separate", "online")

#: ``progress=None`` shows a tqdm bar (if tqdm is installed) for passes with at least this many batches
PROGRESS_MIN_BATCHES = 50


def _check_decay(decay, mode: str) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay <= 1:
        raise ValueError(f"Invalid decay: {decay}. Must be in (0, 1]")
    if mode == "separate" and decay != 1:
        raise ValueError(f"Invalid decay: {decay}. decay is only used with mode='online'")
    return float(decay)


def _tqdm(iterable, total, enabled):
    """Wrap ``iterable`` in a tqdm bar if ``enabled`` (True, or None and a long ``total``) and tqdm exists."""
    if enabled is False or (enabled is None and (total is None or total < PROGRESS_MIN_BATCHES)):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            warnings.warn("progress=True needs tqdm (pip install tqdm); no progress bar", stacklevel=3)
        return iterable
    return tqdm(iterable, total=total, desc="EWC consolidate", leave=False)


class EWC:
    r"""Elastic weight consolidation penalty with a chosen diagonal Fisher estimator.

    .. math::  \mathrm{penalty}(\theta) = \frac{\lambda}{2} \sum_t \sum_i F^{(t)}_i\,
               (\theta_i - \theta^{*(t)}_i)^2,
               \qquad F_i = \frac1M \sum_{m=1}^M \hat I_{ii}(\theta^* \mid x_m)

    (mean over the consolidation examples of per-example quantities; see the module docstring for each
    estimator's exact definition and for the ``"batched_empirical"`` comparison variant).

    Args:
        model: the network being trained; its output rows are the natural parameters of ``likelihood``
            (logits for ``"categorical"``).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``, ``"poisson"`` or a
            :class:`~fisher_optim.likelihoods.Likelihood`.
        lam: the penalty strength :math:`\lambda \ge 0` (may be changed later through ``ewc.lam``).
        estimator: ``"exact"`` (default), ``"mc1"``, ``"mc2"``, ``"empirical"``, ``"batched_empirical"``
            or ``"auto"``.
        mode: ``"separate"`` (one Fisher and anchor per task, penalties summed) or ``"online"``
            (:math:`F \leftarrow \gamma F + F_\text{new}`, one anchor at the latest parameters).
        decay: :math:`\gamma \in (0, 1]` for ``mode="online"``; must stay 1 in ``"separate"`` mode.
        n_samples: labels drawn from the model per example (``"mc1"``, ``"mc2"``).
        generator: ``torch.Generator`` for the label draws; its state is saved in :meth:`state_dict`.
        progress: ``True``/``False`` to force a tqdm bar on or off during :meth:`consolidate`; ``None``
            (default) shows one for passes of at least 50 batches when tqdm is installed.
        select_kwargs: keyword arguments for :func:`fisher_optim.selection.select` (``estimator="auto"``
            only), on top of ``AUTO_SELECT_DEFAULTS``.

    Example:
        >>> import torch
        >>> from fisher_optim.ewc import EWC
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> ewc = EWC(net, likelihood="categorical", lam=10.0)
        >>> ewc.penalty()                                   # nothing consolidated yet
        tensor(0.)
        >>> F = ewc.consolidate(torch.randn(32, 4))         # end of task 1: Fisher + anchor
        >>> sorted(F) == sorted(n for n, _ in net.named_parameters())
        True
        >>> ewc.penalty().item()                            # at the anchor
        0.0
        >>> with torch.no_grad():
        ...     net[0].bias += 0.1
        >>> bool(ewc.penalty() > 0), ewc.n_tasks
        (True, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        likelihood: str | Likelihood,
        lam: float,
        estimator: str = "exact",
        mode: str = "separate",
        decay: float = 1.0,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
        select_kwargs: dict | None = None,
        output=None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.output = check_output_spec(output)
        self.lam = lam  # validated by the property
        self.estimator = check_estimator(estimator, EWC_ESTIMATORS)
        self.mode = check_choice("mode", mode, EWC_MODES)
        self.decay = _check_decay(decay, self.mode)
        self.n_samples = check_n_samples(n_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Invalid generator: {generator!r}. Must be a torch.Generator or None")
        self.generator = generator
        if progress not in (None, True, False):
            raise ValueError(f"Invalid progress: {progress!r}. Must be True, False or None")
        self.progress = progress
        if select_kwargs is not None and self.estimator != "auto":
            raise ValueError(f"Invalid select_kwargs: only used with estimator='auto', not {estimator!r}")
        self.select_kwargs = {**AUTO_SELECT_DEFAULTS, **(select_kwargs or {})}
        #: ``{name: Choice}`` chosen by the last ``consolidate`` with ``estimator="auto"``
        self.last_plan: dict | None = None
        #: per task (separate) or one entry (online): {"fisher": {name: F}, "anchor": {name: theta*}}
        self._tasks: list[dict[str, dict[str, Tensor]]] = []
        self._n_consolidations = 0

    # -- hyperparameters --------------------------------------------------------------------------
    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_finite_nonnegative("lam", value)

    @property
    def n_tasks(self) -> int:
        """Number of :meth:`consolidate` calls so far (in online mode they share one Fisher and anchor)."""
        return self._n_consolidations

    @property
    def tasks(self) -> list[dict[str, dict[str, Tensor]]]:
        """``[{"fisher": {name: F}, "anchor": {name: theta*}}]``: one entry per task (separate mode) or a
        single running entry (online mode).  Tensors are detached; do not modify them in place."""
        return [{"fisher": dict(t["fisher"]), "anchor": dict(t["anchor"])} for t in self._tasks]

    def __repr__(self) -> str:
        extra = f", decay={self.decay}" if self.mode == "online" else ""
        return (
            f"EWC(likelihood={self.likelihood!r}, lam={self.lam}, estimator={self.estimator!r}, "
            f"mode={self.mode!r}{extra}, n_tasks={self.n_tasks})"
        )

    # -- consolidation ----------------------------------------------------------------------------
    def _device(self) -> torch.device | None:
        for p in self.model.parameters():
            return p.device
        return None

    def _batches(self, inputs, targets, batch_size):
        """``(iterable of (x, y_or_None), number of batches or None)``."""
        check_positive_int("batch_size", batch_size, allow_none=True)
        if _one_batch(inputs):
            try:
                batch = Batch.of(inputs)
            except ValueError as err:
                raise ValueError(f"Invalid inputs: {err}") from err
            m = batch.size
            if targets is not None:
                targets = torch.as_tensor(targets)
                if targets.dim() == 0 or targets.shape[0] != m:
                    raise ValueError(
                        f"Invalid targets: shape {tuple(targets.shape)} does not match {m} inputs"
                    )
            bs = m if batch_size is None else batch_size
            starts = range(0, m, bs)
            pairs = ((batch[s : s + bs], None if targets is None else targets[s : s + bs]) for s in starts)
            return pairs, len(starts)
        if targets is not None:
            raise ValueError("Invalid targets: with a DataLoader, give the targets inside its (x, y) batches")
        if batch_size is not None:
            raise ValueError("Invalid batch_size: a DataLoader already defines its batches")
        if not isinstance(inputs, Iterable):
            raise TypeError(
                f"inputs must be a Tensor or an iterable of (x, y) batches, got {type(inputs).__name__}"
            )
        try:
            total = len(inputs)
        except TypeError:
            total = None

        def split(batch):
            if isinstance(batch, Tensor):
                return Batch.of(batch), None
            if isinstance(batch, Mapping):  # Hugging Face style: every entry is an argument; labels are targets
                return Batch.of(dict(batch)), batch.get("labels")
            if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], (Tensor, tuple, Mapping)):
                return Batch.of(batch[0]), (batch[1] if len(batch) > 1 else None)
            raise TypeError(
                f"each batch must be a Tensor x, a dict of arguments or a sequence (x, y, ...), got "
                f"{type(batch).__name__}"
            )

        return (split(b) for b in inputs), total

    def _batched_empirical_sum(self, x, y: Tensor) -> dict[str, Tensor]:
        """``B * (grad of the batch-mean observed-label NLL)^2`` for one batch (summed to ``B`` weight)."""
        with Probe(self.model, x, self.likelihood, output=self.output) as probe:
            y = self.likelihood.check_targets(probe.h, y)
            loss = self.likelihood.nll(probe.h, y).mean()
            names = list(probe.params)
            grads = torch.autograd.grad(loss, [probe.params[n] for n in names], allow_unused=True)
            b = probe.h.shape[0]
        return {
            n: (torch.zeros_like(probe.params[n]) if g is None else b * g.detach().square())
            for n, g in zip(names, grads)
        }

    def _auto_sum(self, x, first: bool, targets: Tensor | None = None) -> dict[str, Tensor]:
        """Sum over the batch of the per-layer plan's estimates; the plan is chosen on the first batch.
        ``targets``: the categorical mask (positions whose target is ``ignore_index`` left out), or ``None``."""
        from .selection import estimate_plan, run_selection

        if first:
            # the selection's variance pass computes the exact Fisher of this batch: it is the batch's estimate
            sel = run_selection(
                self.model, x, likelihood=self.likelihood, output=self.output, generator=self.generator,
                targets=targets, **self.select_kwargs,
            )  # fmt: skip
            self.last_plan = sel.choices
            return {n: v * x.size for n, v in sel.fisher.items()}
        plan = {n: (c.estimator, c.n_samples) for n, c in self.last_plan.items()}
        mean = estimate_plan(
            self.model, x, likelihood=self.likelihood, output=self.output, plan=plan, generator=self.generator,
            targets=targets,
        )
        return {n: v * x.size for n, v in mean.items()}

    def consolidate(
        self, inputs: Tensor | Iterable, targets: Tensor | None = None, *, batch_size: int | None = None
    ) -> dict[str, Tensor]:
        r"""End of a task: estimate the diagonal Fisher at the current parameters and store the anchor.

        Args:
            inputs: the task's inputs as one batch: a tensor ``(M, ...)`` (``model(x)``), a tuple of tensors
                (``model(*inputs)``) or a dict (``model(**inputs)``), sliced by the rule of
                :class:`~fisher_optim.batch.Batch`; or a list or other iterable (e.g. a ``DataLoader``) of
                ``(x, y)`` batches, of bare ``x`` tensors when the estimator needs no labels, or of dicts of
                arguments (their ``"labels"`` entry, if any, is the targets).  Batched tensors are moved to the
                model's device.
            targets: observed labels for a tensor ``inputs`` (needed by ``"empirical"`` and
                ``"batched_empirical"``).  With a categorical likelihood the other estimators take them as a
                mask: positions whose target is ``ignore_index`` are left out.
            batch_size: for a tensor ``inputs``, process it in chunks of this many examples (memory; the
                mini-batches of ``"batched_empirical"``). Default: one chunk.

        Returns:
            The new task's Fisher ``{name: F}`` (parameters requiring grad),
            :math:`F_i = \frac1M \sum_m \hat I_{ii}(\theta \mid x_m)` over all ``M`` examples (each batch
            weighted by its size; ``"batched_empirical"``: see the module docstring).  In separate mode it
            is stored with the anchor as a new task; in online mode the running Fisher becomes
            ``decay * F_old + F`` and the anchor moves to the current parameters.
        """
        needs_targets = self.estimator in ("empirical", "batched_empirical")
        pairs, total = self._batches(inputs, targets, batch_size)
        device = self._device()
        sums: dict[str, Tensor] | None = None
        m = 0
        for x, y in _tqdm(pairs, total, self.progress):
            if device is not None:
                x = x.map_batched(lambda t: t.to(device))
            masks = y is not None and isinstance(self.likelihood, Categorical)
            if needs_targets or masks:
                if y is None:
                    raise ValueError(
                        f"estimator {self.estimator!r} needs targets (the observed labels): pass targets= "
                        "or (x, y) batches"
                    )
                y = torch.as_tensor(y)
                y = y.to(device) if device is not None else y
            if self.estimator == "batched_empirical":
                part = self._batched_empirical_sum(x, y)
            elif self.estimator == "auto":
                part = self._auto_sum(x, first=sums is None, targets=y if masks else None)
            else:
                part = diagonal_fisher(
                    self.model,
                    x,
                    likelihood=self.likelihood,
                    estimator=self.estimator,
                    n_samples=self.n_samples,
                    targets=y if self.estimator == "empirical" or masks else None,
                    generator=self.generator,
                    reduction="sum",
                    output=self.output,
                )
            sums = part if sums is None else {n: sums[n] + part[n] for n in sums}
            m += x.size
        if sums is None or m == 0:
            raise ValueError("Invalid inputs: no examples to consolidate on")
        fisher = {n: v / m for n, v in sums.items()}
        n_neg = sum(int((v < 0).sum()) for v in fisher.values())
        if n_neg:
            n_all = sum(v.numel() for v in fisher.values())
            warnings.warn(
                f"EWC: {n_neg} of {n_all} Fisher entries from estimator {self.estimator!r} are negative "
                "(an unbiased but not nonnegative estimate); the penalty pushes those parameters away from the "
                "anchor. Use estimator='exact' or 'mc1', or more n_samples.",
                stacklevel=2,
            )
        params = trainable_parameters(self.model)
        anchor = {n: params[n].detach().clone() for n in fisher}
        if self.mode == "separate" or not self._tasks:
            self._tasks.append({"fisher": fisher, "anchor": anchor})
        else:
            old = self._tasks[0]["fisher"]
            running = {n: self.decay * v for n, v in old.items()}
            for n, v in fisher.items():
                running[n] = running[n] + v if n in running else v
            # a single anchor at the latest parameters (frozen ones keep their value, hence their anchor)
            every = dict(self.model.named_parameters())
            self._tasks[0] = {
                "fisher": running,
                "anchor": {n: every[n].detach().clone() if n in every else self._tasks[0]["anchor"][n]
                           for n in running},
            }
        self._n_consolidations += 1
        return dict(fisher)

    # -- penalty ----------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        r""":math:`\frac{\lambda}{2} \sum_t \sum_i F^{(t)}_i (\theta_i - \theta^{*(t)}_i)^2` as a scalar
        tensor that is differentiable in the model's parameters (add it to the loss).

        Before the first :meth:`consolidate` it is a zero tensor (no graph) of the parameters' dtype and
        device, so ``loss + ewc.penalty()`` works from the first task on.
        """
        params = dict(self.model.named_parameters())
        total: Tensor | None = None
        for task in self._tasks:
            for n, f in task["fisher"].items():
                if n not in params:
                    raise ValueError(f"EWC: parameter {n!r} consolidated earlier is no longer in the model")
                term = (f * (params[n] - task["anchor"][n]).square()).sum()
                total = term if total is None else total + term
        if total is None:
            p = next(iter(params.values()), None)
            return torch.zeros((), dtype=p.dtype, device=p.device) if p is not None else torch.zeros(())
        return (0.5 * self.lam) * total

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Hyperparameters, every task's Fisher and anchor, and the label generator's state."""
        return {
            "lam": self.lam,
            "estimator": self.estimator,
            "mode": self.mode,
            "decay": self.decay,
            "n_samples": self.n_samples,
            "n_consolidations": self._n_consolidations,
            "tasks": self.tasks,
            "generator_state": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from :meth:`state_dict`; Fisher and anchors are copied to the parameters' device/dtype."""
        keys = {"lam", "estimator", "mode", "decay", "n_samples", "n_consolidations", "tasks"}
        keys.add("generator_state")
        missing = keys - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing keys {sorted(missing)}")
        lam = check_finite_nonnegative("lam", state_dict["lam"])
        estimator = check_estimator(state_dict["estimator"], EWC_ESTIMATORS)
        mode = check_choice("mode", state_dict["mode"], EWC_MODES)
        decay = _check_decay(state_dict["decay"], mode)
        n_samples = check_n_samples(state_dict["n_samples"])
        tasks_in = list(state_dict["tasks"])
        if mode == "online" and len(tasks_in) > 1:
            raise ValueError(f"Invalid state_dict: online mode holds one running task, got {len(tasks_in)}")
        params = dict(self.model.named_parameters())
        tasks = []
        for t in tasks_in:
            if set(t) != {"fisher", "anchor"} or set(t["fisher"]) != set(t["anchor"]):
                raise ValueError("Invalid state_dict: each task needs 'fisher' and 'anchor' with equal names")
            entry: dict[str, dict[str, Tensor]] = {"fisher": {}, "anchor": {}}
            for n in t["fisher"]:
                if n not in params:
                    raise ValueError(f"Invalid state_dict: parameter {n!r} is not in the model")
                p = params[n]
                for key in ("fisher", "anchor"):
                    v = t[key][n]
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(
                            f"Invalid state_dict: {key} of {n!r} has shape {tuple(v.shape)}, "
                            f"parameter has {tuple(p.shape)}"
                        )
                    entry[key][n] = v.detach().to(device=p.device, dtype=p.dtype, copy=True)
            tasks.append(entry)
        self.lam, self.estimator, self.mode = lam, estimator, mode
        self.decay, self.n_samples = decay, n_samples
        self._tasks = tasks
        self._n_consolidations = int(state_dict["n_consolidations"])
        gen_state = state_dict["generator_state"]
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)


def _one_batch(inputs) -> bool:
    """A Tensor, a dict of arguments or a tuple of tensors is one batch; a list or another iterable holds batches."""
    if isinstance(inputs, (Tensor, Mapping)):
        return True
    return isinstance(inputs, tuple) and len(inputs) > 0 and all(
        isinstance(t, Tensor) or not isinstance(t, (tuple, list, Mapping)) for t in inputs
    ) and isinstance(inputs[0], Tensor)
