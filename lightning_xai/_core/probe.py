"""Probe sets: a fixed handful of validation examples that every report draws, epoch after epoch.

Explanation images are only comparable across epochs if they show the same inputs. A :class:`ProbeSet` fills itself
from the first validation batches it sees (sanity check included; validation loaders do not shuffle), then freezes.
It lives in the callback's ``state_dict``, so a resumed run draws exactly the same examples. Under DDP each rank
fills its own from its shard; only global rank zero draws images, so its probe set is the one users see.
"""

from __future__ import annotations

import torch


class ProbeSet:
    """Up to ``size`` examples (inputs and optional targets), kept on the CPU.

    Args:
        size: number of examples to keep; 0 disables the probe set.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"probe_size={size} must be >= 0")
        self.size = int(size)
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[0]

    @property
    def full(self) -> bool:
        return len(self) >= self.size

    def offer(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Take examples from a batch until the set is full; later calls change nothing."""
        if self.full:
            return
        take = min(self.size - len(self), inputs.shape[0])
        with torch.inference_mode(False):  # validation batches are inference tensors: keep normal copies
            x = inputs[:take].detach().to("cpu").clone()
            y = None if targets is None else targets[:take].detach().to("cpu").clone()
            if self.inputs is None:
                self.inputs, self.targets = x, y
                return
            self.inputs = torch.cat([self.inputs, x])
            both = self.targets is not None and y is not None
            self.targets = torch.cat([self.targets, y]) if both else None

    def state_dict(self) -> dict:
        return {"size": self.size, "inputs": self.inputs, "targets": self.targets}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.inputs, self.targets = int(state["size"]), state["inputs"], state["targets"]
