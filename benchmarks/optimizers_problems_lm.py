r"""Language-model and ViT problems of the optimizer benchmark (issue 15), registered with
:func:`benchmarks.optimizers_problems.register_problem`.

==================  ==================================================================================
key                 problem
==================  ==================================================================================
``lm_transformer``  char-level causal Transformer LM (2 layers, d = 32, 4 heads), ``pydoc_data.topics`` text,
                    windows of 32 characters, every position an output (``(B, 32, 97)`` logits)
``lm_lstm``         char-level LSTM LM (embedding 32, hidden 64), the same windows
``vit``             torchvision VisionTransformer (16x16 digits upsampled from 8x8, patch 4, 2 layers, hidden
                    32, 4 heads), sklearn digits
==================  ==================================================================================

Budgets: one epoch (256 steps of 16 windows) for the LMs, 15 epochs for the ViT; the LM targets are what AdamW
(lr 1e-2, seed 0) reaches after about half to two thirds of the budget (a calibration run at 3e-3 and 1e-2 on
2026-12-02: Transformer 88.1 / LSTM 80.2 nats per window at step 128 with lr 1e-2).  The time cap (120 s) stops
runs whose per-step cost makes the budget unaffordable on one CPU thread (exact Fisher passes on an LM: positions x
classes seeds per window).

Data are fixed: the train and validation windows are consecutive, non-overlapping chunks of the splits of
:mod:`benchmarks.lm_data` (no shuffling across the train/validation cut).  The training loss is the problem's
per-input NLL, which for the LMs is the *sum over the window's positions* of the per-character cross-entropy (the
scaling of fisher_optim's Fisher, docs/fisher-math.md §12); the metric is the validation NLL per window (nats per
32 characters; divide by 32 for nats per character).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import models
from .lm_data import VOCAB_SIZE, char_lstm, char_transformer, corpus
from .optimizers_problems import Data, Problem, register_problem

__all__ = ["lm_data", "SEQ_LEN"]

SEQ_LEN = 32


@functools.lru_cache(maxsize=2)
def _lm_windows(seq_len: int, n_train: int, n_val: int) -> Data:
    def chunks(split: str, n: int):
        data = corpus(split)
        k = min(n, (data.numel() - 1) // seq_len)
        idx = torch.arange(k).unsqueeze(1) * seq_len + torch.arange(seq_len + 1)
        c = data[idx]
        return c[:, :-1].contiguous(), c[:, 1:].contiguous()

    xt, yt = chunks("train", n_train)
    xv, yv = chunks("validation", 2 * n_val)
    return Data(xt, yt, xv[:n_val], yv[:n_val], xv[n_val:], yv[n_val:])


def lm_data(smoke: bool) -> Data:
    """4,096 training and 256 validation windows of 32 characters (smoke: 16 and 8 windows of 4)."""
    return _lm_windows(4, 16, 8) if smoke else _lm_windows(SEQ_LEN, 4096, 256)


def _vit_data(smoke: bool) -> Data:
    from .optimizers_problems import digits_data

    d = digits_data(smoke)

    def img(x):  # 8x8 -> 1x16x16 (nearest), then 3 channels
        return x.reshape(-1, 1, 8, 8).repeat_interleave(2, 2).repeat_interleave(2, 3).expand(-1, 3, -1, -1).clone()

    return Data(img(d.x_train), d.y_train, img(d.x_val), d.y_val, img(d.x_test), d.y_test)


def small_vit() -> nn.Module:
    """The ViT problem's model: :func:`benchmarks.models.vit` with 4 heads."""
    return models.vit(heads=4)


@register_problem("lm_transformer")
def lm_transformer() -> Problem:
    return Problem(
        "lm_transformer",
        "char Transformer LM (2 layers, d=32, 4 heads), pydoc_data text, 32-char windows, all positions, batch 16",
        "categorical", lm_data,
        lambda: char_transformer(VOCAB_SIZE, d_model=32, n_heads=4, n_layers=2, max_len=SEQ_LEN),
        "nll", 88.0, 1, 16, 16, time_cap_s=120.0, smoke_batch=2,
        notes="metric: validation NLL per 32-character window (nats); target 88 = 2.75 nats/char",
    )  # fmt: skip


@register_problem("lm_lstm")
def lm_lstm() -> Problem:
    return Problem(
        "lm_lstm", "char LSTM LM (embedding 32, hidden 64), pydoc_data text, 32-char windows, batch 16",
        "categorical", lm_data, lambda: char_lstm(VOCAB_SIZE, d_embed=32, hidden=64),
        "nll", 80.0, 1, 16, 16, time_cap_s=120.0, smoke_batch=2,
        notes="metric: validation NLL per 32-character window (nats); target 80 = 2.5 nats/char",
    )  # fmt: skip


@register_problem("vit")
def vit() -> Problem:
    return Problem(
        "vit", "torchvision ViT (16x16 digits, patch 4, 2 layers, hidden 32), sklearn digits, batch 32",
        "categorical", _vit_data, small_vit, "accuracy", 0.80, 15, 32, 19, time_cap_s=240.0, smoke_batch=4,
    )  # fmt: skip
