"""torchmetrics ``Metric``s shared by the explainers (DDP synchronisation is torchmetrics').

Faithfulness metrics of attributions live in :mod:`.faithfulness` (``Metric`` classes) and :mod:`.functional` (the same
quantities as plain functions on tensors).
"""

from lightning_xai.metrics.faithfulness import CompletenessResidual, DeletionAUC, Infidelity, InsertionAUC
from lightning_xai.metrics.mean import MeanOfNamed

__all__ = ["CompletenessResidual", "DeletionAUC", "Infidelity", "InsertionAUC", "MeanOfNamed"]
