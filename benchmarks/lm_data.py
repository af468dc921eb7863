"""A char-level language-modelling set that ships with Python, and two tiny LM factories (issue 13).

Data: the text of ``pydoc_data.topics`` (the help topics of the standard library, about 465k characters on
CPython 3.11), topics concatenated in sorted-key order.  Nothing is downloaded.

* Vocabulary: fixed, independent of the Python version: index 0 is "unknown" (any character outside the
  list, e.g. typographic quotes), then ``"\\n"`` and printable ASCII 32..126: :data:`VOCAB_SIZE` = 97.
* Split: the first 90 % of the characters are ``"train"``, the rest ``"validation"`` (a fixed cut, no
  shuffling, so no window straddles the two).
* :func:`windows` returns ``(inputs, targets)`` LongTensors ``(batch, seq_len)``: random windows of the
  split, ``targets`` the inputs shifted by one character (next-character prediction).

Models (outputs ``(batch, seq_len, VOCAB_SIZE)``, classes last: ``likelihood="categorical"``):

* :func:`char_transformer`: Embedding + learned positions, ``nn.TransformerEncoder`` (pre-norm layers,
  causal mask, no dropout), final ``nn.LayerNorm``, ``nn.Linear`` head;
* :func:`char_lstm`: Embedding, ``nn.LSTM``, ``nn.Linear`` head.

Example:
    >>> x, y = windows("train", batch_size=2, seq_len=8, generator=torch.Generator().manual_seed(0))
    >>> x.shape, y.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 8]), torch.Size([2, 8]), True)
    >>> char_transformer(d_model=16, n_heads=2, n_layers=1, max_len=8)(x).shape
    torch.Size([2, 8, 97])
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = [
    "VOCAB",
    "VOCAB_SIZE",
    "TRAIN_FRACTION",
    "load_text",
    "encode",
    "decode",
    "corpus",
    "windows",
    "CharTransformer",
    "CharLSTM",
    "char_transformer",
    "char_lstm",
]

#: index 0 = unknown character; then newline and printable ASCII
VOCAB = "\x00\n" + "".join(chr(i) for i in range(32, 127))
VOCAB_SIZE = len(VOCAB)
TRAIN_FRACTION = 0.9
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


def load_text() -> str:
    """The help topics of ``pydoc_data.topics``, joined by newlines in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def encode(text: str) -> Tensor:
    """Characters -> LongTensor of vocabulary indices (0 for characters outside :data:`VOCAB`)."""
    return torch.tensor([_INDEX.get(ch, 0) for ch in text], dtype=torch.long)


def decode(ids) -> str:
    """Vocabulary indices -> text (unknown characters as ``"?"``)."""
    return "".join("?" if int(i) == 0 else VOCAB[int(i)] for i in ids)


@functools.lru_cache(maxsize=1)
def _encoded() -> Tensor:
    return encode(load_text())


def corpus(split: str) -> Tensor:
    """The encoded ``"train"`` (first 90 %) or ``"validation"`` (last 10 %) characters, 1-D LongTensor."""
    data = _encoded()
    cut = int(TRAIN_FRACTION * data.numel())
    if split == "train":
        return data[:cut]
    if split == "validation":
        return data[cut:]
    raise ValueError(f"Invalid split: {split!r}. Must be 'train' or 'validation'")


def windows(
    split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``split``: ``(inputs, targets)``, each ``(batch_size, seq_len)``."""
    data = corpus(split)
    if seq_len < 1 or batch_size < 1 or seq_len + 1 > data.numel():
        raise ValueError(f"Invalid batch_size/seq_len: {batch_size}, {seq_len}")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    chunk = data[idx]
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class CharTransformer(nn.Module):
    """Causal char-level Transformer LM: ``(B, T)`` indices -> ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int, max_len: int, dim_ff: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_ff, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        z = self.embed(x) + self.pos(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=z.dtype)
        z = self.encoder(z, mask=mask, is_causal=True)
        return self.head(self.norm(z))


class CharLSTM(nn.Module):
    """Char-level LSTM LM: ``(B, T)`` indices -> ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int, d_embed: int, hidden: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_embed)
        self.lstm = nn.LSTM(d_embed, hidden, n_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.lstm(self.embed(x))
        return self.head(z)


def char_transformer(
    vocab: int = VOCAB_SIZE,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    max_len: int = 64,
    dim_ff: int | None = None,
) -> CharTransformer:
    """The issue's char-level Transformer (defaults: 2 layers, d = 64, 4 heads, 64 positions, ``dim_ff = 4d``)."""
    return CharTransformer(vocab, d_model, n_heads, n_layers, max_len, 4 * d_model if dim_ff is None else dim_ff)


def char_lstm(vocab: int = VOCAB_SIZE, d_embed: int = 32, hidden: int = 64, n_layers: int = 1) -> CharLSTM:
    """A small char-level LSTM LM."""
    return CharLSTM(vocab, d_embed, hidden, n_layers)
