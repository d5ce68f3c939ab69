"""ClaDec: explaining a layer by decoding its activations (Schneider & Vlachos, arXiv:2005.13630)."""

from lightning_xai.cladec.callback import ClaDec, ClaDecExplanation
from lightning_xai.cladec.decoder import build_decoder
from lightning_xai.cladec.model import ClaDecModel, RefAE, cladec_objective, reconstruction_loss

__all__ = [
    "ClaDec",
    "ClaDecExplanation",
    "ClaDecModel",
    "RefAE",
    "build_decoder",
    "cladec_objective",
    "reconstruction_loss",
]
