"""The categorical (softmax) family, with outputs that have positions (docs/fisher-math.md §5.3, §12)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Likelihood, wsum

__all__ = ["Categorical"]


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
        return pt, (v - wsum(pt, v).unsqueeze(0)).square_()

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
            return wsum(pt, d2)
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
            quad = wsum(pt, d2)
            return quad, wsum(pt, d2.mul_(d2)) - quad * quad
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
