r"""Closed-form variances of the diagonal Fisher estimators (docs/fisher-math.md §2.3, §3, §5, §7.5).

For fixed inputs :math:`x_1..x_M` and ``N`` labels drawn per input, the estimators of
:func:`~fisher_optim.diagonal_fisher` (mean over inputs) have, per parameter ``i``, the variance over the
label draws

.. math::  \mathrm{Var}\,\hat F_i = \frac{1}{M^2} \sum_m V(\theta_i \mid x_m),
           \qquad V = \tilde v / N,

with the single-sample conditional variances (docs/fisher-math.md §3.2)

.. math::  \tilde v_1(\theta_i|x) = \mathcal M(v_i, v_i, v_i, v_i) = \kappa(v_i^4) + 2 F_i(x)^2,
           \qquad \tilde v_2(\theta_i|x) = u_i^\top I(h) u_i = \sum_k (S_{:,k}^\top u_i)^2,

where :math:`v_i = \partial_i h`, :math:`u_i = \partial^2_{ii} h`.  ``exact`` and ``empirical`` draw
nothing: variance 0.  Linear layers use the factorised forms (docs/fisher-math.md §7.1): one backward with the ``C``
unit
seeds gives :math:`F` and :math:`\tilde v_1` for every parameter by two matmuls.

The Hutchinson estimators (docs/fisher-math.md §13) are Rademacher sums over the columns of :math:`A = J^\top S`
(:math:`S S^\top = I(h)`, :math:`F_i = \sum_a A_{ia}^2`), and :math:`\mathrm{Var}((c^\top\xi)^2) =
2((\sum c^2)^2 - \sum c^4)` for Rademacher :math:`\xi`:

.. math::  \tilde v_{\rm hutchinson}(\theta_i|x) = 2\big(F_i(x)^2 - \textstyle\sum_a A_{ia}^4\big) \le 2F_i(x)^2,
           \qquad
           \mathrm{Var}\,\hat F^{\rm batch}_i = \frac{2}{N M^2}\Big(\big(\textstyle\sum_{m,a} A_{m,ia}^2\big)^2
           - \textstyle\sum_{m,a} A_{m,ia}^4\Big).

Sophia's ``gnb`` squares the batch sum of independent zero-mean scores :math:`s_m` (``E s_m^2 = F_m``,
``Var s_m^2 = \tilde v_1``); expanding the fourth moment of the sum (cross terms ``3 F_m F_n``):

.. math::  \mathrm{Var}\,\hat F^{\rm gnb}_i = \frac{1}{N M^2}\Big(\sum_m \tilde v_1(\theta_i|x_m)
           + 2\big(\textstyle\sum_m F_i(x_m)\big)^2 - 2\textstyle\sum_m F_i(x_m)^2\Big).

The first is the per-input variance times ``1/(N M^2)`` summed over inputs; the batch ones are one projection of
the whole batch, so their relative standard deviation (at most :math:`\sqrt{2/N}` for ``hutchinson_batch``) does
not shrink with ``M``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import check_estimator, check_n_samples, check_reduction
from .batch import OutputSpec
from .engine import Probe
from .hessian import plan as hessian_plan
from .hessian import residual_records
from .layers import LinearRecord, linear_reduce
from .likelihoods import Likelihood, get_likelihood
from .seeds import check_targets_use, target_mask

__all__ = [
    "OnlineVariance",
    "fisher_variance",
    "fisher_moments",
    "FisherMoments",
    "layer_summary",
    "joint_variance",
    "factor_moments",
]


def unit_seeds(h: Tensor) -> Tensor:
    """``C`` unit seeds ``e_c`` per input: ``(C, B, C)``; the records then hold the Jacobian rows ``v_c``."""
    b, c = h.shape
    return torch.eye(c, dtype=h.dtype, device=h.device).unsqueeze(1).expand(c, b, c)


@dataclass
class FisherMoments:
    r"""Per-parameter moments at fixed inputs (all summed over inputs, *not* divided by ``M``).

    * ``fisher``: :math:`\sum_m F_i(x_m)`;
    * ``fisher_sq``: :math:`\sum_m F_i(x_m)^2` (input randomness, docs/fisher-math.md §2.3b);
    * ``v1``: :math:`\sum_m \tilde v_1(\theta_i|x_m)` (single-sample Î₁ variance);
    * ``v2``: :math:`\sum_m \tilde v_2(\theta_i|x_m)` (single-sample Î₂ variance), or ``None`` when not
      computed (``with_v2=False`` or an HVP-route model where it is too costly);
    * ``m``: number of inputs.
    """

    fisher: dict[str, Tensor]
    fisher_sq: dict[str, Tensor] | None
    v1: dict[str, Tensor]
    v2: dict[str, Tensor] | None
    m: int


def _split_output_layer(probe: Probe, wanted: set[str] | None) -> tuple[dict[str, str], list[str]]:
    """``({"weight"/"bias": name}, the other wanted parameters)``: the output ``nn.Linear``'s parameters, whose
    statistics have a closed form in its input (no seeds through them), apart from the rest."""
    out_keys: dict[str, str] = {}
    if probe.output_index is not None:
        out_keys = dict(zip(("weight", "bias"), probe.module_params(probe.output_index)))
        out_keys = {k: n for k, n in out_keys.items() if wanted is None or n in wanted}
    rest = [n for n in probe.params if (wanted is None or n in wanted) and n not in out_keys.values()]
    return out_keys, rest


def moments_from_probe(
    probe: Probe,
    with_v1: bool = True,
    with_v2: bool = True,
    with_fisher_sq: bool = False,
    names=None,
    with_fisher: bool = True,
    mask: Tensor | None = None,
) -> FisherMoments:
    r"""Compute :class:`FisherMoments` from an open :class:`~fisher_optim.engine.Probe` (skipped parts: ``None``).

    One backward with the ``C`` unit seeds gives the Jacobian rows :math:`v_c` of every layer; per input
    and output unit the likelihood's contractions give :math:`F = v^	op I v` and :math:`	ilde v_1`
    together (:meth:`~fisher_optim.likelihoods.Likelihood.quad_and_moment4`), and the Hessian residual
    route gives :math:`u_c` for the same unit seeds (reusing the backward's output gradients), so
    :math:`	ilde v_2 = u^	op I u`.  ``mask`` (``B x D``, from
    :func:`~fisher_optim.seeds.target_mask`) zeroes the unit seeds of unlabelled positions, which drops
    them from every statistic.  Per layer, every statistic is reduced in one multi-reducer pass;
    on ``nn.Linear`` layers the statistics multiplying :math:`a^4` (``fisher_sq``, ``v1``, ``v2``) share one
    matmul (docs/fisher-math.md §7.1 factorisation).
    """
    lik, h = probe.lik, probe.h.detach()
    seeds = unit_seeds(h)
    diagonal = torch.ones_like(h)
    if mask is not None:
        seeds, diagonal = seeds * mask, mask
    wanted = None if names is None else set(names)
    # the output layer (a Linear producing h) in closed form: v = e_a, no seeds (see Probe.exact_output_layer)
    out_keys, rest = _split_output_layer(probe, wanted)
    recs = probe.seeded(seeds, names=rest, diagonal=diagonal) if rest else []
    grads = dict(probe.last_grads) if rest else {}
    if probe.output_index is not None:
        grads[probe.fast[probe.output_index][0]] = seeds  # d(e_c^T h)/dh = e_c
    keys_on = [k for k, on in (("fisher", with_fisher), ("fisher_sq", with_fisher_sq), ("v1", with_v1)) if on]
    degree = {"fisher": 2, "fisher_sq": 4, "v1": 4}
    degrees = tuple(degree[k] for k in keys_on)

    def stats(x: Tensor, idx: slice) -> tuple[Tensor, ...]:
        if with_v1:
            quad, m4 = lik.quad_and_moment4(h[idx], x)
        else:
            quad, m4 = lik.fisher_quad(h[idx], x), None
        vals = {"fisher": quad, "fisher_sq": quad * quad if with_fisher_sq else None, "v1": m4}
        return tuple(vals[k] for k in keys_on)

    def v2_stat(x: Tensor, idx: slice) -> tuple[Tensor]:
        return (lik.fisher_quad(h[idx], x),)

    out: dict[str, dict[str, Tensor]] = {k: {} for k in keys_on}
    rrecs = []
    if with_v2:
        out["v2"] = {}
        # unit seeds: rho_c = d^2 h_c / dtheta_i^2 = u_c, and v2 = u^T I(h) u; the chain route reuses the
        # unit-seeded output gradients of the backward above (no second backward)
        rrecs = residual_records(probe, seeds, per_sample=True, grads=grads)
        if wanted is not None:
            rrecs = [(r, {k: n for k, n in keys.items() if n in wanted}) for r, keys in rrecs]
    fusable = {keys.get("weight"): rec for rec, keys in rrecs if isinstance(rec, LinearRecord)}
    fused: set[int] = set()  # ids of the residual records already reduced with their layer's other statistics

    def store(which: str, vals: dict[str, Tensor], keys: dict[str, str]) -> None:
        for key, name in keys.items():
            if key in vals:
                out[which][name] = vals[key].reshape(probe.params[name].shape)

    for rec, keys in recs:
        rrec = fusable.get(keys.get("weight")) if isinstance(rec, LinearRecord) else None
        if rrec is not None and rrec.a is rec.a and rrec.has_bias == rec.has_bias and keys_on:
            terms = [(st, rec.power * d) for st, d in zip(stats(rec.q, slice(None)), degrees)]
            terms.append((v2_stat(rrec.q, slice(None))[0], rrec.power * 2))
            vals = linear_reduce(rec.a, terms, rec.has_bias)
            for k, v in zip(keys_on, vals):
                store(k, v, keys)
            store("v2", vals[-1], keys)
            fused.add(id(rrec))
            continue
        if keys_on:
            for k, v in zip(keys_on, rec.reduce_many(stats, degrees)):
                store(k, v, keys)
    for rec, keys in rrecs:
        if id(rec) in fused:
            continue
        store("v2", rec.reduce_many(v2_stat, (2,))[0], keys)
    if out_keys and keys_on:
        var = lik.unit_variance(h) if mask is None else lik.unit_variance(h) * mask
        m4 = (lik.unit_moment4(h) if mask is None else lik.unit_moment4(h) * mask) if with_v1 else None
        unit = {"fisher": (var, 2), "fisher_sq": (var * var, 4), "v1": (m4, 4)}
        vals = linear_reduce(probe.output_layer_input, [unit[k] for k in keys_on], "bias" in out_keys)
        for k, v in zip(keys_on, vals):
            store(k, v, out_keys)

    def finish(which: str) -> dict[str, Tensor] | None:
        if which not in out:
            return None
        d = out[which]
        return {
            n: d[n].detach() if n in d else torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
            for n, p in probe.params.items()
            if wanted is None or n in wanted
        }

    return FisherMoments(finish("fisher"), finish("fisher_sq"), finish("v1"), finish("v2"), h.shape[0])


def _reduce_many(probe: Probe, records, fn, degrees, names=None) -> list[dict[str, Tensor]]:
    """:func:`~fisher_optim.engine.reduce_records` for a multi-statistic reducer (one dict per degree)."""
    outs: list[dict[str, Tensor]] = [{} for _ in degrees]
    for rec, keys in records:
        for out, vals in zip(outs, rec.reduce_many(fn, degrees)):
            for key, name in keys.items():
                out[name] = vals[key].reshape(probe.params[name].shape)
    return [
        {
            n: out[n] if n in out else torch.zeros_like(p, memory_format=torch.contiguous_format)
            for n, p in probe.params.items()
            if names is None or n in names
        }
        for out in outs
    ]


def factor_moments(probe: Probe, names=None, mask: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    r"""Sums over inputs of the Hutchinson statistics of :math:`A = J^\top S` (docs/fisher-math.md §13), per parameter:

    ``fisher`` :math:`\sum_m F_i(x_m)`, ``fisher_sq`` :math:`\sum_m F_i(x_m)^2` and ``a4``
    :math:`\sum_{m,a} A_{m,ia}^4`.  One backward with the ``C`` columns of ``S`` as seeds (the exact pass's
    seeds; for factorised likelihoods :math:`S = \mathrm{diag}(\sqrt{I_{cc}})`), one degree-4 reduction; an
    ``nn.Linear`` output layer takes no seeds (its statistics in closed form from its input, as in
    :func:`moments_from_probe`).  ``mask``
    (``B x D``) zeroes unlabelled positions (the rows of ``S``; with positions ``S`` is block-diagonal, so their
    columns vanish too).
    """
    h = probe.h.detach()
    wanted = None if names is None else set(names)
    # the output layer (a Linear producing h) in closed form, as in moments_from_probe: its per-input gradient of
    # s^T h is s a^T, so A_(kj),c = S_kc a_j and the statistics are (sum_c S_kc^2) a_j^2, its square and
    # (sum_c S_kc^4) a_j^4 (no seeds through its reduction)
    out_keys, rest = _split_output_layer(probe, wanted)
    if probe.lik.factorized:
        scale = probe.lik.unit_variance(h).clamp_min(0).sqrt()
        seeds = unit_seeds(h) * scale.T.unsqueeze(-1)  # seed[k, b] = sqrt(I_kk(h_b)) e_k
        if mask is not None:
            seeds, scale = seeds * mask, scale * mask
        recs = probe.seeded(seeds, names=rest, diagonal=scale) if rest else []
        s2 = scale * scale
        s4 = s2 * s2
    else:
        seeds = probe.lik.fisher_factor(h).permute(2, 0, 1)
        if mask is not None:
            seeds = seeds * mask
        recs = probe.seeded(seeds, names=rest) if rest else []
        s2 = seeds.square().sum(0) if out_keys else None
        s4 = seeds.pow(4).sum(0) if out_keys else None

    def stats(x: Tensor, idx: slice) -> tuple[Tensor, Tensor, Tensor]:
        x2 = x * x
        f = x2.sum(0)
        return f, f * f, x2.square_().sum(0)

    f, f2, a4 = _reduce_many(probe, recs, stats, (2, 4, 4), wanted)
    if out_keys:
        vals = linear_reduce(probe.output_layer_input, [(s2, 2), (s2 * s2, 4), (s4, 4)], "bias" in out_keys)
        for d, v in zip((f, f2, a4), vals):
            for key, name in out_keys.items():
                d[name] = v[key].reshape(probe.params[name].shape)
    return {"fisher": f, "fisher_sq": f2, "a4": a4}


def fisher_moments(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    with_v2: bool = True,
    with_fisher_sq: bool = False,
    targets: Tensor | None = None,
) -> FisherMoments:
    r""":class:`FisherMoments` of ``model`` at ``inputs`` (one forward, ``D`` unit-seed backward passes).

    ``with_fisher_sq`` adds :math:`\sum_m F_i(x_m)^2` (the input-randomness term of :func:`joint_variance`).
    ``targets``: categorical only, a mask as in :func:`fisher_variance`.
    """
    lik = get_likelihood(likelihood)
    check_targets_use(lik, "exact", targets)
    with Probe(model, inputs, lik, output=output) as probe:
        return moments_from_probe(
            probe, with_v2=with_v2, with_fisher_sq=with_fisher_sq, mask=target_mask(probe, targets)
        )


def fisher_variance(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    estimator: str,
    n_samples: int = 1,
    reduction: str = "mean",
    targets: Tensor | None = None,
) -> dict[str, Tensor]:
    r"""Variance over label draws of :func:`~fisher_optim.diagonal_fisher` at fixed ``inputs``.

    Returns ``{name: tensor}`` with the keys and shapes of ``diagonal_fisher``:
    :math:`\frac{1}{M^2}\sum_m \tilde v(\theta_i|x_m)/N` for ``reduction="mean"`` (``\sum_m \tilde v/N``
    for ``"sum"``).  Zero for ``exact`` and ``empirical``.  ``hutchinson``: :math:`\tilde v = 2(F_i^2 -
    \sum_a A_{ia}^4)` per input; ``hutchinson_batch`` and ``gnb`` are not sums over inputs and have the batch forms of
    the module docstring (:math:`\frac{1}{N M^2}`, or :math:`\frac1N` for ``"sum"``, of the same brackets).

    **Outputs with positions** (categorical, docs/fisher-math.md §12): the labels are drawn independently at the ``T``
    positions and Î₁ squares the whole input's score, so with :math:`q_t = v_{t,i}^\top I(h_t) v_{t,i}`
    and the fourth cumulant :math:`\kappa_t` of position ``t`` along :math:`v_{t,i}`,

    .. math::  \tilde v_1(\theta_i|x) = \sum_t \kappa_t + 2\Big(\sum_t q_t\Big)^2, \qquad
               \tilde v_2(\theta_i|x) = \sum_t u_{t,i}^\top I(h_t)\, u_{t,i}.

    ``targets`` (categorical, ``(M, *positions)``) drops the positions whose target is ``ignore_index``, as
    in :func:`~fisher_optim.diagonal_fisher`.  **Cost**: it needs the per-position directions
    :math:`v_{t,i}`: one backward with ``D = T*C`` unit seeds per input (the exact pass's width), i.e. memory
    ``D x M x`` (every layer's output) at once and ``D`` times the work of a plain backward, plus, for
    ``mc2``, the Hessian residual for the same ``D`` seeds.  Affordable for small ``T*C`` (taggers with few
    classes, short windows); for a language model (``T*C`` in the thousands) track the sample variance of
    several Î₁ draws instead (docs/fisher-math.md §14).

    Example:
        >>> import torch
        >>> from fisher_optim import fisher_variance
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> V1 = fisher_variance(net, x, likelihood="categorical", estimator="mc1", n_samples=4)
        >>> V2 = fisher_variance(net, x, likelihood="categorical", estimator="mc2")
        >>> bool(V2["2.weight"].abs().max() == 0)  # Î₂ is exact on the last layer
        True
        >>> from fisher_optim import diagonal_fisher
        >>> F = diagonal_fisher(net, x, likelihood="categorical", estimator="exact")
        >>> Vh = fisher_variance(net, x, likelihood="categorical", estimator="hutchinson")
        >>> all(bool((Vh[n] <= 2 * F[n] ** 2 * 1.001).all()) for n in F)  # relative std <= sqrt(2)
        True
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator)
    n_samples = check_n_samples(n_samples)
    check_reduction(reduction)
    check_targets_use(lik, "exact", targets)
    with Probe(model, inputs, lik, output=output) as probe:
        m = probe.h.shape[0]
        mask = target_mask(probe, targets)
        if estimator in ("exact", "empirical"):
            return {n: torch.zeros_like(p, dtype=probe.h.dtype).detach() for n, p in probe.params.items()}
        scale = 1.0 / n_samples / (m * m if reduction == "mean" else 1)
        if estimator in ("hutchinson", "hutchinson_batch"):
            fm = factor_moments(probe, mask=mask)
            if estimator == "hutchinson":
                v = {n: 2 * (fm["fisher_sq"][n] - fm["a4"][n]) for n in fm["a4"]}
            else:
                v = {n: 2 * (fm["fisher"][n] ** 2 - fm["a4"][n]) for n in fm["a4"]}
            return {n: (t.clamp_min(0) * scale).detach() for n, t in v.items()}
        if estimator == "gnb":
            mom = moments_from_probe(probe, with_v1=True, with_v2=False, with_fisher_sq=True, mask=mask)
            v = {n: mom.v1[n] + 2 * (mom.fisher[n] ** 2 - mom.fisher_sq[n]) for n in mom.v1}
            return {n: (t * scale).detach() for n, t in v.items()}
        if estimator == "mc2":
            hessian_plan(model, probe.params)  # raise early for unsupported models
        mom = moments_from_probe(
            probe, with_v1=estimator == "mc1", with_v2=estimator == "mc2", with_fisher=False, mask=mask
        )
    v = mom.v1 if estimator == "mc1" else mom.v2
    return {n: (t * scale).detach() for n, t in v.items()}


def layer_summary(fisher: dict[str, Tensor], variance: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    r"""Per parameter tensor: trace and mean of ``F`` and ``V``, and the relative standard error.

    ``rse = sqrt(mean_i V_i) / mean_i F_i``: the RMS standard error of the entries relative to their mean
    Fisher (0 when ``F`` is all zero and ``V`` too; ``inf`` when only ``F`` is zero).
    """
    out = {}
    for n, f in fisher.items():
        v = variance[n]
        fm = float(f.mean()) if f.numel() else 0.0
        vm = float(v.mean()) if v.numel() else 0.0
        rse = (vm**0.5 / fm) if fm > 0 else (0.0 if vm == 0 else float("inf"))
        out[n] = {
            "trace_fisher": float(f.sum()),
            "mean_fisher": fm,
            "trace_variance": float(v.sum()),
            "mean_variance": vm,
            "rse": rse,
        }
    return out


def joint_variance(
    model: nn.Module,
    inputs,
    *,
    likelihood: str | Likelihood,
    output: OutputSpec = None,
    estimator: str,
    n_samples: int = 1,
    targets: Tensor | None = None,
) -> dict[str, dict[str, Tensor]]:
    r"""Variance of the joint estimator with random inputs, estimated from the batch (docs/fisher-math.md §2.3b).

    For a design with ``M`` inputs drawn i.i.d. from :math:`p(x)` and ``N`` labels each,

    .. math::  \mathrm{Var} = \frac1M\Big[\underbrace{\mathrm{Var}_x F_i(x)}_{\text{input}}
               + \frac1N \underbrace{E_x \tilde v(\theta_i|x)}_{\text{output}}\Big],

    (``hutchinson``: :math:`\tilde v = 2(F_i^2 - \sum_a A_{ia}^4)`; the batch estimators are not sums over inputs
    and have no such split), with :math:`p(x)` replaced by the empirical distribution of ``inputs`` (``Var_x`` is
    the population variance over the batch, so the identity is exact for a uniform ``p(x)`` over these inputs).
    Returns ``{"input": ..., "output": ..., "total": ...}`` (each a per-parameter dict).  ``targets``
    (categorical): a mask as in :func:`fisher_variance`.
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator, ("mc1", "mc2", "hutchinson"))
    n_samples = check_n_samples(n_samples)
    check_targets_use(lik, "exact", targets)
    with Probe(model, inputs, lik, output=output) as probe:
        m = probe.h.shape[0]
        mask = target_mask(probe, targets)
        if estimator == "hutchinson":
            fm = factor_moments(probe, mask=mask)
            fisher, fisher_sq = fm["fisher"], fm["fisher_sq"]
            v = {n: 2 * (fisher_sq[n] - fm["a4"][n]).clamp_min(0) for n in fisher}
        else:
            mom = moments_from_probe(
                probe, with_v1=estimator == "mc1", with_v2=estimator == "mc2", with_fisher_sq=True, mask=mask
            )
            fisher, fisher_sq = mom.fisher, mom.fisher_sq
            v = mom.v1 if estimator == "mc1" else mom.v2
    inp = {n: (fisher_sq[n] / m - (fisher[n] / m) ** 2) / m for n in fisher}
    out = {n: v[n] / m / n_samples / m for n in fisher}
    return {"input": inp, "output": out, "total": {n: inp[n] + out[n] for n in inp}}


class OnlineVariance:
    r"""Per-entry sample variance of an estimator's own draws (docs/fisher-math.md §14), tracked across probes and
    refreshes.

    :meth:`update` takes, per parameter, a stack of ``K`` independent single-probe estimates (``K x shape``, e.g.
    Hutchinson with one probe per row) of the same quantity; :meth:`variance` is the pooled unbiased sample variance
    of one draw, :math:`\sum_r \sum_k (x_{rk} - \bar x_r)^2 / \sum_r (K_r - 1)` over the updates ``r`` (each
    update's own mean, so a drifting Fisher between refreshes does not inflate it).  Where the closed form is too
    costly (many output positions x classes) this replaces it in the selection (``source="online"``).
    """

    def __init__(self):
        self.ss: dict[str, Tensor] = {}
        self.dof = 0

    def update(self, draws: dict[str, Tensor]) -> None:
        k = None
        for n, d in draws.items():
            if d.shape[0] < 2:
                raise ValueError("OnlineVariance.update needs at least two draws per update")
            k = d.shape[0]
            dev = (d - d.mean(0, keepdim=True)).square().sum(0)
            self.ss[n] = self.ss[n] + dev if n in self.ss else dev
        if k is not None:
            self.dof += k - 1

    def variance(self) -> dict[str, Tensor]:
        if self.dof == 0:
            raise ValueError("OnlineVariance has no draws yet")
        return {n: v / self.dof for n, v in self.ss.items()}
