r"""The benchmarks' model factories, in one place.

Every factory builds its model with PyTorch's (or torchvision's) default initialisation drawn from the **global**
RNG, in the order the layers are listed, so ``torch.manual_seed(s); factory()`` gives the same weights every time;
:func:`seeded_mlp` instead draws under its own seed without touching the caller's RNG state.  All models are
float32 and return unnormalised outputs (logits, or the natural parameter of the likelihood).

Factories (``B``: batch; every classifier has 10 classes):

* :func:`mlp`: ``Linear`` layers of ``widths`` with ``act()`` between them; ``(B, widths[0]) -> (B, widths[-1])``.
* :func:`seeded_mlp`: :func:`mlp` drawn under ``torch.manual_seed(seed)`` in a forked RNG (the caller's state is
  left as it was).
* :func:`autoencoder`: :func:`mlp` 784-128-32-128-784 with ReLU; ``(B, 784) -> (B, 784)`` Bernoulli logits.
* :func:`cnn`: Conv(1,c1,3,p1)-act-MaxPool2-Conv(c1,c2,3,p1)-act-MaxPool2-Flatten-Linear(c2*7*7,10);
  ``(B, 1, 28, 28) -> (B, 10)``.  :func:`small_cnn` is the optimizer suite's: 8/16 channels, ReLU.
* :func:`resnet18`: torchvision ``resnet18(num_classes=10)``; ``(B, 3, H, W) -> (B, 10)``, BatchNorm.
  :func:`resnet18_1ch`: the same with ``conv1`` a 1-channel 7x7/2 convolution; ``(B, 1, H, W) -> (B, 10)``.
* :func:`mobilenet_v3_small`: torchvision ``mobilenet_v3_small(num_classes=10)``; ``(B, 3, H, W) -> (B, 10)``.
* :func:`vit`: torchvision ``VisionTransformer`` (image 16, patch 4, 2 layers of ``heads`` heads, hidden 32,
  MLP 64); ``(B, 3, 16, 16) -> (B, 10)``.
* :class:`SeqTransformer`: linear embedding + learned positions, ``nn.TransformerEncoder`` (d=32, 2 heads,
  2 layers, FF 64, no dropout), mean over positions, linear head; ``(B, T, d_in) -> (B, 10)``.
* :class:`SeqLSTM`: ``nn.LSTM(d_in, 64)``, its last hidden state, linear head; ``(B, T, d_in) -> (B, 10)``.

The character-level language models live with their data in :mod:`benchmarks.lm_data`.

This module imports no benchmark script (imports flow from the scripts to here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "SeqLSTM",
    "SeqTransformer",
    "autoencoder",
    "cnn",
    "mlp",
    "mobilenet_v3_small",
    "resnet18",
    "resnet18_1ch",
    "seeded_mlp",
    "small_cnn",
    "vit",
]


# -- multilayer perceptrons -------------------------------------------------------------------------------------
def mlp(widths: Sequence[int], act: type[nn.Module] = nn.Sigmoid) -> nn.Sequential:
    """``Linear(widths[0], widths[1]), act(), ..., Linear(widths[-2], widths[-1])`` (no activation after the last
    layer); the layers are initialised in order from the global RNG."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def seeded_mlp(widths: Sequence[int], activation: type[nn.Module] | None = None, seed: int = 0) -> nn.Sequential:
    """:func:`mlp` of ``widths`` with ``activation`` (default ``nn.Sigmoid``) between the layers, PyTorch's default
    initialisation drawn under ``torch.manual_seed(seed)`` without touching the caller's global RNG state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return mlp(widths, nn.Sigmoid if activation is None else activation)


def autoencoder(widths: Sequence[int] = (784, 128, 32, 128, 784), act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """The Bernoulli autoencoder: :func:`mlp` of ``widths`` (default 784-128-32-128-784) with ReLU units; its
    outputs are the logits of the pixels."""
    return mlp(widths, act)


# -- convolutional ----------------------------------------------------------------------------------------------
def cnn(c1: int, c2: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Two 3x3 convolutions (padding 1, ``c1`` then ``c2`` channels), each followed by ``act()`` and a 2x2 max-pool,
    then a linear layer to 10 classes: for 1x28x28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
    )  # fmt: skip


def small_cnn() -> nn.Sequential:
    """The optimizer suite's CNN: Conv(1,8)-ReLU-MaxPool-Conv(8,16)-ReLU-MaxPool-Linear(784,10), 1x28x28 inputs."""
    return cnn(8, 16, nn.ReLU)


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with 10 classes (3-channel inputs, BatchNorm)."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(num_classes=10)


def resnet18_1ch() -> nn.Module:
    """torchvision's ResNet-18 (10 classes) with ``conv1`` replaced by a 1-channel 7x7 stride-2 convolution.

    The replacement is drawn after the whole torchvision model (Kaiming normal, fan-out, as torchvision does)."""
    model = resnet18()
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    return model


def mobilenet_v3_small() -> nn.Module:
    """torchvision's ``mobilenet_v3_small`` with 10 classes (3-channel inputs)."""
    from torchvision.models import mobilenet_v3_small as tv_mobilenet

    return tv_mobilenet(num_classes=10)


def vit(heads: int = 2) -> nn.Module:
    """A small torchvision ``VisionTransformer``: 16x16 images, 4x4 patches, 2 layers of ``heads`` heads, hidden 32,
    MLP 64, 10 classes (3-channel inputs)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=heads, hidden_dim=32, mlp_dim=64,
                             num_classes=10)  # fmt: skip


# -- sequence classifiers ---------------------------------------------------------------------------------------
class SeqTransformer(nn.Module):
    """Classify a sequence of ``length`` feature vectors: linear embedding to ``d`` plus learned positions
    (``N(0, 0.02^2)``), a 2-layer ``nn.TransformerEncoder`` (2 heads, FF 64, no dropout), mean over positions,
    linear head to ``classes``."""

    def __init__(self, d_in: int = 8, length: int = 8, d: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


class SeqLSTM(nn.Module):
    """Classify a sequence of feature vectors: ``nn.LSTM(d_in, hidden)``, its last hidden state, linear head."""

    def __init__(self, d_in: int = 8, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])
