r"""FisherAdam: Adam's update with the running diagonal Fisher as the noise part of the second moment."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .._checks import check_clip, check_decay, check_finite_nonnegative
from ..likelihoods import Likelihood
from ..settings import FisherSettings
from .base import FisherOptimizer
from .units import LossScale

__all__ = ["FisherAdam"]


class FisherAdam(FisherOptimizer):
    r"""Adam whose second moment is the running diagonal Fisher of the loss being trained.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad \hat m_t = m_t / (1-\beta_1^t) \\
        \bar F_k &= \beta_2 \bar F_{k-1} + (1-\beta_2) \hat F_k, \qquad
            F = \max(\bar F_k / (1-\beta_2^k), \rho\,\overline{F})
            \quad\text{(at refresh } k\text{, every } \texttt{fisher\_interval} \text{ steps)} \\
        \theta_t &= \theta_{t-1}(1-\eta w) - \eta\,\mathrm{clip}_c\Big(
            \frac{\hat m_t}{\sqrt{F/B + \sigma \hat m_t^2 + \lambda} + \epsilon}\Big)

    ``g`` is the gradient of the training loss, by default the **mean over the batch's B inputs** of the
    per-input negative log-likelihood (``F.cross_entropy`` with ``reduction="mean"`` on ``(B, C)`` logits; other
    reductions: ``loss_reduction``).  :math:`\hat F_k` is :func:`fisher_optim.diagonal_fisher`'s quantity: the
    **mean over inputs of the per-input** diagonal Fisher (summed over positions for sequence outputs), estimated
    on the first ``fisher_batch`` inputs of the latest batch.  :math:`\overline F` is its mean over the tensor
    (``floor`` :math:`\rho`, default 0: no floor).  Defaults: clip ``c = 1``, no signal term (:math:`\sigma = 0`).

    **Units (docs/fisher-math.md §15).**  Under the model, the covariance of the gradient of a mean over ``B``
    inputs is :math:`F/B`, and Adam's second moment is about :math:`v \approx \bar g^2 + F/B` (:math:`\bar g` the
    full-data gradient).  FisherAdam divides by :math:`\sqrt{F/B}`, with ``B`` read from the captured batch
    every step (micro-batches joined; all ranks under DDP): where gradient noise dominates its step is Adam's, with
    an exact (not squared-gradient) estimate of the noise, so **an lr tuned for Adam carries over**, and so does
    Adam's default ``lr=1e-3``.  Where the signal dominates (:math:`|\hat m| \gg \sqrt{F/B}`, a stale or small
    Fisher) Adam's denominator grows with :math:`\bar g^2` and FisherAdam's does not; two bounds are offered:

    * ``clip=1`` (default): the clip in the loss's units, a coordinate moves by at most :math:`\eta` per step, as a
      sign step of Adam's;
    * ``signal=True`` (with ``clip=None``): Adam's signal term :math:`\hat m^2` under the root, so
      :math:`|\hat m| / \sqrt{F/B + \hat m^2} < 1` in every coordinate without a clip;
    * ``floor=ρ``: the Fisher of each tensor floored at ρ times its mean.

    The default was chosen by measurement (``benchmarks/results/update_ablation.md``, the optimizer suite and the
    defaults sweep; docs/fisher-math.md §15): the three are close, the clip was level or ahead on the most problems.
    0.1.0 divided by :math:`\sqrt F` (the per-input scale): ``units="input"`` (with ``lr=5e-3``) reproduces it;
    its steps were :math:`1/\sqrt B` of Adam's where noise dominates and the clip carried most of the update.

    Args:
        model: the network whose output rows are the natural parameters of ``likelihood``.  Its forward
            inputs are captured by a hook; a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper
            is allowed (estimation runs on ``model.module`` and the estimates are averaged over ranks; ``B`` is
            then the inputs of all ranks together).
        likelihood: ``"categorical"`` (default), ``"bernoulli"``, ``"gaussian"``, ``"poisson"`` or a
            :class:`~fisher_optim.likelihoods.Likelihood`.
        params: parameters or parameter groups (default ``model.parameters()``); each must belong to
            ``model``.
        lr: learning rate :math:`\eta` (default 1e-3, Adam's; ``benchmarks/results/defaults_sweep.md``).
        betas: :math:`(\beta_1, \beta_2)`, default (0.9, 0.99); :math:`\beta_2` is the decay *per refresh* of the
            running Fisher: with ``fisher_interval=10`` its memory is ~1000 steps, as Adam's 0.999 per step.
        eps: :math:`\epsilon` added to the square root (default 1e-8).
        weight_decay: decoupled weight decay :math:`w` (AdamW-style, default 0).
        damping: :math:`\lambda` added under the square root, in the loss's units (default 0).
        clip: per-coordinate bound ``c`` of the preconditioned step (default 1.0; ``None``: no clip).
        settings: the estimation settings, a :class:`~fisher_optim.FisherSettings` (default: its defaults):
            ``estimator`` (``"auto"``, the default: per-layer choice of estimator and sample count, see
            :func:`fisher_optim.selection.select`, among ``exact``, ``mc1`` and the Hutchinson estimators; or a
            fixed ``"exact"``, ``"mc1"`` (Î₁), ``"mc2"`` (Î₂), ``"empirical"`` (needs ``opt.step(targets=y)`` with
            the batch's observed labels), ``"hutchinson"``, ``"hutchinson_batch"`` or ``"gnb"`` (Sophia's
            estimate; see :func:`~fisher_optim.diagonal_fisher` for each one's scaling: all estimate the mean over
            inputs)), ``n_samples``, ``fisher_interval`` (steps between refreshes, default 10), ``fisher_batch``
            (captured inputs the estimation uses, default 32), ``target_rse``, ``select_interval``,
            ``max_samples``, ``cost_model``, ``nonfinite``, ``seed``, ``output``, and how the estimate enters the
            update: ``loss_reduction`` (how the training loss reduces over the batch, which sets ``B``'s role,
            :mod:`fisher_optim.optim.units`: ``"mean"`` over inputs, the default; ``"element_mean"`` over every
            output element, as a token-mean LM loss or ``BCEWithLogitsLoss()`` on pixels; ``"sum"``), ``units``
            (``"loss"``, the default, :math:`F/B`; ``"input"``, :math:`F`, 0.1.0's), ``signal`` (the signal term
            :math:`\sigma = 1`, default ``False``) and ``floor`` (:math:`\rho`, default 0).  Auto mode's first
            refresh is exact (Hutchinson with one probe when the output has more than ``CLOSED_FORM_SEEDS`` = 1024
            positions x classes per input: no exact pass on a language model) and its first selection at the
            second; it re-selects every ``select_interval`` steps (default 50 refreshes), doubled after each
            selection that keeps the plan in use (up to 8x; reset when the plan changes;
            :mod:`fisher_optim.schedule`).
        **kwargs: any field of :class:`~fisher_optim.FisherSettings` as a keyword (``estimator="exact"``), over
            ``settings``; 0.1.0's ``variance_interval`` (refreshes between selections) is converted to
            ``select_interval``.  Unknown keywords raise :class:`TypeError`.
        foreach: ``torch._foreach_*`` update (``None``: only when every parameter is on CUDA, as torch.optim).

    Example:
        >>> import torch
        >>> from fisher_optim.optim import FisherAdam
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> opt = FisherAdam(model, likelihood="categorical", estimator="exact")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> for _ in range(3):
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> sorted(opt.state[model[0].weight])
        ['exp_avg', 'fisher_count', 'fisher_ema', 'precond', 'step']
        >>> opt.loss_scale.inputs
        16
        >>> opt.close()
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        params: Iterable | None = None,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        damping: float = 0.0,
        clip: float | None = 1.0,
        settings: FisherSettings | None = None,
        foreach: bool | None = None,
        **kwargs,
    ):
        settings = FisherSettings.build(settings, owner=type(self).__name__, **kwargs)
        defaults = check_adam_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_finite_nonnegative("damping value", damping)
        check_clip(clip)
        defaults.update(damping=damping, clip=clip, foreach=foreach)
        super().__init__(model, likelihood, params, defaults, settings)

    def _update_kwargs(self, group: dict, scale: LossScale) -> dict:
        signal = None
        if self.settings.signal:  # the denominator changes with m_hat: computed at every step from F
            signal = dict(fisher_scale=fisher_scale(self.settings, scale), damping=group["damping"], eps=group["eps"])
        return dict(lr=group["lr"], beta1=group["betas"][0], bias_correction=True, weight_decay=group["weight_decay"],
                    clip=group["clip"], signal=signal)  # fmt: skip

    def _refresh_kwargs(self, group: dict) -> dict:
        return dict(beta2=group["betas"][1])

    def _precond_kwargs(self, group: dict, scale: LossScale | None) -> dict:
        if self.settings.signal:  # F itself: the update adds m_hat^2 and takes the root
            return dict(floor=self.settings.floor, reciprocal=False)
        return dict(floor=self.settings.floor, reciprocal=True, fisher_scale=fisher_scale(self.settings, scale),
                    damping=group["damping"], power=0.5, eps=group["eps"])  # fmt: skip


def fisher_scale(settings: FisherSettings, scale: LossScale | None) -> float:
    """What the running Fisher is multiplied by in the denominator: the loss's covariance factor, or 1."""
    return scale.adam_scale if settings.units == "loss" and scale is not None else 1.0


def check_adam_hyperparameters(*, lr, betas, eps, weight_decay) -> dict:
    """Validate FisherAdam's (and ScheduleFreeFisherAdam's) hyperparameters; the param-group defaults."""
    check_finite_nonnegative("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}. Must be a pair (beta1, beta2)")
    check_decay("beta parameter at index 0", betas[0])
    check_decay("beta parameter at index 1", betas[1])
    check_finite_nonnegative("epsilon value", eps)
    check_finite_nonnegative("weight_decay value", weight_decay)
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
