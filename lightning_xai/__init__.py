"""lightning_xai: PyTorch Lightning callbacks that explain a neural network while it trains."""

from lightning_xai.cladec import ClaDec

__all__ = ["ClaDec"]
__version__ = "0.1.0"
