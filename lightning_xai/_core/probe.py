"""Probe sets: a fixed handful of validation examples that every report draws, epoch after epoch.

Explanation images are only comparable across epochs if they show the same inputs. A :class:`ProbeSet` fills itself
from the first validation batches it sees (sanity check included; validation loaders do not shuffle), then freezes.
It lives in the callback's ``state_dict``, so a resumed run draws exactly the same examples. Under DDP each rank
fills its own from its shard; only global rank zero draws images, so its probe set is the one users see.

What goes in:

* **finite examples only** — a row whose input (or floating-point target) holds NaN/Inf is left out and counted in
  :attr:`ProbeSet.skipped` (warned once), so one bad validation image cannot make every later report NaN;
* **no padding** — rows the caller marks as padding (``DistributedSampler`` repeats examples so that every rank
  gets as many) are left out without being counted, so the union of the ranks' sets is the set one process fills;
* **each position once** — ``offer(..., start=)`` names the position of a batch's first row within the validation
  pass; the set remembers how far it has looked (:attr:`ProbeSet.cursor`), so the sanity check followed by the
  first validation pass, or a later pass over a set smaller than ``size``, never adds an example twice.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn


def finite_rows(inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` bool: rows whose input and (floating-point) target hold no NaN/Inf."""
    ok = torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(1) if inputs.is_floating_point() else None
    if ok is None:
        ok = torch.ones(inputs.shape[0], dtype=torch.bool, device=inputs.device)
    if targets is not None and targets.is_floating_point() and targets.shape[:1] == inputs.shape[:1]:
        ok = ok & torch.isfinite(targets.reshape(targets.shape[0], -1)).all(1).to(ok.device)
    return ok


class ProbeSet:
    """Up to ``size`` finite, non-padding examples (inputs and optional targets), kept on the CPU.

    Args:
        size: number of examples to keep; 0 disables the probe set.
        what: how warnings name this set (e.g. ``"linearization metric set"``).
    """

    def __init__(self, size: int, what: str = "probe set") -> None:
        if size < 0:
            raise ValueError(f"probe_size={size} must be >= 0")
        self.size = int(size)
        self.what = what
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.cursor = 0  # positions of the validation pass already looked at
        self.skipped = 0  # non-finite rows left out
        self.template: tuple[tuple[int, ...], torch.dtype] | None = None  # shape and dtype of one input row
        self._warned = False

    def __len__(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[0]

    @property
    def full(self) -> bool:
        return len(self) >= self.size

    def offer(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        start: int | None = None,
        padding: torch.Tensor | None = None,
    ) -> int:
        """Take finite, non-padding rows of a batch until the set is full; returns the rows skipped as non-finite.

        Args:
            inputs: ``(B, ...)`` inputs.
            targets: ``(B, ...)`` targets, or None.
            start: position of ``inputs[0]`` within the validation pass (None: right after the last row looked at).
            padding: ``(B,)`` bool, True for rows that repeat another example (left out, not counted).
        """
        if self.template is None:
            self.template = (tuple(inputs.shape[1:]), inputs.dtype)
        if self.full:
            return 0
        start = self.cursor if start is None else int(start)
        first = max(self.cursor - start, 0)
        b = inputs.shape[0]
        if first >= b:
            return 0
        with torch.inference_mode(False):  # validation batches are inference tensors: keep normal copies
            finite = finite_rows(inputs.detach(), None if targets is None else targets.detach()).cpu()
            real = torch.ones(b, dtype=torch.bool) if padding is None else ~padding.detach().cpu().bool()
            wanted = (finite & real).nonzero().flatten()
            wanted = wanted[wanted >= first][: self.size - len(self)]
            end = b if len(self) + len(wanted) < self.size or len(wanted) == 0 else int(wanted[-1]) + 1
            bad = int((~finite[first:end] & real[first:end]).sum())
            self.cursor = max(self.cursor, start + end)
            self._count_skipped(bad)
            if len(wanted):
                self._append(inputs, targets, wanted)
        return bad

    def _append(self, inputs: torch.Tensor, targets: torch.Tensor | None, rows: torch.Tensor) -> None:
        x = inputs.detach()[rows.to(inputs.device)].to("cpu").clone()
        y = None if targets is None else targets.detach()[rows.to(targets.device)].to("cpu").clone()
        if self.inputs is None:
            self.inputs, self.targets = x, y
            return
        self.inputs = torch.cat([self.inputs, x])
        both = self.targets is not None and y is not None
        self.targets = torch.cat([self.targets, y]) if both else None

    def _count_skipped(self, bad: int) -> None:
        if not bad:
            return
        self.skipped += bad
        if not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{self.what}: left out {bad} validation example(s) whose input or target holds NaN/Inf; the set is "
                "filled from finite examples only (the count is logged as <method>/skipped)."
            )

    def resize(self, size: int) -> None:
        """Change the capacity: a smaller set keeps its first ``size`` examples; a larger one goes on filling from
        the next validation pass, at the positions it has not looked at yet."""
        if size < 0:
            raise ValueError(f"probe_size={size} must be >= 0")
        self.size = int(size)
        if self.inputs is not None and len(self) > size:
            self.inputs = self.inputs[:size]
            self.targets = None if self.targets is None else self.targets[:size]

    def state_dict(self) -> dict:
        return {"size": self.size, "inputs": self.inputs, "targets": self.targets, "cursor": self.cursor,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.inputs, self.targets = int(state["size"]), state["inputs"], state["targets"]
        self.cursor = int(state.get("cursor", len(self)))  # checkpoints before the cursor: filled from the start
        self.skipped = int(state.get("skipped", 0))
        if self.inputs is not None and self.template is None:
            self.template = (tuple(self.inputs.shape[1:]), self.inputs.dtype)
