"""fisher_optim: the diagonal Fisher information of PyTorch models, cheap, honest and useful.

Layout (imports flow downwards only)::

    likelihoods   exponential-family outputs: sampling, NLL, I(h), factors, moments
    layers        per-layer rules (Linear, Conv2d) and per-sample records
    batch         inputs and outputs as users write them (Tensor / tuple / dict, output=)
    forward       how the estimation forward runs (modes, eager, BatchNorm statistics) and autograd's view of it
    general       the general route: per-input gradients for any module (vmap of vjp, or an autograd loop)
    engine        one forward, coverage from autograd, seeded backward passes, per-layer records
    hessian       exact Hessian-diagonal residual for Î₂ (zero / chain / HVP routes)
    seeds         what each estimator backpropagates (exact, sampled, Rademacher, observed) and its reduction
    estimators    one estimation path: a plan gives each parameter its (estimator, N) in one probe
                  (estimate_plan); diagonal_fisher is its uniform plan
    variance      closed-form variances of the estimators, per parameter and per layer
    bounds        eigenvalue and Frobenius bounds on those variances
    costs         what a refresh costs (measured or parameter-count units), per layer
    plan_search   the joint per-layer plan search (numpy scorer over many plans at once)
    selection     per-layer estimator / sample-count choice, with the reasons
    settings      FisherSettings: the optimizers' estimation settings, one validated value
    schedule      when to refresh and re-select: counters, plan in use, back-off, cost cache
    optim         FisherAdam, ScheduleFreeFisherAdam, NaturalGradient: running Fisher, auto selection, fused updates
    ewc           EWC regularisation on the same estimates
"""

from .bounds import frobenius_bounds, trace_bounds, variance_bounds
from .estimators import ESTIMATORS, diagonal_fisher, estimate_plan
from .ewc import EWC
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, Poisson, get_likelihood
from .optim import FisherAdam, FisherReport, NaturalGradient, ScheduleFreeFisherAdam
from .schedule import Schedule
from .selection import Choice, select
from .settings import FisherSettings
from .variance import fisher_moments, fisher_variance, joint_variance, layer_summary

__version__ = "0.1.0"

__all__ = [
    "diagonal_fisher",
    "ESTIMATORS",
    "Likelihood",
    "Categorical",
    "Bernoulli",
    "Gaussian",
    "Poisson",
    "get_likelihood",
    "fisher_variance",
    "fisher_moments",
    "joint_variance",
    "layer_summary",
    "variance_bounds",
    "trace_bounds",
    "frobenius_bounds",
    "select",
    "estimate_plan",
    "Choice",
    "FisherAdam",
    "NaturalGradient",
    "ScheduleFreeFisherAdam",
    "FisherReport",
    "Schedule",
    "FisherSettings",
    "EWC",
]
