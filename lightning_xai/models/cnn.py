"""A small convolutional classifier for low-resolution images.

Sized for the embedded 8×8 digits but also valid on 28×28 (MNIST) and 32×32 (CIFAR-10) inputs. Its layer names are
stable (``features.<i>``, ``head.<i>``) because explanation callbacks and configs refer to layers by dotted name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_xai.models.classifier import ClassifierModule, as_shape

__all__ = ["SmallCNN"]


class SmallCNN(ClassifierModule):
    """Conv-BN-ReLU-MaxPool blocks followed by a two-layer fully connected head.

    Layout (for the default two channels): ``features.0..7`` are ``Conv2d, BatchNorm2d, ReLU, MaxPool2d`` twice;
    ``head.0..3`` are ``Flatten, Linear(flat, hidden), ReLU, Linear(hidden, num_classes)``. Each block has four modules,
    so block ``i`` occupies ``features.4i .. features.4i+3``. Convolutions keep the spatial size (3×3, padding 1) and
    each pooling halves it (rounding down).

    Args:
        input_shape: ``(channels, height, width)`` of one image; a tuple, list or omegaconf ``ListConfig``.
        num_classes: Number of target classes.
        channels: Output channels of each convolutional block.
        hidden: Width of the hidden fully connected layer.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Raises:
        ValueError: If ``input_shape`` is not three positive ints or is too small for ``len(channels)`` poolings.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay)
        input_shape = as_shape(input_shape)
        channels = as_shape(channels, "channels")
        num_classes, hidden, lr, weight_decay = int(num_classes), int(hidden), float(lr), float(weight_decay)
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (channels, height, width), got {input_shape!r}")
        if not channels:
            raise ValueError("channels must name at least one convolutional block, got ()")
        if hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        c_in, height, width = input_shape
        if height >> len(channels) < 1 or width >> len(channels) < 1:
            raise ValueError(f"input_shape {input_shape!r} is too small for {len(channels)} pooling steps of factor 2")
        self.save_hyperparameters()
        self.input_shape = input_shape

        layers: list[nn.Module] = []
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, height, width = c_out, height // 2, width // 2
        self.features = nn.Sequential(*layers)
        flat = c_in * height * width
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.example_input_array = torch.zeros(1, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(batch, *input_shape)`` to logits ``(batch, num_classes)``."""
        return self.head(self.features(x))
