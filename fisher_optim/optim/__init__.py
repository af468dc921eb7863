r"""Fisher optimizers: drop-in :mod:`torch.optim` optimizers preconditioned by a running diagonal Fisher.

* :class:`FisherAdam`: Adam's update with :math:`\sqrt{\hat F}` in place of :math:`\sqrt{v}`;
* :class:`NaturalGradient`: damped diagonal natural gradient with momentum, :math:`m / (\hat F + \lambda)`.

Both are thin classes over one functional core (:mod:`fisher_optim.optim._functional`: the per-step update
and the refresh of the preconditioner, each with a for-loop and a ``torch._foreach_*`` path) and one base
class (:mod:`fisher_optim.optim.base`: Fisher refresh and per-layer estimator selection, non-finite handling,
checkpoints), with the input capture in :mod:`~fisher_optim.optim.capture`, the DDP helpers in
:mod:`~fisher_optim.optim.distributed`, the report in :mod:`~fisher_optim.optim.report` and the refresh and
selection schedule in :mod:`fisher_optim.schedule`.

Usage (the loop is unchanged; the optimizer captures the inputs with a forward hook)::

    opt = FisherAdam(model, likelihood="categorical")
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()            # opt.step(targets=y) for estimator="empirical"
        opt.zero_grad()
    print(opt.fisher_report().table())
    opt.close()
"""

from ._functional import fisher_adam, natural_gradient, preconditioned_update, refresh_fisher, schedule_free_update
from .base import FisherOptimizer
from .fisher_adam import FisherAdam
from .natural_gradient import NaturalGradient
from .report import FisherReport
from .schedule_free import ScheduleFreeFisherAdam

__all__ = [
    "FisherAdam",
    "NaturalGradient",
    "ScheduleFreeFisherAdam",
    "FisherOptimizer",
    "FisherReport",
    "fisher_adam",
    "natural_gradient",
    "preconditioned_update",
    "refresh_fisher",
    "schedule_free_update",
]
