r"""FisherAdam: Adam's update with the running diagonal Fisher in place of the squared-gradient average."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .._checks import check_clip, check_decay, check_nonnegative
from ..likelihoods import Likelihood
from ..settings import FisherSettings
from .base import FisherOptimizer

__all__ = ["FisherAdam"]


class FisherAdam(FisherOptimizer):
    r"""Adam-style optimizer preconditioned by the square root of a running diagonal Fisher.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad \hat m_t = m_t / (1-\beta_1^t) \\
        \bar F_k &= \beta_2 \bar F_{k-1} + (1-\beta_2) \hat F_k, \qquad \tilde F = \bar F_k / (1-\beta_2^k)
            \quad\text{(at refresh } k\text{, every } \texttt{fisher\_interval} \text{ steps)} \\
        \theta_t &= \theta_{t-1}(1-\eta w) - \eta\,\mathrm{clip}_c\!\Big(
            \frac{\hat m_t}{\sqrt{\max(\tilde F, 0) + \lambda} + \epsilon}\Big)

    ``g`` is the gradient of the **mean over the batch** of the per-input negative log-likelihood
    (``F.cross_entropy`` with its default ``reduction="mean"`` for ``likelihood="categorical"``) and
    :math:`\hat F_k` is :func:`fisher_optim.diagonal_fisher`'s quantity: the **mean over inputs of the
    per-input** diagonal Fisher, estimated on the first ``fisher_batch`` inputs of the latest batch;
    :math:`\tilde F` is the bias-corrected running estimate.

    **Scale, and why the default lr is 5e-3 rather than Adam's 1e-3.**  Adam divides by
    :math:`\sqrt{v}`, :math:`v \approx E[g^2] = \bar g^2 + \mathrm{Var}(g)`; under the model the variance of a
    mean over ``B`` inputs is :math:`F/B`, so where gradient noise dominates Adam's denominator is about
    :math:`\sqrt{F/B}`.  FisherAdam divides by :math:`\sqrt F`, the per-input scale, with no ``1/B``: its step
    :math:`\eta\,|\hat m|/\sqrt F` is about :math:`\eta\,|\bar g|/\sqrt F` (at most about :math:`\eta`, since
    :math:`\bar g^2 \lesssim F` near a good fit) where the gradient signal dominates, and shrinks as
    :math:`1/\sqrt B` where noise dominates, as a natural-gradient step of the mean loss does; the
    preconditioner itself does not depend on the batch size.  The same nominal ``lr`` therefore gives smaller
    steps than Adam's.  The default ``lr=5e-3`` comes from a sweep over logistic regression, a small CNN,
    torchvision ResNet-18 and MobileNetV3-small in train mode (BatchNorm), a small ViT, a Transformer and an
    LSTM classifier (``benchmarks/defaults_sweep.py``, ``benchmarks/results/defaults_sweep.md``): the former
    ``2e-2``, tuned on MLPs, ended 2x (ResNet-18) to 26x (MobileNetV3) above AdamW(lr=1e-3)'s training loss
    on the BatchNorm networks, which train best at 1e-3 to 2e-3, while the small models need about 5e-3
    or more; no single lr suits both, and the results file says where ``5e-3`` misses.  **An lr tuned for
    Adam** at batch size ``B`` carries over as ``lr = lr_adam * sqrt(B)`` with ``clip = 1/sqrt(B)``:
    that is exactly preconditioning by :math:`\sqrt{F/B}`, the Fisher of the mini-batch mean loss, whose
    scale is Adam's (the sweep measures it against AdamW).  The clip ``c`` (default 1,
    Sophia-style) bounds every coordinate's step by :math:`\eta`: it guards against
    :math:`|\bar g| \gg \sqrt F` (confident mistakes, where the Fisher is small but the data gradient large,
    and noisy one-sample estimates); without it the defaults are unstable at batch size 8 on digits.
    ``clip=None`` disables it (the step is then one fused ``addcmul_``).

    Args:
        model: the network whose output rows are the natural parameters of ``likelihood``.  Its forward
            inputs are captured by a hook; a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper
            is allowed (estimation runs on ``model.module`` and the estimates are averaged over ranks).
        likelihood: ``"categorical"`` (default), ``"bernoulli"``, ``"gaussian"``, ``"poisson"`` or a
            :class:`~fisher_optim.likelihoods.Likelihood`.
        params: parameters or parameter groups (default ``model.parameters()``); each must belong to
            ``model``.
        lr: learning rate :math:`\eta` (default 5e-3, see "Scale").
        betas: :math:`(\beta_1, \beta_2)`, default (0.9, 0.99); :math:`\beta_2` is the decay *per refresh* of the
            running Fisher: with ``fisher_interval=10`` its memory is ~1000 steps, as Adam's 0.999 per step.
        eps: :math:`\epsilon` added to the square root (default 1e-8).
        damping: :math:`\lambda` added to the Fisher under the square root (default 0).
        weight_decay: decoupled weight decay :math:`w` (AdamW-style, default 0).
        clip: per-coordinate bound ``c`` of the preconditioned step (default 1.0; ``None``: no clip).
        settings: the estimation settings, a :class:`~fisher_optim.FisherSettings` (default: its defaults):
            ``estimator`` (``"auto"``, the default: per-layer choice of estimator and sample count, see
            :func:`fisher_optim.selection.select`, which chooses among ``exact`` and ``mc1``; or a fixed
            ``"exact"``, ``"mc1"`` (Î₁), ``"mc2"`` (Î₂), ``"empirical"`` (needs ``opt.step(targets=y)`` with the
            batch's observed labels), ``"hutchinson"``, ``"hutchinson_batch"`` or ``"gnb"`` (Sophia's estimate;
            see :func:`~fisher_optim.diagonal_fisher` for each one's scaling: all estimate the mean over inputs)),
            ``n_samples``, ``fisher_interval`` (steps between refreshes, default 10), ``fisher_batch`` (captured
            inputs the estimation uses, default 32), ``target_rse``, ``select_interval``, ``max_samples``,
            ``cost_model``, ``nonfinite``, ``seed``, ``output``.  Auto mode's first refresh is exact (Hutchinson
            with one probe when the output has more than ``CLOSED_FORM_SEEDS`` = 1024 positions x classes per input:
            no exact pass on a language model) and its first selection at the second; it re-selects every
            ``select_interval`` steps (default 50 refreshes),
            doubled after each selection that keeps the plan in use (up to 8x; reset when the plan changes).  A
            selection's refresh reuses the exact Fisher of its variance pass, and its measured costs are cached
            per input shape (:mod:`fisher_optim.schedule`): on a sigmoid MLP 784-128-128-128-10 (32 inputs, CPU)
            a selection and its refresh cost about 2.5-2.7 exact refreshes with cached costs and 4-6 when it
            measures them, 3 % of auto's estimation time over 400 refreshes
            (``benchmarks/results/estimation_quality.md``, "Cost per refresh").
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
        >>> opt.close()
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        params: Iterable | None = None,
        lr: float = 5e-3,
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
        check_nonnegative("learning rate", lr)
        check_nonnegative("epsilon value", eps)
        check_decay("beta parameter at index 0", betas[0])
        check_decay("beta parameter at index 1", betas[1])
        check_nonnegative("damping value", damping)
        check_nonnegative("weight_decay value", weight_decay)
        check_clip(clip)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, damping=damping, clip=clip,
                        foreach=foreach)  # fmt: skip
        super().__init__(model, likelihood, params, defaults, settings)

    def _update_kwargs(self, group: dict) -> dict:
        return dict(lr=group["lr"], beta1=group["betas"][0], bias_correction=True,
                    weight_decay=group["weight_decay"], clip=group["clip"])  # fmt: skip

    def _refresh_kwargs(self, group: dict) -> dict:
        return dict(beta2=group["betas"][1], power=0.5, damping=group["damping"], eps=group["eps"])
