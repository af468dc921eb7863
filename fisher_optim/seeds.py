r"""What each estimator backpropagates and how its records are reduced (docs/fisher-math.md §2, §12, §13).

Every estimator is seeded backward passes of the probe's output (:meth:`~fisher_optim.engine.Probe.seeded`,
seeds ``(K, B, D)``) and a reduction over the seeds; each function here returns, or builds, *sums over inputs*:

* ``exact``: the columns of ``S`` with ``S S^T = I(h)`` (per position), reduced by ``sum_k x_k^2``
  (:func:`exact_record_chunks`, :func:`exact_reducer`, :func:`exact_sum`);
* ``mc1`` (Î₁): the scores ``eta - t(y)`` of ``N`` drawn labels (:func:`sampled_seeds`), reduced per input by
  ``(1/N) sum_k x_k^2`` (:func:`per_input_squares`);
* ``mc2`` (Î₂): the exact pass plus the Hessian residual seeded by the mean of those scores, summed
  (:func:`identity_sum`);
* ``hutchinson``: ``S xi`` with Rademacher ``xi`` (:func:`hutchinson_seeds`), reduced like Î₁;
* ``hutchinson_batch`` and ``gnb``: the same seeds as ``hutchinson`` and Î₁, one ordinary backward of the whole
  batch per seed, squared (:func:`batch_squares`);
* ``empirical``: the scores of the observed targets (:func:`empirical_seeds`), squared per input.

:func:`~fisher_optim.estimators.plan_from_probe` combines them, each parameter with its own estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine import Probe, reduce_records
from .likelihoods import Categorical, Likelihood

__all__ = [
    "EXACT_SEED_ELEMENTS",
    "batch_squares",
    "check_targets_use",
    "empirical_seeds",
    "exact_record_chunks",
    "exact_records",
    "exact_reducer",
    "exact_sum",
    "hutchinson_seeds",
    "identity_sum",
    "per_input_squares",
    "rademacher",
    "sampled_seeds",
    "square_sum",
    "sum_of_squares",
    "target_mask",
]


# -- reductions over seeds -------------------------------------------------------------------------------------
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


def identity_sum(x: Tensor, idx: slice) -> Tensor:
    return x.sum(0)


def per_input_squares(probe: Probe, recs, counts: dict[str, int]) -> dict[str, Tensor]:
    """``sum_m (1/N_i) sum_{k < N_i} x_k^2`` per parameter from records of ``max N_i`` seeds (``counts``)."""
    out: dict[str, Tensor] = {}
    for n in sorted(set(counts.values())):
        names = {k for k, v in counts.items() if v == n}

        def fn(x, idx, n=n):
            out = square_sum(x, n)
            return out.div_(n) if n != 1 else out

        out.update(reduce_records(recs, fn, 2, probe.params, names))
    return out


# -- the exact pass --------------------------------------------------------------------------------------------
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
    wanted = None if names is None else set(names)
    names = list(probe.params) if wanted is None else [n for n in probe.params if n in wanted]
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


# -- sampled seeds: labels and Rademacher probes ---------------------------------------------------------------
def sampled_seeds(probe: Probe, n_samples: int, generator, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``N`` labels per input (at every position); return ``(labels (N, B, ...), score seeds eta - t(y)
    (N, B, D))``, the seeds zeroed where ``mask`` is 0: one seed per draw is the whole input's score."""
    h = probe.h.detach()
    y = probe.lik.sample(h, n_samples, generator=generator)
    seeds = probe.lik.grad(h, y)
    return y, seeds if mask is None else seeds * mask


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


# -- observed targets ------------------------------------------------------------------------------------------
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


def check_targets_use(lik: Likelihood, estimator: str, targets) -> None:
    """``targets`` are labels for ``empirical``, and a mask (categorical only) for the other estimators."""
    if estimator == "empirical" and targets is None:
        raise ValueError("estimator 'empirical' needs targets (the observed labels)")
    if estimator != "empirical" and targets is not None and not isinstance(lik, Categorical):
        raise ValueError(
            f"targets are only used by estimator 'empirical', not {estimator!r}, for likelihood {lik.name!r} "
            "(as a mask of unlabelled positions they need 'categorical')"
        )
