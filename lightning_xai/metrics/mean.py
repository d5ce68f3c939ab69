"""A weighted mean of several named scalars in one torchmetrics ``Metric``.

An explainer reports a handful of scalars per validation epoch (losses, accuracies, agreements). Keeping them in
one metric with vector states costs one ``update`` per batch and one synchronisation per epoch under DDP, instead
of one of each per scalar; torchmetrics does the cross-rank reduction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric


class MeanOfNamed(Metric):
    """Running weighted means of a fixed set of named scalars.

    Args:
        names: the scalars this metric tracks; ``update`` may pass any subset of them.

    Example::

        metric = MeanOfNamed(["loss", "acc"])
        metric.update({"loss": torch.tensor(0.5), "acc": torch.tensor(1.0)}, weight=32)
        metric.compute()   # {"loss": tensor(0.5), "acc": tensor(1.)}; names never updated are left out
    """

    full_state_update = False
    is_differentiable = False

    total: torch.Tensor
    weight: torch.Tensor

    def __init__(self, names: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.add_state("total", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Add one weighted observation of each scalar in ``values`` (unknown names raise ``KeyError``)."""
        if not values:
            return
        index = torch.tensor([self._index[name] for name in values], device=self.total.device)
        stacked = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in values.values()]).to(self.total)
        self.total.index_add_(0, index, stacked * weight)
        self.weight.index_add_(0, index, torch.full_like(stacked, float(weight)))

    def compute(self) -> dict[str, torch.Tensor]:
        """Each tracked name that received observations, mapped to its weighted mean (float32)."""
        means = (self.total / self.weight.clamp_min(1e-300)).float()
        seen = (self.weight > 0).tolist()
        return {name: means[i] for i, name in enumerate(self.names) if seen[i]}
