"""torchmetrics ``Metric``s shared by the explainers (DDP synchronisation is torchmetrics')."""

from lightning_xai.metrics.mean import MeanOfNamed

__all__ = ["MeanOfNamed"]
