"""A multilayer perceptron classifier for tabular (or flattened image) inputs.

The default example network for the embedded breast-cancer table; its layers live in one ``net`` sequential so that
callbacks can refer to them by dotted name (``net.<i>``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_xai.models.classifier import ClassifierModule, as_shape

__all__ = ["MLP"]


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
}


class MLP(ClassifierModule):
    """Fully connected ReLU network: ``net = Flatten, (Linear, ReLU[, Dropout]) per hidden layer, Linear``.

    ``net.0`` is always the ``Flatten``, so any input shape works (images are flattened); the last module of ``net`` is
    the output ``Linear`` producing logits. ``Dropout`` modules appear only when ``dropout > 0``.

    Args:
        input_shape: Shape of one sample without the batch dimension; a tuple, list or omegaconf ``ListConfig``.
        num_classes: Number of target classes.
        hidden: Widths of the hidden layers (may be empty for a linear model).
        dropout: Dropout probability after each hidden activation, in [0, 1).
        activation: hidden activation, one of :data:`ACTIVATIONS` (``"relu"``: piecewise-linear, so Linearization
            is exact and Insens applies; a smooth one puts Linearization in gated-linear mode).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (30,),
        num_classes: int = 2,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.0,
        activation: str = "relu",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay)
        input_shape = as_shape(input_shape)
        hidden = as_shape(hidden, "hidden")
        num_classes, dropout, lr, weight_decay = int(num_classes), float(dropout), float(lr), float(weight_decay)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.save_hyperparameters()
        self.input_shape = input_shape

        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.example_input_array = torch.zeros(1, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs ``(batch, *input_shape)`` to logits ``(batch, num_classes)``."""
        return self.net(x)
