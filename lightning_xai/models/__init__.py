"""Example LightningModules to explain: a small CNN for images and an MLP for tables.

Both derive from :class:`ClassifierModule`, which supplies the loss, accuracy logging and optimiser.
"""

from __future__ import annotations

from lightning_xai.models.classifier import ClassifierModule
from lightning_xai.models.cnn import SmallCNN
from lightning_xai.models.mlp import MLP

__all__ = ["MLP", "ClassifierModule", "SmallCNN"]
