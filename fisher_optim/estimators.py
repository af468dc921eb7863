r"""Diagonal Fisher estimators: exact (diagonal GGN), Î₁ (``mc1``), Î₂ (``mc2``), the empirical Fisher, and the
Hutchinson estimators (``hutchinson``, ``hutchinson_batch``) with Sophia's ``gnb`` as their sampled-label baseline.

Scaling contract (docs/fisher-math.md §2): for inputs :math:`x_1..x_M` every estimator returns, per parameter,

.. math::  \hat F_i = \frac{1}{M} \sum_{m=1}^{M} \hat I_{ii}(\theta \mid x_m)

(``reduction="sum"`` drops the ``1/M``), where for ``N = n_samples`` labels :math:`y_{m,k}` drawn from the
model and :math:`\ell_{m,k} = \log p(y_{m,k} \mid x_m, \theta)`:

* ``exact``: :math:`I_{ii}(\theta|x) = v_i^\top I(h) v_i` with :math:`v_i = \partial_i h` (diagonal GGN);
* ``mc1`` (Î₁): :math:`\frac1N \sum_k (\partial_i \ell_{m,k})^2` — per-sample squared scores, never the
  square of a batch gradient;
* ``mc2`` (Î₂): :math:`\frac1N \sum_k (-\partial^2_{ii} \ell_{m,k}) = I_{ii}(\theta|x_m) -
  u_i^\top(\bar t_m - \eta_m)` with :math:`u_i = \partial^2_{ii} h` (exact Hessian diagonal, no
  Hutchinson);
* ``empirical``: :math:`(\partial_i \log p(\tilde y_m \mid x_m, \theta))^2` with the observed targets;
* ``hutchinson`` (docs/fisher-math.md §13): :math:`\frac1N \sum_k (\partial_i\, (S_m \xi_{m,k})^\top h_m)^2` with
  :math:`S_m S_m^\top = I(h_m)` and :math:`\xi_{m,k}` Rademacher — per-input squares, like Î₁ with the seed
  :math:`S\xi` in place of :math:`\eta - t(y)`; relative standard deviation at most :math:`\sqrt{2/N}` per input;
* ``hutchinson_batch`` (docs/fisher-math.md §13): :math:`\frac1N\sum_k \frac1M g_{k,i}^2` with
  :math:`g_k = \partial_\theta \sum_m (S_m \xi_{m,k})^\top h_m`, one ordinary backward per probe (no
  per-sample gradients, no per-layer rule): the *square of a batch gradient*, divided by ``M``;
* ``gnb`` (Sophia's Gauss-Newton-Bartlett estimate, Liu et al. 2023): the same construction with one sampled
  label per input, :math:`\frac1N\sum_k \frac1M \big(\sum_m \partial_i \ell_{m,k}\big)^2
  = M \cdot (\text{mean over the batch of the sampled-label gradient})^2` — a named baseline: unbiased, but
  with Î₁'s unbounded fourth moments (rare classes of a confident softmax) *and* the cross terms between inputs
  of a batch square: its variance always exceeds Î₁'s, and unlike ``hutchinson_batch``'s (at most twice the
  squared mean Fisher) it has no bound (docs/fisher-math.md §13).  It can still be the smaller of the two on balanced
  outputs
  (a two-class softmax at p = ½ gives constant squared scores).

All but ``empirical`` are unbiased for ``exact`` (the batch ones for the mean over inputs only: their cross terms
between inputs have zero mean).

**Outputs with positions** (categorical ``(B, ..., C)`` or ``(B, C, ...)``, docs/fisher-math.md §12): one input's
:math:`I(\theta|x) = \sum_t J_t^\top I(h_t) J_t` is the *sum* over its positions (the labels are independent
given the input); the estimate stays the mean over inputs.  ``exact`` uses ``T*C`` seeds per input (the
per-position factors ``S_t``); ``mc1`` draws a label at every position and squares the whole input's score
:math:`\sum_t J_t^\top(\eta_t - e_{y_t})` (one seed per draw, not per position: squaring per position
would be another estimator, with another variance); ``mc2`` and
``empirical`` are per input in the same way.  Positions whose target is ``ignore_index`` are left out of
every estimator (their seeds are zero).  A token-mean loss :math:`\frac1T\sum_t` has gradients ``1/T`` of
the per-input scores, so squares ``1/T^2`` of this Fisher, and a GGN ``1/T`` of it (README, "Outputs with
positions").

The model is evaluated with dropout off; BatchNorm in eval mode uses its running statistics, in train mode the
estimation batch's own statistics held constant (the function being trained, without coupling between inputs).
Train/eval flags, BatchNorm buffers and ``.grad`` are left untouched.

**One estimation path.**  A *plan* gives each parameter its own ``(estimator, n_samples)``:
:func:`plan_from_probe` runs it on one probe (one forward, one draw per kind of seed, each group's backward
restricted to its layers), :func:`estimate_plan` wraps it with the probe and the mean over inputs (the optimizers'
refreshes and EWC's auto mode), and :func:`diagonal_fisher` is the uniform plan ``{name: (estimator, n_samples)}``
with its argument checks and the all-zero warning.  The seeds and reductions live in :mod:`fisher_optim.seeds`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._checks import ESTIMATORS, check_estimator, check_n_samples, check_reduction
from .batch import OutputSpec
from .engine import Probe, reduce_records, trainable_parameters
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .likelihoods import Categorical, Likelihood, get_likelihood
from .seeds import (
    batch_squares,
    check_targets_use,
    empirical_seeds,
    exact_sum,
    hutchinson_seeds,
    identity_sum,
    per_input_squares,
    sampled_seeds,
    sum_of_squares,
    target_mask,
)

__all__ = [
    "diagonal_fisher",
    "estimate_plan",
    "plan_from_probe",
    "ESTIMATORS",
]


# -- the one estimation path: a plan, each parameter with its own (estimator, n_samples) ----------------------
def _check_plan(plan: dict[str, tuple[str, int]], params: dict[str, Tensor]) -> dict[str, tuple[str, int]]:
    """``plan`` with its names among ``params``, its estimators known and its sample counts integers >= 1."""
    missing = [n for n in plan if n not in params]
    if missing:
        raise ValueError(f"unknown or frozen parameter names: {missing}")
    out = {}
    for name, spec in plan.items():
        est, n = spec
        check_estimator(est)
        out[name] = (est, check_n_samples(n))
    return out


def plan_from_probe(probe: Probe, plan, generator=None, targets=None) -> dict[str, Tensor]:
    """Sum over inputs of the diagonal Fisher, each parameter with its own ``(estimator, n_samples)``.

    One label draw of ``max N`` samples serves every Î₁/Î₂ parameter (a parameter with ``N_l`` samples
    uses the first ``N_l``); each group's backward is restricted to its layers.  Likewise one Rademacher draw
    serves the ``hutchinson`` parameters, one the ``hutchinson_batch`` parameters, and one label draw the ``gnb``
    parameters (drawn in that order, after the Î₁/Î₂ labels).  The batch estimators return the squared batch
    gradient (unbiased for the *sum* over inputs, like every entry here).  Î₂ is the exact pass where the
    residual ``d2h/dtheta_i^2`` is zero (docs/fisher-math.md §6a, §6g), and such parameters need no labels.
    ``targets``: the labels of ``empirical``, and for categorical outputs a mask of unlabelled positions for the
    other estimators (see :func:`diagonal_fisher`).
    """
    plan = _check_plan(plan, probe.params)
    zero = hessian_plan(probe.model, probe.params).zero if any(e == "mc2" for e, _ in plan.values()) else set()
    return _run_plan(probe, plan, zero, generator, targets)


def _run_plan(probe: Probe, plan, zero: set[str], generator, targets, draw_zero_mc2: bool = False) -> dict[str, Tensor]:
    """:func:`plan_from_probe` for a checked ``plan``; ``zero``: the parameters whose Î₂ residual is zero.
    ``draw_zero_mc2`` draws the Î₂ labels even where no Î₂ parameter uses them (every residual zero), as
    :func:`diagonal_fisher` always has: its random stream stays the same."""
    lik = probe.lik
    groups: dict[str, dict[str, int]] = {e: {} for e in ESTIMATORS}
    n_zero = 0
    for name, (est, n) in plan.items():
        if est == "mc2" and name in zero:
            est, n_zero = "exact", max(n_zero, n)  # Î₂ = exact where d2h/dtheta_i^2 = 0
        groups[est][name] = n
    masked = targets is not None and isinstance(lik, Categorical)
    mask = target_mask(probe, targets) if masked and any(groups[e] for e in ESTIMATORS if e != "empirical") else None
    out: dict[str, Tensor] = {}
    exact_names = set(groups["exact"]) | set(groups["mc2"])
    if exact_names:
        out.update(exact_sum(probe, exact_names, mask))
    n_max = max([*groups["mc1"].values(), *groups["mc2"].values(), n_zero if draw_zero_mc2 else 0])
    if n_max:
        _, grads = sampled_seeds(probe, n_max, generator, mask)
        if groups["mc1"]:
            kmax = max(groups["mc1"].values())
            recs = probe.seeded(grads if kmax == n_max else grads[:kmax], names=groups["mc1"])
            out.update(per_input_squares(probe, recs, groups["mc1"]))
        for n in sorted(set(groups["mc2"].values())):
            names = {k for k, v in groups["mc2"].items() if v == n}
            rrecs = residual_records(probe, grads[:n].mean(0, keepdim=True), per_sample=False)
            res = reduce_records(rrecs, identity_sum, 1, probe.params, names)
            for k in names:
                out[k] = out[k] + res[k]
    if groups["hutchinson"]:
        n_h = max(groups["hutchinson"].values())
        recs = probe.seeded(hutchinson_seeds(probe, n_h, generator, mask), names=groups["hutchinson"])
        out.update(per_input_squares(probe, recs, groups["hutchinson"]))
    if groups["hutchinson_batch"]:
        seeds = hutchinson_seeds(probe, max(groups["hutchinson_batch"].values()), generator, mask)
        out.update(batch_squares(probe, seeds, groups["hutchinson_batch"]))
    if groups["gnb"]:
        _, seeds = sampled_seeds(probe, max(groups["gnb"].values()), generator, mask)
        out.update(batch_squares(probe, seeds, groups["gnb"]))
    if groups["empirical"]:
        if targets is None:
            raise ValueError("estimator 'empirical' needs targets (the observed labels)")
        recs = probe.seeded(empirical_seeds(probe, targets), names=groups["empirical"])
        out.update(reduce_records(recs, sum_of_squares(), 2, probe.params, groups["empirical"]))
    return {n: out[n] for n in probe.params if n in out}  # in the order of probe.params


def _estimate(
    model: nn.Module,
    inputs,
    lik: Likelihood,
    plan: dict[str, tuple[str, int]] | tuple[str, int],
    *,
    generator,
    targets,
    output: OutputSpec,
    reduction: str,
    draw_zero_mc2: bool = False,
) -> tuple[dict[str, Tensor], list[str]]:
    """The one path: one probe, the plan, the reduction over inputs.  ``plan``: checked, over trainable parameters
    of ``model``; or one checked ``(estimator, n_samples)``, the uniform plan over all of them.  Returns the
    estimates and the names of the parameters the output depends on."""
    uniform = isinstance(plan, tuple)
    estimators = {plan[0]} if uniform else {e for e, _ in plan.values()}
    zero = hessian_plan(model, trainable_parameters(model)).zero if "mc2" in estimators else set()  # before any work
    with Probe(model, inputs, lik, names=None if uniform else list(plan), output=output) as probe:
        if uniform:
            plan = dict.fromkeys(probe.params, plan)
        out = _run_plan(probe, plan, zero, generator, targets, draw_zero_mc2)
        m = probe.h.shape[0]
        depends = [n for n in probe.params if n not in probe.unused]
    if reduction == "mean":
        out = {n: v / m for n, v in out.items()}
    return {n: v.detach() for n, v in out.items()}, depends


def estimate_plan(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    plan: dict[str, tuple[str, int]],
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
) -> dict[str, Tensor]:
    r"""Mean over inputs of the diagonal Fisher for the parameters in ``plan``, each with its own estimator.

    ``plan`` maps parameter names (as in ``model.named_parameters()``) to ``(estimator, n_samples)``; every
    estimator of :func:`diagonal_fisher` is allowed.  The scaling contract is :func:`diagonal_fisher`'s:
    :math:`\frac1M\sum_m \hat I_{ii}`, and with one estimator for every parameter the result is
    :func:`diagonal_fisher`'s (which is this call with the uniform plan).  One forward serves every group; see
    :func:`plan_from_probe` for the draws.  This is what the optimizers' refreshes and EWC's auto mode call.

    Example:
        >>> import torch
        >>> from fisher_optim import estimate_plan
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> plan = {"0.weight": ("mc1", 4), "0.bias": ("mc1", 4), "2.weight": ("exact", 1)}
        >>> F = estimate_plan(net, torch.randn(8, 4), likelihood="categorical", plan=plan)
        >>> sorted(F)
        ['0.bias', '0.weight', '2.weight']
    """
    lik = get_likelihood(likelihood)
    plan = _check_plan(plan, trainable_parameters(model))
    kw = dict(generator=generator, targets=targets, output=output, reduction="mean")
    return _estimate(model, inputs, lik, plan, **kw)[0]


def diagonal_fisher(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    estimator: str,
    n_samples: int = 1,
    targets: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    output: OutputSpec = None,
) -> dict[str, Tensor]:
    r"""Diagonal Fisher information of ``model`` at ``inputs``, one tensor per trainable parameter.

    Args:
        model: any ``nn.Module`` whose output rows are the natural parameters of ``likelihood``.
            ``nn.Linear``/``nn.Conv2d``/BatchNorm (running statistics)/``nn.Embedding``/``nn.LayerNorm`` and
            self-attention projections take fast per-layer rules; every other module with parameters takes an
            exact ``torch.func`` route.
        inputs: the model's inputs for ``M`` examples: a Tensor ``(M, ...)`` (``model(x)``), a tuple
            (``model(*inputs)``) or a dict (``model(**inputs)``).  Tensors whose leading dimension is ``M`` (that of
            the first tensor) are sliced together; other arguments are passed whole to every call.
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``, ``"poisson"`` or a
            :class:`~fisher_optim.likelihoods.Likelihood`.
        estimator: ``"exact"``, ``"mc1"`` (Î₁), ``"mc2"`` (Î₂), ``"empirical"`` (needs ``targets``),
            ``"hutchinson"``, ``"hutchinson_batch"`` or ``"gnb"`` (see the module docstring and below).
        n_samples: labels drawn from the model per input (``mc1``, ``mc2``, ``gnb``), or Rademacher probes
            per input (``hutchinson``, ``hutchinson_batch``); the estimate averages over them (``1/N``).
        targets: observed targets: the labels of ``"empirical"`` (class indices for categorical, else the
            output's shape).  Categorical only: for ``"exact"``, ``"mc1"`` and ``"mc2"`` a mask, ``(M,)`` or
            ``(M, *positions)`` class indices whose entries equal to ``likelihood.ignore_index`` (default
            ``-100``) drop that position (or input) from the sum; the mean still divides by ``M``.
        generator: ``torch.Generator`` for the label draws (one ``likelihood.sample(h, n_samples)`` call) or
            the Rademacher signs (one ``torch.randint`` call of shape ``(N, M, C)``).
        reduction: ``"mean"`` (default) over the ``M`` inputs or ``"sum"``.
        output: picks the natural parameters out of the model's output: ``None`` (the output itself, the first
            element of a tuple/list, or the ``"logits"`` entry/attribute of a dict or output object), a key, an
            index or a callable.

    Returns:
        ``{name: tensor}`` keyed like ``model.named_parameters()`` (parameters that require grad), each
        of the parameter's shape: :math:`\frac1M \sum_m \hat I_{ii}(\theta \mid x_m)`.  This is
        :func:`estimate_plan` with the uniform plan ``{name: (estimator, n_samples)}`` (and ``reduction``).

    The batch estimators square a gradient of the whole batch, :math:`g_k = \partial_\theta \sum_m
    s_{m,k}^\top h_m` (seeds :math:`s = S\xi` for ``hutchinson_batch``, :math:`s = \eta - t(y)` for ``gnb``):
    ``"mean"`` returns :math:`\frac1N \sum_k g_{k,i}^2 / M` (Sophia's ``B * grad_mean**2``), unbiased for the mean
    Fisher; ``"sum"`` returns :math:`\frac1N \sum_k g_{k,i}^2` (the square of the *summed* loss's gradient),
    unbiased for the summed Fisher :math:`\sum_m I_{ii}(\theta|x_m)` — ``M`` times the mean, as for every
    estimator.  Neither is the square of the mean-loss gradient (that is biased down by ``M``).  Their relative
    standard deviation is at most :math:`\sqrt{2/N}` but does not shrink with ``M`` (one random projection of the
    whole batch); ``hutchinson``'s shrinks like Î₁'s (per-input squares).

    Example:
        >>> import torch
        >>> from fisher_optim import diagonal_fisher
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> F = diagonal_fisher(net, x, likelihood="categorical", estimator="exact")
        >>> sorted(F), F["0.weight"].shape
        (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([8, 4]))
        >>> F2 = diagonal_fisher(net, x, likelihood="categorical", estimator="mc2",
        ...                      generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(F2["2.weight"], F["2.weight"])  # Î₂ is exact on the last layer
        True

        A tagger with one distribution per position, its padding marked ``-100``:

        >>> tagger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(2, 5, 4)                      # (batch, positions, features)
        >>> y = torch.tensor([[0, 1, 2, -100, -100], [2, 2, 0, 1, 0]])
        >>> Fs = diagonal_fisher(tagger, x, likelihood="categorical", estimator="exact", targets=y)
        >>> Fs["2.bias"].shape
        torch.Size([3])
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator)
    n_samples = check_n_samples(n_samples)
    check_reduction(reduction)
    check_targets_use(lik, estimator, targets)
    kw = dict(generator=generator, targets=targets, output=output, reduction=reduction, draw_zero_mc2=True)
    out, depends = _estimate(model, inputs, lik, (estimator, n_samples), **kw)  # the uniform plan
    if depends and estimator != "mc2" and all(not bool(out[n].any()) for n in depends):
        warnings.warn(
            f"diagonal_fisher: the {estimator} Fisher is exactly zero for every parameter the output depends on "
            f"({len(depends)} tensors): is likelihood={lik.name!r} the model's output distribution?",
            RuntimeWarning,
            stacklevel=2,
        )
    return out
