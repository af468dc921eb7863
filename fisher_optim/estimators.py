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

__all__ = [
    "diagonal_fisher",
    "ESTIMATORS",
    "check_estimator",
    "check_n_samples",
    "sum_of_squares",
]

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


#: upper bound on the seed elements (seeds x inputs x output width) of one exact backward over positions
EXACT_SEED_ELEMENTS = 2**24


def target_mask(probe: Probe, targets) -> Tensor | None:
    """``(B, D)`` seed mask from ``targets`` (0 at positions whose target is ``ignore_index``), or ``None``."""
    return None if targets is None else probe.lik.target_mask(probe.h.detach(), targets)


def exact_record_chunks(probe: Probe, names, mask: Tensor | None = None):
    r"""Record lists whose reductions by :func:`exact_reducer`, summed, give ``sum_m I_ii(theta|x_m)``.

    Categorical: the columns of ``S`` (``S S^T = I(h)``) as seeds, reduced by ``sum_k x_k^2``.  With ``T``
    positions ``S`` is block-diagonal (docs/fisher-math.md §12): the ``T*C`` seeds ``S_t e_c`` (nonzero at position
    ``t``
    only) go in chunks of positions, at most :data:`EXACT_SEED_ELEMENTS` seed entries each; positions that
    ``mask`` leaves unlabelled in every input take no seeds.
    Factorised likelihoods (``I(h)`` diagonal): the ``C`` unit seeds ``e_c`` (a stride-0 view, nothing
    materialised; the output layer's backward is a row scaling, see
    :meth:`~fisher_optim.engine.Probe.output_grads`), reduced by ``sum_c I_cc x_c^2`` = ``fisher_quad``.
    ``mask`` (``B x D``, see :func:`target_mask`) zeroes the seeds of unlabelled positions.
    """
    h = probe.h.detach()
    b, d = h.shape
    lik = probe.lik
    if lik.factorized:
        seeds = torch.eye(d, dtype=h.dtype, device=h.device).unsqueeze(1).expand(d, b, d)
        diagonal = torch.ones_like(h) if mask is None else mask
        yield probe.seeded(seeds if mask is None else seeds * mask, names=names, diagonal=diagonal)
        return
    if not isinstance(lik, Categorical) or lik.n_positions(h) == 1:
        seeds = lik.fisher_factor(h).permute(2, 0, 1)
        yield probe.seeded(seeds if mask is None else seeds * mask, names=names)
        return
    factor = lik.position_factor(h)  # (B, T, C, C): column k of S_t in factor[:, t, :, k]
    t, c = factor.shape[1], factor.shape[2]
    active = torch.arange(t, device=h.device)
    if mask is not None:  # positions unlabelled in every input (padding) need no seeds
        active = active[mask.reshape(b, t, c)[..., 0].amax(0) > 0]
    step = max(1, EXACT_SEED_ELEMENTS // (c * b * d))
    for start in range(0, active.numel(), step):
        pos = active[start : start + step]
        seeds = h.new_zeros(pos.numel(), c, b, t, c)
        j = torch.arange(pos.numel(), device=h.device)
        seeds[j, :, :, pos, :] = factor[:, pos].permute(1, 3, 0, 2)  # (n, K, B, C)
        seeds = seeds.reshape(pos.numel() * c, b, d)
        yield probe.seeded(seeds if mask is None else seeds * mask, names=names)


def exact_records(probe: Probe, names, mask: Tensor | None = None) -> list:
    """All of :func:`exact_record_chunks` as one record list (one backward for every seed)."""
    return [r for chunk in exact_record_chunks(probe, names, mask) for r in chunk]


def exact_reducer(probe: Probe):
    """The per-input reducer that goes with :func:`exact_records` (degree 2)."""
    if probe.lik.factorized:
        h = probe.h.detach()
        return lambda x, idx: probe.lik.fisher_quad(h[idx], x)
    return sum_of_squares()


def exact_sum(probe: Probe, names=None, mask: Tensor | None = None) -> dict[str, Tensor]:
    """``sum_m I_ii(theta|x_m)`` for ``names`` (default all): the output layer in closed form when nothing is
    masked, the others by :func:`exact_record_chunks` (summed over chunks)."""
    names = list(probe.params) if names is None else [n for n in probe.params if n in set(names)]
    out, done = probe.exact_output_layer(names) if mask is None else ({}, set())  # the output layer needs no seeds
    rest = [n for n in names if n not in done]
    if rest:
        fn = exact_reducer(probe)
        for recs in exact_record_chunks(probe, rest, mask):
            part = reduce_records(recs, fn, 2, probe.params, rest)
            for n, v in part.items():
                out[n] = out[n] + v if n in out else v
    zero = torch.contiguous_format
    return {n: out[n] if n in out else torch.zeros_like(probe.params[n], memory_format=zero) for n in names}


def exact_from_probe(probe: Probe, mask: Tensor | None = None) -> dict[str, Tensor]:
    """``sum_m I_ii(theta|x_m)`` for every parameter of the probe (see :func:`exact_sum`)."""
    return exact_sum(probe, None, mask)


def sampled_seeds(probe: Probe, n_samples: int, generator, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``N`` labels per input (at every position); return ``(labels (N, B, ...), score seeds eta - t(y)
    (N, B, D))``, the seeds zeroed where ``mask`` is 0: one seed per draw is the whole input's score."""
    h = probe.h.detach()
    y = probe.lik.sample(h, n_samples, generator=generator)
    seeds = probe.lik.grad(h, y)
    return y, seeds if mask is None else seeds * mask


def mc1_from_probe(probe: Probe, n_samples: int, generator, mask: Tensor | None = None) -> dict[str, Tensor]:
    """``sum_m (1/N) sum_k (d_i log p(y_mk|x_m))^2``."""
    _, seeds = sampled_seeds(probe, n_samples, generator, mask)
    return reduce_records(probe.seeded(seeds), sum_of_squares(1.0 / n_samples), 2, probe.params)


def mc2_from_probe(
    probe: Probe, n_samples: int, generator, exact: dict[str, Tensor] | None = None, mask: Tensor | None = None
):
    """``sum_m [I_ii(theta|x_m) + rho_i(eta_m - tbar_m)]`` (the Hessian of the sampled-label NLL)."""
    if exact is None:
        exact = exact_from_probe(probe, mask)
    _, seeds = sampled_seeds(probe, n_samples, generator, mask)
    recs = residual_records(probe, seeds.mean(0, keepdim=True), per_sample=False)
    res = reduce_records(recs, _identity_sum, 1, probe.params)
    return {n: exact[n] + res[n] for n in exact}


def rademacher(shape, generator, dtype, device) -> Tensor:
    """Independent signs ``+-1`` of ``shape`` (one ``torch.randint`` call with ``generator``)."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)


def hutchinson_seeds(probe: Probe, n_samples: int, generator, mask: Tensor | None = None) -> Tensor:
    r"""``N`` Hutchinson seeds per input, :math:`S_b \xi_{k,b}` (``(N, B, D)``), with :math:`S_b S_b^\top = I(h_b)`
    and :math:`\xi_{k,b}` Rademacher, independent over probes ``k``, inputs ``b`` and the columns of ``S``.

    Factorised likelihoods use :math:`S = \mathrm{diag}(\sqrt{I_{cc}})` (no ``C x C`` matrix is built);
    categorical outputs with ``T`` positions the block-diagonal factor, one ``S_t`` per position (BackPACK's factor,
    ``T x C`` signs per probe).  ``mask`` (``B x D``) zeroes the seeds of unlabelled positions.
    """
    h = probe.h.detach()
    lik = probe.lik
    if lik.factorized:
        scale = lik.unit_variance(h).clamp_min(0).sqrt()
        seeds = rademacher((n_samples, *h.shape), generator, h.dtype, h.device).mul_(scale)
    elif isinstance(lik, Categorical):
        S = lik.position_factor(h)  # (B, T, C, C)
        xi = rademacher((n_samples, *S.shape[:3]), generator, h.dtype, h.device)
        seeds = torch.einsum("btck,nbtk->nbtc", S, xi).reshape(n_samples, *h.shape)
    else:
        S = lik.fisher_factor(h)  # (B, C, K)
        xi = rademacher((n_samples, h.shape[0], S.shape[-1]), generator, h.dtype, h.device)
        seeds = torch.einsum("bck,nbk->nbc", S, xi)
    return seeds if mask is None else seeds * mask


def hutchinson_from_probe(probe: Probe, n_samples: int, generator, mask: Tensor | None = None) -> dict[str, Tensor]:
    r"""``sum_m (1/N) sum_k (d_i (S_m xi_mk)^T h_m)^2`` (per-input squares, like :func:`mc1_from_probe`)."""
    seeds = hutchinson_seeds(probe, n_samples, generator, mask)
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


def hutchinson_batch_from_probe(probe: Probe, n_samples: int, generator, mask=None) -> dict[str, Tensor]:
    r"""``(1/N) sum_k (d_i sum_m (S_m xi_mk)^T h_m)^2``: unbiased for ``sum_m I_ii(theta|x_m)`` (docs/fisher-math.md
    §13)."""
    return batch_squares(probe, hutchinson_seeds(probe, n_samples, generator, mask))


def gnb_from_probe(probe: Probe, n_samples: int, generator, mask=None) -> dict[str, Tensor]:
    r"""``(1/N) sum_k (sum_m d_i log p(y_mk|x_m))^2`` (Sophia's Gauss-Newton-Bartlett, Liu et al. 2023): unbiased
    for ``sum_m I_ii(theta|x_m)`` (the cross terms have zero mean); its variance exceeds Î₁'s and
    is unbounded where Î₁'s is (:func:`~fisher_optim.fisher_variance`)."""
    _, seeds = sampled_seeds(probe, n_samples, generator, mask)
    return batch_squares(probe, seeds)


def empirical_seeds(probe: Probe, targets) -> Tensor:
    """The observed-label score seeds ``eta - t(y~)`` (``1 x B x D``; zero at ``ignore_index`` positions)."""
    h = probe.h.detach()
    lik = probe.lik
    y = lik.check_targets(h, targets)
    if isinstance(lik, Categorical):
        single = y.dim() == (1 if lik.position_shape(h) is None else 2)
    else:
        single = y.dim() == 2
    if not single:
        raise ValueError("empirical: give one target per input")
    return lik.grad(h, y).unsqueeze(0)


def empirical_from_probe(probe: Probe, targets) -> dict[str, Tensor]:
    """``sum_m (d_i log p(y~_m|x_m))^2`` with observed targets ``y~``."""
    return reduce_records(probe.seeded(empirical_seeds(probe, targets)), sum_of_squares(), 2, probe.params)


def check_targets_use(lik: Likelihood, estimator: str, targets) -> None:
    """``targets`` are labels for ``empirical``, and a mask (categorical only) for the other estimators."""
    if estimator == "empirical" and targets is None:
        raise ValueError("estimator 'empirical' needs targets (the observed labels)")
    if estimator != "empirical" and targets is not None and not isinstance(lik, Categorical):
        raise ValueError(
            f"targets are only used by estimator 'empirical', not {estimator!r}, for likelihood {lik.name!r} "
            "(as a mask of unlabelled positions they need 'categorical')"
        )


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
    if estimator == "mc2":
        hessian_plan(model, trainable_parameters(model))  # unsupported modules fail before any work
    with Probe(model, inputs, lik, output=output) as probe:
        mask = None if estimator == "empirical" else target_mask(probe, targets)
        if estimator == "exact":
            out = exact_from_probe(probe, mask)
        elif estimator == "mc1":
            out = mc1_from_probe(probe, n_samples, generator, mask)
        elif estimator == "mc2":
            out = mc2_from_probe(probe, n_samples, generator, mask=mask)
        elif estimator == "hutchinson":
            out = hutchinson_from_probe(probe, n_samples, generator, mask)
        elif estimator == "hutchinson_batch":
            out = hutchinson_batch_from_probe(probe, n_samples, generator, mask)
        elif estimator == "gnb":
            out = gnb_from_probe(probe, n_samples, generator, mask)
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
