"""The inducing cache of GPEX: one feature row and one target row per training example, and their Gram sums.

In GPEX every training example is an inducing point of every head's GP. With the finite-rank kernel
``k(x, x') = f(x)ᵀf(x')`` the posterior needs the inducing set only through two small sums per head, by the
push-through identity ``Uᵀ(UUᵀ + σ²I)⁻¹ = (UᵀU + σ²I)⁻¹Uᵀ``:

* ``G_ℓ = U_ℓᵀ U_ℓ`` (D×D) and ``c_ℓ = U_ℓᵀ V_ℓ`` (D),

so a training step never touches an M×M (or B×M) matrix. When rows change, both sums take a rank-B update
(subtract the old rows' outer products, add the new ones); :meth:`InducingCache.refresh` recomputes them from all
rows so rounding cannot accumulate. It runs on its own once the rows rewritten since the last one reach
``refresh_every`` times the number of filled rows, so its amortised cost per written row is a constant, whatever M.
The sums are kept in float64 and built from the rows *as stored* (after casting to the storage dtype), so the cached
sums always describe exactly the stored rows.

**Sharded over processes** (``sharded=True``, under ``torch.distributed``): each rank stores only its own rows, while
G and c stay the sums over *all* ranks' rows, equal everywhere. A write all-reduces its D×D change (the upper
triangle of ΔG, Δc and two counts: ``8·L·(D(D+1)/2 + D) + 16`` bytes, whatever B or M), and a refresh all-reduces
the per-rank sums; so every rank must call :meth:`InducingCache.write` and :meth:`InducingCache.refresh` at the same
points (a rank with nothing to write passes zero rows). :meth:`InducingCache.overwrite` changes rows locally without
touching the sums, for a re-embedding pass that ends in a refresh.

Slots are written by index. Slots never written are "empty": their rows are zero and ``filled`` is false, so they
add nothing to G, c or a neighbour search. The cache has a fixed size, or grows (doubling its storage, never past
``max_capacity``) when a write names a slot past the end. Every buffer is in the ``state_dict``, and loading resizes
the row buffers to the checkpoint's, so a round trip restores the cache exactly.

**One row per example.** Each slot also records a ``key``, the identity of the example in it: its dataset index
when known, else :func:`fingerprint` of its input (exact bits). :meth:`InducingCache.evict` empties the slots that
hold an example about to be written elsewhere, so an example is never cached twice, whatever order the examples
arrive in (a stream that repeats itself, a reshuffled epoch whose previous rows are still cached mid-epoch).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_xai._core.distributed import all_gather_rows, all_reduce_
from lightning_xai.gpex.gram import GramSums, RowSwap, cross_of, gram_of
from lightning_xai.gpex.keys import fingerprint

# RowSwap (gram.py) and fingerprint (keys.py) are re-exported from their modules
__all__ = ["InducingCache", "RowSwap", "fingerprint"]

_ROW_BUFFERS = ("U", "V", "filled", "index", "key", "inputs")


def _last_occurrence(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unique slots and, when there were repeats, the position of each one's last occurrence (else None)."""
    uniq, inverse = torch.unique(slots, return_inverse=True)
    if uniq.numel() == slots.numel():
        return slots, None
    positions = torch.arange(slots.numel(), device=slots.device)
    last = torch.full((uniq.numel(),), -1, dtype=torch.long, device=slots.device)
    return uniq, last.scatter_reduce(0, inverse, positions, reduce="amax")


