"""The DMMMEN callback's reservoir: a fixed-size uniform sample of the training inputs (and labels) streamed past.

A surrogate refit needs the training inputs again, but a run may stream far more of them than fit in memory, so the
callback keeps at most ``max_examples`` per process by Vitter's algorithm R, vectorised per batch (time linear in the
stream, memory fixed). This module holds only that bookkeeping (buffers, fill level, stream count, checkpoint form);
which inputs are offered (finite ones) and what is fitted on them stay with the callback. The random draws come from
the stream handed to :meth:`Reservoir.offer` (the callback's private one), so no global random stream is touched.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_xai._core.rng import PrivateRNG


class Reservoir:
    """At most ``max_examples`` rows of a stream of ``(x, y)`` batches, a uniform sample of all rows offered.

    Rows ``[0, filled)`` of :attr:`buffer` (and :attr:`buffer_labels`, ``None`` when the batches carry no labels) are
    kept; :attr:`seen` counts every row offered. Capacity grows by doubling up to ``max_examples``.
    """

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.buffer: torch.Tensor | None = None  # training inputs (CPU); rows [0, filled) are kept
        self.buffer_labels: torch.Tensor | None = None
        self.filled = 0
        self.seen = 0

    @property
    def inputs(self) -> torch.Tensor | None:
        """The kept inputs (``None`` before the first batch)."""
        return None if self.buffer is None else self.buffer[: self.filled]

    @property
    def labels(self) -> torch.Tensor | None:
        """Their labels (``None`` when the batches carry none)."""
        return None if self.buffer_labels is None else self.buffer_labels[: self.filled]

    def offer(self, x: torch.Tensor, y: torch.Tensor | None, rng: PrivateRNG) -> bool:
        """Offer a batch (Vitter's algorithm R, vectorised: O(batch) per batch); ``True`` when labels were dropped.

        Free slots take the first rows; each later row, the t-th of the stream, replaces slot ``j`` drawn uniformly
        from ``[0, t)`` when ``j < max_examples`` (the last row drawn for a slot wins, as one at a time would), so
        the reservoir is a uniform sample of the stream. The draws come from ``rng``. When some batches carry labels
        and some do not, every label is dropped (the caller warns) and the class's inputs are chosen by prediction.
        """
        n = x.shape[0]
        if n == 0:
            return False
        if self.buffer is not None and tuple(self.buffer.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"DMMMEN: training inputs must all have one shape; got {tuple(x.shape[1:])} after "
                             f"{tuple(self.buffer.shape[1:])} (pad them to one length with input_fn).")
        dropped = bool(self.filled) and (y is None) != (self.buffer_labels is None)
        if dropped:
            self.buffer_labels, y = None, None
        free = min(n, self.max_examples - self.filled)
        if free:
            self._grow(self.filled + free, x, y)
            self.buffer[self.filled : self.filled + free] = x[:free]
            if y is not None:
                self.buffer_labels[self.filled : self.filled + free] = y[:free]
            self.filled += free
        if free < n:
            rows, slots = self._replacements(self.seen + free, n - free, rng)
            rows += free
            self.buffer[slots] = x[rows].to(self.buffer.dtype)
            if y is not None:
                self.buffer_labels[slots] = y[rows].to(self.buffer_labels.dtype)
        self.seen += n
        return dropped

    def _replacements(self, seen: int, m: int, rng: PrivateRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """For the next ``m`` rows after ``seen`` of a full reservoir: the rows (offsets) that enter and their slots."""
        t = seen + torch.arange(1, m + 1, dtype=torch.float64)  # each row's 1-based position in the stream
        with rng.active():
            u = torch.rand(m, dtype=torch.float64)
        j = torch.minimum((u * t).long(), t.long() - 1)  # uniform in [0, t)
        rows = torch.nonzero(j < self.max_examples).flatten()
        slots, inverse = torch.unique(j[rows], return_inverse=True)
        last = torch.full((slots.numel(),), -1, dtype=torch.long).scatter_reduce(0, inverse, rows, reduce="amax")
        return last, slots

    def _grow(self, rows: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Make room for ``rows`` kept inputs: capacity doubles (at most ``max_examples``), so filling is linear."""
        capacity = 0 if self.buffer is None else self.buffer.shape[0]
        if rows > capacity:
            capacity = min(self.max_examples, max(rows, 2 * capacity, 64))
            self.buffer = _resized(self.buffer, self.filled, capacity, x)
        if y is not None and (self.buffer_labels is None or self.buffer_labels.shape[0] < capacity):
            self.buffer_labels = _resized(self.buffer_labels, self.filled, capacity, y)

    def state_dict(self) -> dict[str, Any]:
        """The kept rows (trimmed to their own tensors) and the stream count, under the checkpoint's keys."""
        return {"pool": _trimmed(self.buffer, self.filled), "labels": _trimmed(self.buffer_labels, self.filled),
                "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (extra keys are ignored)."""
        self.buffer, self.buffer_labels, self.seen = state["pool"], state["labels"], int(state["seen"])
        self.filled = 0 if self.buffer is None else min(self.buffer.shape[0], self.max_examples)


def _resized(buffer: torch.Tensor | None, filled: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``rows`` rows shaped like ``like``'s rows (typed like ``buffer``), holding ``buffer[:filled]``."""
    out = torch.empty((rows, *like.shape[1:]), dtype=like.dtype if buffer is None else buffer.dtype)
    if buffer is not None and filled:
        out[:filled] = buffer[:filled]
    return out


def _trimmed(buffer: torch.Tensor | None, filled: int) -> torch.Tensor | None:
    """The first ``filled`` rows as a tensor of their own (a view would save the whole buffer in a checkpoint)."""
    if buffer is None:
        return None
    return buffer if buffer.shape[0] == filled else buffer[:filled].clone()
