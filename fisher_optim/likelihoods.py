r"""Exponential-family output likelihoods (docs/fisher-math.md §1, §5).

A network output row ``h`` (one row per input) holds the natural parameters of
:math:`p(y \mid h) = \exp(t(y)^\top h - F(h))`.  Every likelihood here provides

* ``sample(h, n, generator)``: ``n`` labels per input, shape ``(n, B, ...)``;
* ``nll(h, y)``: per-input negative log-likelihood, summed over output units, shape ``(B,)``;
* ``mean(h)``: :math:`\eta(h) = \nabla F(h)`;
* ``grad(h, y)``: :math:`\partial(-\log p)/\partial h = \eta(h) - t(y)` (the per-input score seed);
* ``fisher(h)`` and ``fisher_factor(h)``: :math:`I(h)` (``B x C x C``) and ``S`` with :math:`S S^\top = I(h)`;
* ``fisher_quad(h, v)``: :math:`v^\top I(h) v` for directions ``v`` stacked on axis 0 (``C x B x ...``);
* ``moment4(h, v)``: :math:`\mathcal M(v,v,v,v) = \mathrm{Var}\big((v^\top(t-\eta))^2\big)
  = \kappa(v^4) + 2 (v^\top I v)^2`, the single-sample variance of :math:`\hat I_1` along ``v`` (docs/fisher-math.md
  §3.2).

Outputs are flattened to ``(B, D)``: ``categorical`` takes ``(B, C)`` (one row of ``C`` logits per input)
or outputs with positions, ``(B, ..., C)`` or, with ``class_dim=1``, ``(B, C, ...)``, flattened to
``D = T*C`` with one softmax per position (docs/fisher-math.md §12, :class:`Categorical`); the factorised families
(``bernoulli``, ``gaussian``, ``poisson``) treat every output entry of an input as one independent unit, so
an output of shape ``(B, 1, 28, 28)`` is ``D = 784`` units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "Likelihood",
    "Categorical",
    "Bernoulli",
    "Gaussian",
    "Poisson",
    "get_likelihood",
    "LIKELIHOODS",
]


def _wsum(w: Tensor, x: Tensor) -> Tensor:
    r""":math:`\sum_c w[c, b]\, x[c, b, \ldots]` for ``w`` (``C x B``) and ``x`` (``C x B x ...``) -> ``B x ...``.

    One batched ``(1 x C) @ (C x rest)`` product per input: a broadcast multiply of ``w`` against the trailing
    dimensions (stride 0 innermost) followed by ``sum(0)`` is several times slower on CPU.
    """
    c, b = x.shape[:2]
    rest = x.shape[2:]
    xf = x.reshape(c, b, -1).transpose(0, 1)  # (B, C, n): a view when x is contiguous
    out = torch.bmm(w.T.to(x.dtype).unsqueeze(1), xf)  # (B, 1, n)
    return out.reshape(b, *rest)


class Likelihood:
    """Base class. Subclasses define the family; see the module docstring for the contract."""

    name: str = "likelihood"
    #: output units are independent (``I(h)`` diagonal)
    factorized: bool = True

    def flatten(self, h: Tensor) -> Tensor:
        """Network output -> ``(B, C)`` natural parameters."""
        if h.dim() < 1:
            raise ValueError(f"{self.name}: model output must have a batch dimension, got shape {tuple(h.shape)}")
        return h.reshape(h.shape[0], -1)

    # -- per-family pieces ----------------------------------------------------------------------
    def check_targets(self, h: Tensor, y: Tensor) -> Tensor:
        """Validate targets for output ``h`` (``B x C``); return them as ``(..., B, C)`` floats or indices."""
        raise NotImplementedError

    def target_mask(self, h: Tensor, y: Tensor) -> Tensor | None:
        """``(B, C)`` seed mask from targets (0 where a unit has no label), ``None`` when nothing is masked.

        Only :class:`Categorical` has unlabelled positions (``ignore_index``); the factorised families use
        targets as labels only.
        """
        raise ValueError(f"{self.name}: targets are only used by estimator 'empirical' (masks need 'categorical')")

    def sample(self, h: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def mean(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def sufficient(self, y: Tensor, h: Tensor) -> Tensor:
        """:math:`t(y)` scaled so that ``grad = mean - sufficient`` (``(..., B, C)``)."""
        return y.to(h.dtype)

    def nll(self, h: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def unit_variance(self, h: Tensor) -> Tensor:
        """Diagonal of ``I(h)`` (``B x C``); for factorised families this is all of ``I(h)``."""
        raise NotImplementedError

    def unit_kappa4(self, h: Tensor) -> Tensor:
        """Fourth cumulant :math:`F''''(h_a)` per unit for factorised families (``B x C``)."""
        raise NotImplementedError

    def unit_moment4(self, h: Tensor) -> Tensor:
        r""":math:`\mathcal M(e_a, e_a, e_a, e_a)` per unit ``a`` (``B x C``): ``moment4`` along the unit directions,
        i.e. ``Var((t_a - eta_a)^2)`` (the output layer's single-sample Î₁ variance per ``a_k^4``)."""
        var = self.unit_variance(h)
        return self.unit_kappa4(h) + 2 * var * var

    # -- generic derived quantities ---------------------------------------------------------------
    def grad(self, h: Tensor, y: Tensor) -> Tensor:
        r""":math:`\partial(-\log p(y|h))/\partial h` for targets ``y`` of shape ``(..., B, ...)``."""
        return self.mean(h) - self.sufficient(y, h)

    def fisher(self, h: Tensor) -> Tensor:
        """:math:`I(h)`, ``B x C x C``."""
        return torch.diag_embed(self.unit_variance(h))

    def fisher_factor(self, h: Tensor) -> Tensor:
        """``S`` (``B x C x K``) with ``S S^T = I(h)``; its ``K`` columns are the exact-Fisher seeds."""
        return torch.diag_embed(self.unit_variance(h).clamp_min(0).sqrt())

    def fisher_quad(self, h: Tensor, v: Tensor) -> Tensor:
        r""":math:`v^\top I(h) v` per input for directions ``v`` (``C x B x ...``) -> ``B x ...``."""
        return _wsum(self.unit_variance(h).T, v * v)

    def moment4(self, h: Tensor, v: Tensor) -> Tensor:
        r""":math:`\kappa(v,v,v,v) + 2 (v^\top I v)^2` per input (docs/fisher-math.md §5.2) -> ``B x ...``."""
        return self.quad_and_moment4(h, v)[1]

    def quad_and_moment4(self, h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(fisher_quad(h, v), moment4(h, v))`` in one pass (shared squares): ``(B x ..., B x ...)``."""
        v2 = v * v
        quad = _wsum(self.unit_variance(h).T, v2)
        return quad, _wsum(self.unit_kappa4(h).T, v2.square_()) + 2 * quad * quad

    def lambda_max_fisher(self, h: Tensor) -> Tensor:
        """Largest eigenvalue of ``I(h)`` per input (``B``)."""
        return self.unit_variance(h).amax(-1)

    def lambda_min_fisher(self, h: Tensor) -> Tensor:
        """Smallest eigenvalue of ``I(h)`` per input (``B``)."""
        return self.unit_variance(h).amin(-1)

    def lambda_max_moment4(self, h: Tensor) -> Tensor:
        r"""Largest eigenvalue of :math:`\mathcal M = K - I\otimes I` as a ``C^2 x C^2`` matrix (``B``).

        For independent units, ``M`` is block-structured: entries ``(aa),(aa)`` hold
        ``K_aaaa - I_aa^2 = kappa4_a + 2 I_aa^2``, the ``(ab)`` pairs with ``a != b`` hold
        ``Cov(s_a s_b, s_c s_d)`` which is ``I_aa I_bb`` on the symmetric pair, i.e. eigenvalue
        ``2 I_aa I_bb`` on ``(e_ab + e_ba)/sqrt 2``.
        """
        var = self.unit_variance(h)
        k4 = self.unit_kappa4(h)
        diag = (k4 + 2 * var * var).amax(-1)
        top2 = var.topk(min(2, var.shape[-1]), dim=-1).values
        off = 2 * top2[:, 0] * top2[:, -1] if var.shape[-1] > 1 else torch.zeros_like(diag)
        return torch.maximum(diag, off)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    r"""Softmax over ``C`` logits, at one or at many positions; targets are class indices in ``[0, C)``.

    ``t(y) = e_y``, ``eta = p = softmax(h)``, ``I = diag(p) - p p^T``, ``nll = logsumexp(h) - h_y``.

    **Outputs with positions** (docs/fisher-math.md §12): an output ``(B, C)`` is one distribution per input; an output
    ``(B, T_1, ..., C)`` (classes last, the language-model layout, ``class_dim=-1``) or ``(B, C, T_1, ...)``
    (``class_dim=1``, the ``F.cross_entropy`` layout) holds one distribution per position, the labels being
    independent given the input.  :meth:`flatten` brings it to ``(B, T*C)`` natural parameters (positions
    major, classes minor); every method then works per position: ``I(h)`` is block-diagonal with ``T``
    blocks ``I(h_t)``, ``t(y)`` is the concatenation of the ``T`` one-hot vectors, ``nll`` the sum over
    positions.  One input's Fisher is therefore the *sum* over its positions of the per-position Fisher.
    The layout (``C`` and the position shape) is that of the latest :meth:`flatten`; before any, a row
    ``h`` of width ``D`` is one position of ``D`` classes.

    **Masks**: a target equal to ``ignore_index`` (default ``-100``, as ``F.cross_entropy``) marks a position
    without a label; :meth:`grad` and :meth:`nll` leave it out, and :meth:`target_mask` turns such targets
    into the ``(B, T*C)`` seed mask the estimators use.

    >>> lik = Categorical(class_dim=1)
    >>> lik.flatten(torch.zeros(2, 5, 7)).shape  # (B, C, T) -> (B, T*C)
    torch.Size([2, 35])
    """

    name = "categorical"
    factorized = False

    def __init__(self, class_dim: int = -1, ignore_index: int = -100):
        if isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0:
            raise ValueError(f"Invalid class_dim: {class_dim!r} (dimension 0 is the batch)")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"Invalid ignore_index: {ignore_index!r}")
        self.class_dim = class_dim
        self.ignore_index = ignore_index
        self.classes: int | None = None  # C of the latest flatten
        self.positions: tuple[int, ...] | None = None  # position shape of the latest flatten; None: (B, C)

    # -- layout -----------------------------------------------------------------------------------
    def flatten(self, h: Tensor) -> Tensor:
        """``(B, C)``, ``(B, ..., C)`` (``class_dim=-1``) or ``(B, C, ...)`` (``class_dim=1``) -> ``(B, T*C)``."""
        if h.dim() < 2:
            raise ValueError(
                f"categorical: model output must have shape (batch, classes) or (batch, ..., classes), "
                f"got {tuple(h.shape)}"
            )
        cd = self.class_dim if self.class_dim > 0 else h.dim() + self.class_dim
        if not 0 < cd < h.dim():
            raise ValueError(
                f"categorical: class_dim={self.class_dim} is not a non-batch dimension of the model output "
                f"{tuple(h.shape)}"
            )
        self.classes = h.shape[cd]
        if self.classes < 2:
            raise ValueError(
                f"categorical: the model output has {self.classes} class; a softmax over one class is constant and "
                "its Fisher is zero. A regression output takes likelihood='gaussian'; a binary one 'bernoulli'"
            )
        if h.dim() == 2:
            self.positions = None
            return h
        if cd != h.dim() - 1:
            h = h.movedim(cd, -1)
        self.positions = tuple(h.shape[1:-1])
        return h.reshape(h.shape[0], -1)

    def _c(self, h: Tensor) -> int:
        c = self.classes if self.classes is not None else h.shape[-1]
        if h.shape[-1] % c:
            raise ValueError(f"categorical: natural parameters of width {h.shape[-1]} are not positions x {c} classes")
        return c

    def blocks(self, h: Tensor) -> Tensor:
        """``(..., T*C)`` -> ``(..., T, C)`` (a view): one row of logits per position."""
        return h.reshape(*h.shape[:-1], -1, self._c(h))

    def position_shape(self, h: Tensor) -> tuple[int, ...] | None:
        """Position shape of the flattened ``h`` (``None``: a ``(B, C)`` output, one position)."""
        t = h.shape[-1] // self._c(h)
        if self.positions is not None and math.prod(self.positions) == t:
            return self.positions
        return None if t == 1 else (t,)

    def n_positions(self, h: Tensor) -> int:
        """``T``: positions per input of the flattened ``h`` (1 for a ``(B, C)`` output)."""
        return h.shape[-1] // self._c(h)

    def position_factor(self, h: Tensor) -> Tensor:
        """Per-position factors ``S_t`` (``B x T x C x C``), ``S_t S_t^T = I(h_t)``."""
        p = torch.softmax(self.blocks(h), -1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)

    # -- targets ----------------------------------------------------------------------------------
    def check_targets(self, h: Tensor, y: Tensor) -> Tensor:
        """Targets ``(..., B)`` for a ``(B, C)`` output, ``(..., B, *positions)`` else -> long ``(..., B[, T])``.

        Entries equal to ``ignore_index`` are kept (masked positions).
        """
        y = torch.as_tensor(y, device=h.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"categorical: targets must be integer class indices, got dtype {y.dtype}")
        c = self._c(h)
        b = h.shape[0]
        pos = self.position_shape(h)
        if pos is None:
            if y.shape[-1:] != (b,) or y.dim() > 2:
                raise ValueError(
                    f"categorical: targets must have shape ({b},) (one class index per input), got {tuple(y.shape)}"
                )
        else:
            k = len(pos)
            if y.dim() < k + 1 or y.dim() > k + 2 or tuple(y.shape[-k - 1 :]) != (b, *pos):
                raise ValueError(
                    f"categorical: targets must have shape {(b, *pos)} (one class index per input and position), "
                    f"got {tuple(y.shape)}"
                )
            y = y.reshape(*y.shape[: y.dim() - k], -1)
        valid = y != self.ignore_index
        yv = y[valid]
        if yv.numel() and (int(yv.min()) < 0 or int(yv.max()) >= c):
            raise ValueError(
                f"categorical: class index out of range [0, {c}) (ignore_index={self.ignore_index}): "
                f"min {int(yv.min())}, max {int(yv.max())}"
            )
        return y.long()

    def target_mask(self, h: Tensor, y: Tensor) -> Tensor | None:
        """``(B, T*C)`` mask (1 where the position has a label, 0 where its target is ``ignore_index``), or
        ``None`` when every position has a label.  ``y``: one target per input and position."""
        y = self.check_targets(h, y)
        if y.dim() != (1 if self.position_shape(h) is None else 2):
            raise ValueError(f"categorical: give one target per input and position, got shape {tuple(y.shape)}")
        valid = y != self.ignore_index
        if bool(valid.all()):
            return None
        c = self._c(h)
        return valid.reshape(h.shape[0], -1, 1).expand(-1, -1, c).reshape(h.shape).to(h.dtype)

    # -- family -----------------------------------------------------------------------------------
    def sample(self, h, n, generator=None):
        """``n`` labels per input and position: ``(n, B)`` for a ``(B, C)`` output, ``(n, B, T)`` else."""
        p = torch.softmax(self.blocks(h.detach()), -1)  # (B, T, C)
        b, t, c = p.shape
        idx = torch.multinomial(p.reshape(-1, c).float(), n, replacement=True, generator=generator)  # (B*T, n)
        idx = idx.T.reshape(n, b, t)
        return idx[..., 0].contiguous() if self.position_shape(h) is None else idx.contiguous()

    def mean(self, h):
        return torch.softmax(self.blocks(h), -1).reshape(h.shape)

    def _onehot(self, y: Tensor, h: Tensor) -> Tensor:
        """One-hot ``(..., B, T*C)`` of labels ``(..., B)`` or ``(..., B, T)``; ``ignore_index`` -> zero row."""
        c = self._c(h)
        if self.position_shape(h) is None:
            y = y.unsqueeze(-1)  # (..., B) -> (..., B, 1)
        valid = (y != self.ignore_index).unsqueeze(-1)
        oh = torch.nn.functional.one_hot(y.clamp_min(0), c).to(h.dtype) * valid
        return oh.reshape(*y.shape[:-1], -1), valid

    def sufficient(self, y, h):
        return self._onehot(y, h)[0]

    def grad(self, h, y):
        r""":math:`\eta(h) - t(y)` per position, zero at positions whose target is ``ignore_index``."""
        oh, valid = self._onehot(y, h)
        g = self.blocks(self.mean(h)) * valid - self.blocks(oh)
        return g.reshape(oh.shape)

    def nll(self, h, y):
        """Summed over positions; positions whose target is ``ignore_index`` contribute 0."""
        hb = self.blocks(h)
        if self.position_shape(h) is None:
            y = y.unsqueeze(-1)
        valid = y != self.ignore_index
        hb = hb.expand(*y.shape, hb.shape[-1])
        per = torch.logsumexp(hb, -1) - hb.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (per * valid).sum(-1)

    def unit_variance(self, h):
        p = torch.softmax(self.blocks(h), -1)
        return (p * (1 - p)).reshape(h.shape)

    def unit_moment4(self, h):
        # t_a - p_a is 1 - p_a with probability p_a, else -p_a: E d^4 - (E d^2)^2 (one position's unit)
        p = torch.softmax(self.blocks(h), -1)
        q = 1 - p
        var = p * q
        return (var * (q**3 + p**3) - var * var).reshape(h.shape)

    @staticmethod
    def _block_diag(blocks: Tensor) -> Tensor:
        """``(B, T, C, K)`` per-position blocks -> block-diagonal ``(B, T*C, T*K)``."""
        b, t, c, k = blocks.shape
        eye = torch.eye(t, dtype=blocks.dtype, device=blocks.device)
        return (blocks.unsqueeze(3) * eye.reshape(1, t, 1, t, 1)).reshape(b, t * c, t * k)

    def fisher(self, h):
        p = torch.softmax(self.blocks(h), -1)
        return self._block_diag(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))

    def fisher_factor(self, h):
        # BackPACK's factor: S = diag(sqrt p) - p sqrt(p)^T, S S^T = diag(p) - p p^T (docs/fisher-math.md §7.2), per
        # position.
        return self._block_diag(self.position_factor(h))

    def _centered_sq(self, h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """One position: ``(p^T as C x B, d^2)`` with ``d = v - sum_c p_c v_c`` (one fresh tensor, squared in place)."""
        pt = torch.softmax(h, -1).T
        return pt, (v - _wsum(pt, v).unsqueeze(0)).square_()

    def _position_quads(self, h: Tensor, v: Tensor, with_m4: bool) -> tuple[Tensor, Tensor | None]:
        r"""Per position ``q_t = v_t^T I(h_t) v_t`` and ``Var_p((v_t^T(t-\eta_t))^2)`` -> ``(T, B, ...)`` each."""
        c = self._c(h)
        t = h.shape[-1] // c
        p = torch.softmax(h.reshape(h.shape[0], t, c), -1)  # (B, T, C)
        vb = v.reshape(t, c, *v.shape[1:])  # (T, C, B, ...)
        pe = p.permute(1, 2, 0).reshape(t, c, p.shape[0], *([1] * (v.dim() - 2)))
        d2 = (vb - (pe * vb).sum(1, keepdim=True)).square_()
        quad = (pe * d2).sum(1)
        if not with_m4:
            return quad, None
        return quad, (pe * d2.mul_(d2)).sum(1) - quad * quad

    def fisher_quad(self, h, v):
        if h.shape[-1] == self._c(h):
            pt, d2 = self._centered_sq(h, v)
            return _wsum(pt, d2)
        return self._position_quads(h, v, False)[0].sum(0)

    def moment4(self, h, v):
        # Var_p((v_Y - vbar)^2) = sum_c p_c d_c^4 - (sum_c p_c d_c^2)^2 (docs/fisher-math.md §5.3); positions:
        # docs/fisher-math.md §12.
        return self.quad_and_moment4(h, v)[1]

    def quad_and_moment4(self, h, v):
        r"""With positions (docs/fisher-math.md §12): ``F = sum_t q_t`` and ``sum_t kappa_t + 2 F^2``, where
        ``kappa_t = m_t - 2 q_t^2`` is the fourth cumulant of position ``t`` along ``v_t``."""
        if h.shape[-1] == self._c(h):
            pt, d2 = self._centered_sq(h, v)
            quad = _wsum(pt, d2)
            return quad, _wsum(pt, d2.mul_(d2)) - quad * quad
        q, m = self._position_quads(h, v, True)
        quad = q.sum(0)
        return quad, (m - 2 * q * q).sum(0) + 2 * quad * quad

    def _single(self, what: str, h: Tensor) -> None:
        if h.shape[-1] != self._c(h):
            raise NotImplementedError(f"categorical: {what} is not implemented for outputs with positions")

    def lambda_max_fisher(self, h):
        p = torch.softmax(self.blocks(h), -1)
        ev = torch.linalg.eigvalsh(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))  # (B, T, C)
        return ev.amax(-1).amax(-1)

    def lambda_min_fisher(self, h):
        """Smallest eigenvalue on the complement of the all-ones vector (``I 1 = 0`` always), per position."""
        c = self._c(h)
        p = torch.softmax(self.blocks(h), -1)
        ev = torch.linalg.eigvalsh(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))
        return (ev[..., 1] if c > 1 else ev[..., 0]).amin(-1)

    def lambda_max_moment4(self, h):
        r""":math:`\lambda_{max}(\mathcal M)` by the ``C x C`` Gram route (docs/fisher-math.md §4.2); ``(B, C)``
        outputs only."""
        self._single("lambda_max_moment4", h)
        p = torch.softmax(h, -1)
        c = p.shape[-1]
        s = torch.eye(c, dtype=p.dtype, device=p.device) - p.unsqueeze(-2)  # rows s_y = e_y - p
        g = (s @ s.transpose(-1, -2)) ** 2
        gp = g @ p.unsqueeze(-1)
        pgp = (p.unsqueeze(-2) @ gp).squeeze(-1)
        ones = torch.ones_like(gp)
        gc = g - gp @ ones.transpose(-1, -2) - ones @ gp.transpose(-1, -2) + pgp.unsqueeze(-1) * (
            ones @ ones.transpose(-1, -2)
        )
        sq = p.sqrt()
        return torch.linalg.eigvalsh(sq.unsqueeze(-1) * gc * sq.unsqueeze(-2)).amax(-1)

    def __repr__(self) -> str:
        args = []
        if self.class_dim != -1:
            args.append(f"class_dim={self.class_dim}")
        if self.ignore_index != -100:
            args.append(f"ignore_index={self.ignore_index}")
        return f"Categorical({', '.join(args)})"


class Bernoulli(Likelihood):
    r"""Independent sigmoid units (multi-label); targets in ``{0, 1}`` with the output's shape.

    ``p = sigmoid(h)``, ``I_aa = p(1-p)``, ``kappa4 = p(1-p)(6p^2-6p+1)``,
    ``nll = softplus(h) - y h`` summed over units.
    """

    name = "bernoulli"

    def check_targets(self, h, y):
        y = torch.as_tensor(y, device=h.device)
        y = _flat_targets(self, h, y)
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("bernoulli: targets must be 0 or 1")
        return y.to(h.dtype)

    def sample(self, h, n, generator=None):
        p = torch.sigmoid(h.detach())
        return torch.bernoulli(p.expand(n, *p.shape), generator=generator)

    def mean(self, h):
        return torch.sigmoid(h)

    def nll(self, h, y):
        return (torch.nn.functional.softplus(h) - y * h).sum(-1)

    def unit_variance(self, h):
        p = torch.sigmoid(h)
        return p * (1 - p)

    def unit_kappa4(self, h):
        p = torch.sigmoid(h)
        return p * (1 - p) * (6 * p * p - 6 * p + 1)


class Gaussian(Likelihood):
    r"""Independent Gaussian units with fixed standard deviation ``sigma`` (default 1).

    The output ``f`` is the mean; ``nll = ||y - f||^2 / (2 sigma^2) + const`` (the constant is dropped).
    ``grad = (f - y)/sigma^2``, ``I = I_C / sigma^2``, ``kappa4 = 0`` (docs/fisher-math.md §5.5).  Note that a summed
    ``MSELoss`` equals ``2 sigma^2`` times this NLL with ``sigma^2 = 1/2``: the Fisher always refers to the
    normalised log-likelihood, never to the raw loss.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Invalid sigma: {sigma}")
        self.sigma = float(sigma)

    def check_targets(self, h, y):
        y = _flat_targets(self, h, torch.as_tensor(y, device=h.device))
        if y.numel() and not bool(torch.isfinite(y).all()):
            raise ValueError("gaussian: targets must be finite")
        return y.to(h.dtype)

    def sample(self, h, n, generator=None):
        f = h.detach()
        noise = torch.randn((n, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return f + self.sigma * noise

    def mean(self, h):
        return h / self.sigma**2

    def sufficient(self, y, h):
        return y.to(h.dtype) / self.sigma**2

    def nll(self, h, y):
        return ((y - h) ** 2).sum(-1) / (2 * self.sigma**2)

    def unit_variance(self, h):
        return torch.full_like(h, 1.0 / self.sigma**2)

    def unit_kappa4(self, h):
        return torch.zeros_like(h)

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma})"


class Poisson(Likelihood):
    r"""Independent Poisson counts with log-rate outputs ``h = log(lambda)``.

    ``I_aa = kappa4 = lambda``, ``nll = exp(h) - y h + log(y!)`` (the constant is dropped).
    """

    name = "poisson"

    def check_targets(self, h, y):
        y = _flat_targets(self, h, torch.as_tensor(y, device=h.device))
        if y.numel() and not bool((torch.isfinite(y) & (y >= 0)).all()):
            raise ValueError("poisson: targets must be non-negative counts")
        return y.to(h.dtype)

    def sample(self, h, n, generator=None):
        rate = torch.exp(h.detach())
        return torch.poisson(rate.expand(n, *rate.shape).contiguous(), generator=generator)

    def mean(self, h):
        return torch.exp(h)

    def nll(self, h, y):
        return (torch.exp(h) - y * h).sum(-1)

    def unit_variance(self, h):
        return torch.exp(h)

    def unit_kappa4(self, h):
        return torch.exp(h)


def _flat_targets(lik: Likelihood, h: Tensor, y: Tensor) -> Tensor:
    """Bring targets of the model output's shape (or ``(n, *output)``) to ``(..., B, C)``."""
    b, c = h.shape
    if y.dim() >= 1 and y.shape[0] == b and y.numel() == b * c:
        return y.reshape(b, c)
    if y.dim() >= 2 and y.shape[1] == b and y.numel() == y.shape[0] * b * c:
        return y.reshape(y.shape[0], b, c)
    raise ValueError(
        f"{lik.name}: targets must have the model output's shape ({b} inputs x {c} units), "
        f"got {tuple(y.shape)}"
    )


LIKELIHOODS = {
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "poisson": Poisson,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Resolve a likelihood name (``categorical``, ``bernoulli``, ``gaussian``, ``poisson``) or object.

    >>> get_likelihood("gaussian")
    Gaussian(sigma=1.0)
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood]()
    raise ValueError(f"Invalid likelihood: {likelihood!r}. Must be one of {list(LIKELIHOODS)} or a Likelihood")
