r"""Diagonal Fisher estimators: exact (diagonal GGN), Î₁ (``mc1``), Î₂ (``mc2``), the empirical Fisher, and the
Hutchinson estimators (``hutchinson``, ``hutchinson_batch``) with Sophia's ``gnb`` as their sampled-label baseline.

Scaling contract (spec §2): for inputs :math:`x_1..x_M` every estimator returns, per parameter,

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
* ``hutchinson`` (spec §13): :math:`\frac1N \sum_k (\partial_i\, (S_m \xi_{m,k})^\top h_m)^2` with
  :math:`S_m S_m^\top = I(h_m)` and :math:`\xi_{m,k}` Rademacher — per-input squares, like Î₁ with the seed
  :math:`S\xi` in place of :math:`\eta - t(y)`; relative standard deviation at most :math:`\sqrt{2/N}` per input;
* ``hutchinson_batch`` (spec §13): :math:`\frac1N\sum_k \frac1M g_{k,i}^2` with
  :math:`g_k = \partial_\theta \sum_m (S_m \xi_{m,k})^\top h_m`, one ordinary backward per probe (no
  per-sample gradients, no per-layer rule): the *square of a batch gradient*, divided by ``M``;
* ``gnb`` (Sophia's Gauss-Newton-Bartlett estimate, Liu et al. 2023): the same construction with one sampled
  label per input, :math:`\frac1N\sum_k \frac1M \big(\sum_m \partial_i \ell_{m,k}\big)^2
  = M \cdot (\text{mean over the batch of the sampled-label gradient})^2` — a named baseline: unbiased, but
  with Î₁'s unbounded fourth moments (rare classes of a confident softmax) *and* the cross terms between inputs
  of a batch square: its variance always exceeds Î₁'s, and unlike ``hutchinson_batch``'s (at most twice the
  squared mean Fisher) it has no bound (spec §13).  It can still be the smaller of the two on balanced outputs
  (a two-class softmax at p = ½ gives constant squared scores).

All but ``empirical`` are unbiased for ``exact`` (the batch ones for the mean over inputs only: their cross terms
between inputs have zero mean).  The model is evaluated in eval mode (dropout off,
BatchNorm on running statistics); train/eval flags, BatchNorm buffers and ``.grad`` are left untouched.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor, nn

from .batch import OutputSpec
from .engine import Probe, reduce_records, trainable_parameters
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .likelihoods import Likelihood, get_likelihood

__all__ = [
    "diagonal_fisher",
    "ESTIMATORS",
    "check_estimator",
    "check_n_samples",
    "sum_of_squares",
]

ESTIMATORS = ("exact", "mc1", "mc2", "empirical", "hutchinson", "hutchinson_batch", "gnb")


def check_estimator(estimator: str, allowed=ESTIMATORS) -> str:
    if estimator not in allowed:
        raise ValueError(f"Invalid estimator: {estimator!r}. Must be one of {list(allowed)}")
    return estimator


def check_n_samples(n_samples) -> int:
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"Invalid n_samples: {n_samples}")
    return int(n_samples)


def check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid reduction: {reduction!r}. Must be 'mean' or 'sum'")
    return reduction


def square_sum(x: Tensor, n: int | None = None) -> Tensor:
    """``sum_{k < n} x_k^2`` over the leading axis (default all of it), accumulated in place with ``addcmul_``:
    ``(x * x).sum(0)`` allocates a tensor as large as ``x`` and reduces across its slowest axis, ~10x slower on CPU
    for the large per-sample tensors of convolutional layers."""
    n = x.shape[0] if n is None else n
    out = x[0].square()
    for k in range(1, n):
        out.addcmul_(x[k], x[k])
    return out


def sum_of_squares(scale: float = 1.0):
    """Per-input reducer ``scale * sum_k x_k^2`` (degree 2)."""

    def fn(x: Tensor, idx: slice) -> Tensor:
        out = square_sum(x)
        return out.mul_(scale) if scale != 1.0 else out

    return fn


def _identity_sum(x: Tensor, idx: slice) -> Tensor:
    return x.sum(0)


def exact_records(probe: Probe, names) -> list:
    r"""Records whose reduction by :func:`exact_reducer` gives ``sum_m I_ii(theta|x_m)`` for ``names``.

    Categorical: the ``C`` columns of ``S`` (``S S^T = I(h)``) as seeds, reduced by ``sum_k x_k^2``.
    Factorised likelihoods (``I(h)`` diagonal): the ``C`` unit seeds ``e_c`` (a stride-0 view, nothing
    materialised; the output layer's backward is a row scaling, see
    :meth:`~fisher_optim.engine.Probe.output_grads`), reduced by ``sum_c I_cc x_c^2`` = ``fisher_quad``.
    """
    h = probe.h.detach()
    if probe.lik.factorized:
        seeds = torch.eye(h.shape[1], dtype=h.dtype, device=h.device).unsqueeze(1).expand(h.shape[1], *h.shape)
        return probe.seeded(seeds, names=names, diagonal=torch.ones_like(h))
    return probe.seeded(probe.lik.fisher_factor(h).permute(2, 0, 1), names=names)


def exact_reducer(probe: Probe):
    """The per-input reducer that goes with :func:`exact_records` (degree 2)."""
    if probe.lik.factorized:
        h = probe.h.detach()
        return lambda x, idx: probe.lik.fisher_quad(h[idx], x)
    return sum_of_squares()


def exact_from_probe(probe: Probe) -> dict[str, Tensor]:
    """``sum_m I_ii(theta|x_m)``: the output layer in closed form, the others by :func:`exact_records`."""
    out, done = probe.exact_output_layer()  # the output layer needs no seeds
    rest = [n for n in probe.params if n not in done]
    if rest:
        out.update(reduce_records(exact_records(probe, rest), exact_reducer(probe), 2, probe.params, rest))
    return {n: out[n] for n in probe.params}


def sampled_seeds(probe: Probe, n_samples: int, generator) -> tuple[Tensor, Tensor]:
    """Draw ``N`` labels per input; return ``(labels (N, B, ...), score seeds eta - t(y) (N, B, C))``."""
    h = probe.h.detach()
    y = probe.lik.sample(h, n_samples, generator=generator)
    return y, probe.lik.grad(h, y)


def mc1_from_probe(probe: Probe, n_samples: int, generator) -> dict[str, Tensor]:
    """``sum_m (1/N) sum_k (d_i log p(y_mk|x_m))^2``."""
    _, seeds = sampled_seeds(probe, n_samples, generator)
    return reduce_records(probe.seeded(seeds), sum_of_squares(1.0 / n_samples), 2, probe.params)


def mc2_from_probe(probe: Probe, n_samples: int, generator, exact: dict[str, Tensor] | None = None):
    """``sum_m [I_ii(theta|x_m) + rho_i(eta_m - tbar_m)]`` (the Hessian of the sampled-label NLL)."""
    if exact is None:
        exact = exact_from_probe(probe)
    _, seeds = sampled_seeds(probe, n_samples, generator)
    recs = residual_records(probe, seeds.mean(0, keepdim=True), per_sample=False)
    res = reduce_records(recs, _identity_sum, 1, probe.params)
    return {n: exact[n] + res[n] for n in exact}


def rademacher(shape, generator, dtype, device) -> Tensor:
    """Independent signs ``+-1`` of ``shape`` (one ``torch.randint`` call with ``generator``)."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)


