"""Switched linear projections and inactive-state sensitivity (Szymanski, McCane & Atkinson, arXiv:1909.11275)."""

from lightning_xai._core.relu_regions import neuron_layers, row_norms_squared
from lightning_xai.insens.callback import Insens
from lightning_xai.insens.core import InsensMap, SwitchedProjections, insens, insens_naive, switched_projections

__all__ = [
    "Insens",
    "InsensMap",
    "SwitchedProjections",
    "insens",
    "insens_naive",
    "neuron_layers",
    "row_norms_squared",
    "switched_projections",
]