class InducingCache(GramSums, nn.Module):
    """Rows ``U`` (M, L, D) and ``V`` (M, L) of the inducing set, with ``G = UᵀU`` (L, D, D) and ``c = UᵀV`` (L, D).

    Args:
        heads: Number of heads L.
        dim: Features per head D.
        capacity: Number of slots M; ``None`` starts empty and grows as slots past the end are written.
        max_capacity: Largest M a growing cache may reach (``None``: unbounded); a write past it is an error.
        storage_dtype: dtype of ``U`` (float32; bfloat16 halves memory on GPU). ``V`` is float32 (float64 when
            ``U`` is); G and c are float64.
        store_inputs: Also keep each slot's input (allocated on the first write that passes inputs), for
            neighbour panels when examples carry no dataset index.
        refresh_every: Recompute G and c from all rows once the rows rewritten since the last recompute reach this
            many times the filled rows (``None``: never). Amortised, a refresh then costs ``1/refresh_every`` of the
            rank-B updates it follows, at any M.
        sharded: This process holds one shard of the rows, and G, c sum over every process's shard (see the module
            docstring: writes and refreshes become collectives).

    Buffers (all in the ``state_dict``): ``U``, ``V``, ``G``, ``c``, ``filled`` (M,) bool, ``index`` (M,) int64
    dataset index per slot (−1 when unknown), ``key`` (M,) int64 identity of the slot's example (see
    :meth:`evict`), ``inputs`` (M, ...) or empty, ``updates`` (number of writes),
    ``total_filled`` and ``rewritten`` (float64 counts over all shards: filled rows, rows written since the last
    refresh).
    """

    def __init__(
        self,
        heads: int,
        dim: int,
        capacity: int | None = None,
        storage_dtype: torch.dtype = torch.float32,
        store_inputs: bool = False,
        refresh_every: float | None = 4.0,
        sharded: bool = False,
        max_capacity: int | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.dim = int(heads), int(dim)
        self.growing = capacity is None
        self.max_capacity = None if max_capacity is None else int(max_capacity)
        self.store_inputs = bool(store_inputs)
        self.sharded = bool(sharded)
        self.refresh_every = None if refresh_every is None else float(refresh_every)
        if self.refresh_every is not None and not self.refresh_every > 0:
            raise ValueError(f"refresh_every must be > 0 or None, got {refresh_every!r}")
        m = 0 if capacity is None else int(capacity)
        if m < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity!r}")
        self.register_buffer("U", torch.zeros(m, self.heads, self.dim, dtype=storage_dtype))
        v_dtype = torch.float64 if storage_dtype == torch.float64 else torch.float32
        self.register_buffer("V", torch.zeros(m, self.heads, dtype=v_dtype))
        self.register_buffer("G", torch.zeros(self.heads, self.dim, self.dim, dtype=torch.float64))
        self.register_buffer("c", torch.zeros(self.heads, self.dim, dtype=torch.float64))
        self.register_buffer("filled", torch.zeros(m, dtype=torch.bool))
        self.register_buffer("index", torch.full((m,), -1, dtype=torch.long))
        self.register_buffer("key", torch.zeros(m, dtype=torch.long))
        self.register_buffer("inputs", torch.zeros(0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_filled", torch.zeros((), dtype=torch.float64))
        self.register_buffer("rewritten", torch.zeros((), dtype=torch.float64))
        rows, cols = torch.triu_indices(self.dim, self.dim)
        self._triu = (rows, cols)
        self._version = 0  # bumped by every change of rows or sums: tells a RowSwap whether it still applies
        self._slot_of: dict[int, int] | None = None  # key -> slot of the filled rows (None: rebuild from buffers)

    @property
    def capacity(self) -> int:
        """Number of slots currently allocated (M)."""
        return self.U.shape[0]

    @property
    def num_filled(self) -> int:
        """Number of slots that hold a row."""
        return int(self.filled.sum())

    # ------------------------------------------------------------------ storage management
    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if not self.growing:
            raise IndexError(f"slot {needed - 1} is out of range for a cache of fixed size {self.capacity}")
        limit = self.max_capacity
        if limit is not None and needed > limit:
            raise IndexError(f"slot {needed - 1} is out of range for a cache bounded at max_capacity={limit} rows")
        new = max(needed, 2 * self.capacity, 64)
        new = new if limit is None else min(new, limit)
        for name in _ROW_BUFFERS:
            old = getattr(self, name)
            if name == "inputs" and old.numel() == 0 and old.dim() == 1:
                continue  # not allocated yet
            fill = -1 if name == "index" else 0
            grown = torch.full((new, *old.shape[1:]), fill, dtype=old.dtype, device=old.device)
            grown[: old.shape[0]] = old
            setattr(self, name, grown)

    def reserve(self, rows: int) -> None:
        """Allocate storage for ``rows`` slots now (at most ``max_capacity``), so that a cache whose final size is
        known grows once instead of doubling past it (doubling holds the old and the new storage at once)."""
        if self.growing:
            self._grow(rows if self.max_capacity is None else min(int(rows), self.max_capacity))

    def _check_slots(self, slots: torch.Tensor) -> torch.Tensor:
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.U.device).reshape(-1)
        if slots.numel() and int(slots.min()) < 0:
            raise IndexError("slots must be non-negative")
        return slots

    # ------------------------------------------------------------------ writes
    @torch.no_grad()
    def write(
        self,
        slots: torch.Tensor,
        u_rows: torch.Tensor,
        v_rows: torch.Tensor,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        swap: RowSwap | None = None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Overwrite the rows at ``slots`` and apply the rank-B update to G and c.

        ``G ← G − U_oldᵀU_old + U_newᵀU_new`` and ``c ← c − U_oldᵀV_old + U_newᵀV_new`` per head, from the rows as
        stored. Repeated slots keep their last row. Its rows count towards ``refresh_every``; sharded, a collective.

        Args:
            slots: (B,) slot numbers.
            u_rows: (B, L, D) features f(x̃) of the examples (detached).
            v_rows: (B, L) targets, the explained network's outputs at x̃.
            inputs: (B, ...) the examples themselves, kept when ``store_inputs``.
            index: (B,) dataset indices of the examples, when known.
            swap: the :meth:`swap` made for exactly these slots and rows since the last change to the cache, whose
                ``delta_g``, ``delta_c`` are then added instead of being recomputed (ignored when it does not apply).
            keys: (B,) identities of the examples (see :meth:`evict`); default their ``index`` when given.
        """
        slots = self._check_slots(slots)
        u_rows, v_rows = u_rows.detach(), v_rows.detach()
        if u_rows.shape != (slots.numel(), self.heads, self.dim) or v_rows.shape != (slots.numel(), self.heads):
            raise ValueError(
                f"expected u_rows {(slots.numel(), self.heads, self.dim)} and v_rows {(slots.numel(), self.heads)}, "
                f"got {tuple(u_rows.shape)} and {tuple(v_rows.shape)}"
            )
        if slots.numel() == 0 and not self.sharded:
            return
        delta_g = self.G.new_zeros(self.G.shape)
        delta_c = self.c.new_zeros(self.c.shape)
        written = newly_filled = 0
        if slots.numel():
            reuse = swap is not None and self._swap_applies(swap, slots, u_rows, v_rows)
            if not reuse:
                slots, last = _last_occurrence(slots)
                if last is not None:
                    u_rows, v_rows = u_rows[last], v_rows[last]
                    inputs = None if inputs is None else inputs[last]
                    index = None if index is None else torch.as_tensor(index, device=last.device).reshape(-1)[last]
                    keys = None if keys is None else torch.as_tensor(keys, device=last.device).reshape(-1)[last]
            self._grow(int(slots.max()) + 1)
            new_u = u_rows.to(device=self.U.device, dtype=self.U.dtype)
            new_v = v_rows.to(device=self.V.device, dtype=self.V.dtype)
            if not reuse:  # the change from the rows as stored, by the same product a matching step uses
                swap = self.swap(slots, new_u, new_v)
            delta_g, delta_c = swap.delta_g, swap.delta_c
            written, newly_filled = slots.numel(), int((~self.filled[slots]).sum())
            self._store(slots, new_u, new_v, inputs, index, keys)
        self._add_to_sums(delta_g, delta_c, written, newly_filled)
        self.updates += 1
        if self.refresh_every is not None and float(self.rewritten) >= self.refresh_every * float(self.total_filled):
            self.refresh()

    @torch.no_grad()
    def overwrite(
        self,
        slots: torch.Tensor,
        u_rows: torch.Tensor,
        v_rows: torch.Tensor,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Store rows at distinct ``slots`` *without* updating G and c (call :meth:`refresh` afterwards). Local."""
        slots = self._check_slots(slots)
        if slots.numel() == 0:
            return
        self._grow(int(slots.max()) + 1)
        self._store(slots, u_rows, v_rows, inputs, index, keys)

    def _store(
        self,
        slots: torch.Tensor,
        u_rows: torch.Tensor,
        v_rows: torch.Tensor,
        inputs: torch.Tensor | None,
        index: torch.Tensor | None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Write rows at checked, allocated ``slots`` (``index`` and ``keys`` kept as they are when not given)."""
        self._version += 1
        self.U[slots] = u_rows.detach().to(device=self.U.device, dtype=self.U.dtype)
        self.V[slots] = v_rows.detach().to(device=self.V.device, dtype=self.V.dtype)
        self.filled[slots] = True
        if index is not None:
            self.index[slots] = torch.as_tensor(index, dtype=torch.long).reshape(-1).to(self.index.device)
        keys = index if keys is None else keys
        if keys is not None:
            keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1).to(self.key.device)
            if self._slot_of is not None:  # keep the key -> slot map in step with the buffers
                for slot, old in zip(slots.tolist(), self.key[slots].tolist()):
                    if self._slot_of.get(old) == slot:
                        del self._slot_of[old]
                self._slot_of.update(zip(keys.tolist(), slots.tolist()))
            self.key[slots] = keys
        if inputs is not None and self.store_inputs:
            if self.inputs.shape[1:] != inputs.shape[1:] or self.inputs.shape[0] != self.capacity:
                if self.inputs.numel():
                    raise ValueError(f"inputs of shape {tuple(inputs.shape[1:])} differ from the stored ones")
                self.inputs = torch.zeros(self.capacity, *inputs.shape[1:], dtype=inputs.dtype, device=self.U.device)
            self.inputs[slots] = inputs.detach().to(self.inputs.device, self.inputs.dtype)

    @torch.no_grad()
    def clear(self) -> None:
        """Empty every slot (rows to zero, ``filled`` false, G and c to zero); the capacity is kept."""
        self._version += 1
        self.U.zero_()
        self.V.zero_()
        self.filled.zero_()
        self.index.fill_(-1)
        self.key.zero_()
        self._slot_of = None
        self.G.zero_()
        self.c.zero_()
        self.total_filled.zero_()
        self.rewritten.zero_()
        if self.inputs.numel():
            self.inputs.zero_()

    @torch.no_grad()
    def evict(self, keys: torch.Tensor, keep: torch.Tensor | None = None) -> int:
        """Empty every filled slot whose example is among ``keys`` (except the slots in ``keep``); returns how many.

        Called before a batch is written with its examples' keys, it removes their older copies, so each example has
        at most one row. The emptied rows leave G and c by an exact subtraction; sharded, a collective: the keys of
        every rank are matched against every shard (an example may have been cached by another rank in an earlier
        epoch), and the change is all-reduced.

        Args:
            keys: (B,) identities of the examples about to be written (dataset indices or :func:`fingerprint`).
            keep: slots about to be overwritten anyway (their rows leave the sums through the write).
        """
        keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1).to(self.key.device)
        if self.sharded:
            keys = torch.cat(all_gather_rows(keys))
        elif keys.numel() == 0 or self.capacity == 0:
            return 0
        slots = self._slots_holding(keys, set() if keep is None else set(self._check_slots(keep).tolist()))
        delta_g, delta_c = self.G.new_zeros(self.G.shape), self.c.new_zeros(self.c.shape)
        if slots.numel():
            u = self.U[slots].double()
            delta_g, delta_c = -gram_of(u), -cross_of(u, self.V[slots].double())
            self._version += 1
            self.U[slots] = 0
            self.V[slots] = 0
            self.filled[slots] = False
            self.index[slots] = -1
            for key in self.key[slots].tolist():
                self._slot_of.pop(key, None)
            self.key[slots] = 0
            if self.inputs.numel():
                self.inputs[slots] = 0
        if slots.numel() or self.sharded:
            self._add_to_sums(delta_g, delta_c, 0, -slots.numel())
        return slots.numel()

    def _slots_holding(self, keys: torch.Tensor, keep: set[int]) -> torch.Tensor:
        """Filled slots (not in ``keep``) whose key is among ``keys``: a lookup per key in a key -> slot map, built
        from the buffers when needed and kept in step by every write, so a step costs O(B), not O(M)."""
        if self._slot_of is None:
            filled = self.filled.nonzero().squeeze(1)
            self._slot_of = dict(zip(self.key[filled].tolist(), filled.tolist()))
        found = {self._slot_of[k] for k in keys.tolist() if k in self._slot_of} - keep
        slots = torch.tensor(sorted(found), dtype=torch.long, device=self.key.device)
        return slots[self.filled[slots]] if slots.numel() else slots

    @torch.no_grad()
    def reset(self, max_capacity: int | None = None) -> None:
        """Drop every row and free the row storage (a growing cache of size 0 bounded by ``max_capacity``); G, c and
        the counts to zero. For a new fit on other data. Local (every rank resets at the same point)."""
        self._version += 1
        self.growing, self.max_capacity = True, None if max_capacity is None else int(max_capacity)
        self._slot_of = None
        for name in _ROW_BUFFERS:
            old = getattr(self, name)
            shape = (0,) if name == "inputs" else (0, *old.shape[1:])
            setattr(self, name, torch.zeros(shape, dtype=old.dtype, device=old.device))
        for name in ("G", "c", "total_filled", "rewritten", "updates"):
            getattr(self, name).zero_()

    @torch.no_grad()
    def bound(self, max_capacity: int | None) -> None:
        """Set ``max_capacity``; rows past it (from a checkpoint of a larger cache) are dropped and G, c recomputed
        (a :meth:`refresh`, a collective when sharded: every rank calls this at the same point)."""
        self.max_capacity = None if max_capacity is None else int(max_capacity)
        local = self.max_capacity is not None and self.capacity > self.max_capacity
        excess = torch.tensor(float(local), device=self.G.device)
        if self.sharded:
            all_reduce_(excess, op="max")  # every rank refreshes if any rank truncates
        if not bool(excess):
            return
        if local:
            self._slot_of = None
            for name in _ROW_BUFFERS:
                old = getattr(self, name)
                if name != "inputs" or old.numel():
                    setattr(self, name, old[: self.max_capacity].clone())
        self.refresh()

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        self._version += 1
        self._slot_of = None
        if prefix + "U" in state_dict and prefix + "key" not in state_dict:  # saved before keys existed
            state_dict[prefix + "key"] = torch.zeros(state_dict[prefix + "U"].shape[0], dtype=torch.long)
        for name in _ROW_BUFFERS:  # the cache may have grown (or lazily allocated inputs) since construction
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=incoming.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