def hutchinson_seeds(probe: Probe, n_samples: int, generator) -> Tensor:
    r"""``N`` Hutchinson seeds per input, :math:`S_b \xi_{k,b}` (``(N, B, C)``), with :math:`S_b S_b^\top = I(h_b)`
    and :math:`\xi_{k,b}` Rademacher, independent over probes ``k``, inputs ``b`` and the columns of ``S``.

    Factorised likelihoods use :math:`S = \mathrm{diag}(\sqrt{I_{cc}})` (no ``C x C`` matrix is built);
    others :meth:`~fisher_optim.likelihoods.Likelihood.fisher_factor` (categorical: BackPACK's factor).
    """
    h = probe.h.detach()
    if probe.lik.factorized:
        scale = probe.lik.unit_variance(h).clamp_min(0).sqrt()
        return rademacher((n_samples, *h.shape), generator, h.dtype, h.device).mul_(scale)
    S = probe.lik.fisher_factor(h)  # (B, C, K)
    xi = rademacher((n_samples, h.shape[0], S.shape[-1]), generator, h.dtype, h.device)
    return torch.einsum("bck,nbk->nbc", S, xi)


def hutchinson_from_probe(probe: Probe, n_samples: int, generator) -> dict[str, Tensor]:
    r"""``sum_m (1/N) sum_k (d_i (S_m xi_mk)^T h_m)^2`` (per-input squares, like :func:`mc1_from_probe`)."""
    seeds = hutchinson_seeds(probe, n_samples, generator)
    return reduce_records(probe.seeded(seeds), sum_of_squares(1.0 / n_samples), 2, probe.params)


