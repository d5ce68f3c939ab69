"""lightning_xai: PyTorch Lightning callbacks that explain a neural network while it trains.

Callbacks: :class:`ClaDec`, :class:`Linearization`, :class:`Insens`, :class:`DMMMEN`, :class:`GPEX`.
Functional core: :func:`linearize`, :func:`insens`, :func:`switched_projections`.
Post hoc: :func:`fit_explainers` runs the callbacks on a frozen model.
"""

from lightning_xai.cladec import ClaDec
from lightning_xai.dmmmen.callback import DMMMEN
from lightning_xai.gpex import GPEX
from lightning_xai.insens import Insens, insens, switched_projections
from lightning_xai.linearization import Linearization, linearize
from lightning_xai.posthoc import fit_explainers

__all__ = [
    "DMMMEN",
    "GPEX",
    "ClaDec",
    "Insens",
    "Linearization",
    "fit_explainers",
    "insens",
    "linearize",
    "switched_projections",
]
__version__ = "0.1.0"