def batch_squares(probe: Probe, seeds: Tensor, counts: dict[str, int] | None = None) -> dict[str, Tensor]:
    r"""``(1/N_i) sum_{k < N_i} g_{k,i}^2`` with :math:`g_k = \partial_\theta \sum_b \mathrm{seed}[k,b]^\top h_b`.

    One ordinary ``torch.autograd.grad`` of the probe's output per seed ``k`` (``seeds``: ``(K, B, C)``), straight
    to the parameters: no hooks, no per-sample gradients, no per-layer rule, so any module autograd differentiates
    works.  ``counts`` (default: every parameter of the probe with ``N = K``) gives each parameter its ``N_i <= K``.
    Unused parameters get zeros.  The forward ran in the probe's eval mode: on CUDA, cuDNN's RNN backward refuses
    eval mode (a PyTorch restriction, not checked here on a GPU); CPU RNNs are fine.
    """
    params = probe.params
    if counts is None:
        counts = {n: seeds.shape[0] for n in params}
    out = {n: torch.zeros_like(params[n], memory_format=torch.contiguous_format) for n in counts}
    if probe.h.requires_grad:
        for k in range(max(counts.values(), default=0)):
            names = [n for n, c in counts.items() if c > k]
            grads = torch.autograd.grad(
                probe.h, [params[n] for n in names], seeds[k].detach().to(probe.h.dtype),
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
            for n, g in zip(names, grads):
                if g is not None:
                    out[n].addcmul_(g, g)
    return {n: out[n].div_(c) if c > 1 else out[n] for n, c in counts.items()}


def hutchinson_batch_from_probe(probe: Probe, n_samples: int, generator) -> dict[str, Tensor]:
    r"""``(1/N) sum_k (d_i sum_m (S_m xi_mk)^T h_m)^2``: unbiased for ``sum_m I_ii(theta|x_m)`` (spec §13)."""
    return batch_squares(probe, hutchinson_seeds(probe, n_samples, generator))


def gnb_from_probe(probe: Probe, n_samples: int, generator) -> dict[str, Tensor]:
    r"""``(1/N) sum_k (sum_m d_i log p(y_mk|x_m))^2`` (Sophia's Gauss-Newton-Bartlett, Liu et al. 2023): unbiased
    for ``sum_m I_ii(theta|x_m)`` (the cross terms have zero mean); its variance exceeds Î₁'s and
    is unbounded where Î₁'s is (:func:`~fisher_optim.fisher_variance`)."""
    _, seeds = sampled_seeds(probe, n_samples, generator)
    return batch_squares(probe, seeds)


def empirical_from_probe(probe: Probe, targets) -> dict[str, Tensor]:
    """``sum_m (d_i log p(y~_m|x_m))^2`` with observed targets ``y~``."""
    h = probe.h.detach()
    y = probe.lik.check_targets(h, targets)
    if probe.lik.name == "categorical" and y.dim() != 1 or probe.lik.name != "categorical" and y.dim() != 2:
        raise ValueError("empirical: give one target per input")
    seeds = probe.lik.grad(h, y).unsqueeze(0)
    return reduce_records(probe.seeded(seeds), sum_of_squares(), 2, probe.params)


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
            ``nn.Linear``/``nn.Conv2d`` take fast per-layer rules; every other module with parameters
            takes an exact ``torch.func`` route.
        inputs: the model's inputs for ``M`` examples: a Tensor ``(M, ...)`` (``model(x)``), a tuple
            (``model(*inputs)``) or a dict (``model(**inputs)``).  Tensors whose leading dimension is ``M`` (that of
            the first tensor) are sliced together; other arguments are passed whole to every call.
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``, ``"poisson"`` or a
            :class:`~fisher_optim.likelihoods.Likelihood`.
        estimator: ``"exact"``, ``"mc1"`` (Î₁), ``"mc2"`` (Î₂), ``"empirical"`` (needs ``targets``),
            ``"hutchinson"``, ``"hutchinson_batch"`` or ``"gnb"`` (see the module docstring and below).
        n_samples: labels drawn from the model per input (``mc1``, ``mc2``, ``gnb``), or Rademacher probes
            per input (``hutchinson``, ``hutchinson_batch``); the estimate averages over them (``1/N``).
        targets: observed targets for ``"empirical"`` (class indices for categorical, else the output's
            shape).
        generator: ``torch.Generator`` for the label draws (one ``likelihood.sample(h, n_samples)`` call) or
            the Rademacher signs (one ``torch.randint`` call of shape ``(N, M, C)``).
        reduction: ``"mean"`` (default) over the ``M`` inputs or ``"sum"``.
        output: picks the natural parameters out of the model's output: ``None`` (the output itself, the first
            element of a tuple/list, or the ``"logits"`` entry/attribute of a dict or output object), a key, an
            index or a callable.

    Returns:
        ``{name: tensor}`` keyed like ``model.named_parameters()`` (parameters that require grad), each
        of the parameter's shape: :math:`\frac1M \sum_m \hat I_{ii}(\theta \mid x_m)`.

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
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator)
    n_samples = check_n_samples(n_samples)
    check_reduction(reduction)
    if estimator == "empirical" and targets is None:
        raise ValueError("estimator 'empirical' needs targets (the observed labels)")
    if estimator != "empirical" and targets is not None:
        raise ValueError(f"targets are only used by estimator 'empirical', not {estimator!r}")
    if estimator == "mc2":
        hessian_plan(model, trainable_parameters(model))  # unsupported modules fail before any work
    with Probe(model, inputs, lik, output=output) as probe:
        if estimator == "exact":
            out = exact_from_probe(probe)
        elif estimator == "mc1":
            out = mc1_from_probe(probe, n_samples, generator)
        elif estimator == "mc2":
            out = mc2_from_probe(probe, n_samples, generator)
        elif estimator == "hutchinson":
            out = hutchinson_from_probe(probe, n_samples, generator)
        elif estimator == "hutchinson_batch":
            out = hutchinson_batch_from_probe(probe, n_samples, generator)
        elif estimator == "gnb":
            out = gnb_from_probe(probe, n_samples, generator)
        else:
            out = empirical_from_probe(probe, targets)
        m = probe.h.shape[0]
        depends = [n for n in probe.params if n not in probe.unused]
    if reduction == "mean":
        out = {n: v / m for n, v in out.items()}
    if depends and estimator != "mc2" and all(not bool(out[n].any()) for n in depends):
        warnings.warn(
            f"diagonal_fisher: the {estimator} Fisher is exactly zero for every parameter the output depends on "
            f"({len(depends)} tensors): is likelihood={lik.name!r} the model's output distribution?",
            RuntimeWarning,
            stacklevel=2,
        )
    return {n: v.detach() for n, v in out.items()}
