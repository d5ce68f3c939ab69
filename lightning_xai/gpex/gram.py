"""The Gram sums of the GPEX inducing cache, ``G = UᵀU`` and ``c = UᵀV`` per head, and how row changes move them.

:class:`GramSums` (a base of :class:`~lightning_xai.gpex.cache.InducingCache`) holds the arithmetic on the sums, apart
from the row storage: a change added to them (packed and all-reduced when the cache is sharded over processes), the
full recompute from the stored rows (:meth:`GramSums.refresh`), and the sums with a batch's rows swapped in or left
out (:meth:`GramSums.swap`, returning a :class:`RowSwap`), which both a matching step and a write use, so the
write adds exactly the change the step computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_xai._core.distributed import all_reduce_

__all__ = ["GramSums", "RowSwap"]

_REFRESH_CHUNK = 4096


def gram_of(u: torch.Tensor) -> torch.Tensor:
    """Per-head Gram ``Σ_b u_b u_bᵀ`` of ``(B, L, D)`` rows, ``(L, D, D)``."""
    return torch.einsum("bld,ble->lde", u, u)


def cross_of(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-head ``Σ_b u_b v_b`` of ``(B, L, D)`` rows and ``(B, L)`` targets, ``(L, D)``."""
    return torch.einsum("bld,bl->ld", u, v)


@dataclass
class RowSwap:
    """One batch of rows about to replace the cached rows at ``slots``: G and c with and without them (float64).

    Made by :meth:`InducingCache.swap`; passing it to :meth:`InducingCache.write` with the same rows writes them
    with the change ``delta_g``, ``delta_c`` it already holds instead of recomputing it. Nothing in it carries
    gradient: :class:`~lightning_xai.gpex.surrogate.GPEXSurrogate` differentiates through the new rows analytically,
    knowing ``G = G_without + rowsᵀrows`` and ``c = c_without + rowsᵀtargets`` per head.

    Attributes:
        slots: (B,) the distinct slots.
        rows: (B, L, D) and ``targets`` (B, L): the new rows, detached.
        G, c: the sums with the new rows in place of the stored ones.
        G_without, c_without: the sums without the batch's rows at all.
        delta_g, delta_c: ``G − G_cache`` and ``c − c_cache``: what writing the rows adds to the sums.
        version: the cache's change count when made (a change in between makes the swap stale).
    """

    slots: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    G: torch.Tensor
    c: torch.Tensor
    G_without: torch.Tensor
    c_without: torch.Tensor
    delta_g: torch.Tensor
    delta_c: torch.Tensor
    version: int


class GramSums:
    """The sums ``G`` (L, D, D) and ``c`` (L, D) of a cache's rows and their updates (float64).

    Uses the cache's buffers ``U``, ``V``, ``G``, ``c``, ``filled``, ``total_filled`` and ``rewritten``, its
    ``heads``, ``dim``, ``sharded``, ``capacity``, the upper-triangle indices ``_triu``, the change count ``_version``
    and ``_check_slots``.
    """

    heads: int
    dim: int
    sharded: bool
    _version: int
    _triu: tuple[torch.Tensor, torch.Tensor]

    def _add_to_sums(self, delta_g: torch.Tensor, delta_c: torch.Tensor, written: int, newly_filled: int) -> None:
        """Add a change of G and c (and of the counts) to the sums; all-reduced first when sharded."""
        self._version += 1
        if self.sharded:
            rows, cols = self._triu
            counts = delta_c.new_tensor([written, newly_filled])
            upper = delta_g[:, rows, cols]  # G is symmetric: its upper triangle is all a change needs to send
            packed = torch.cat([upper.reshape(-1), delta_c.reshape(-1), counts])
            all_reduce_(packed)
            n = upper.numel()
            upper = packed[:n].view_as(upper)
            delta_g = delta_g.new_zeros(delta_g.shape)
            delta_g[:, rows, cols] = upper
            delta_g[:, cols, rows] = upper
            delta_c = packed[n : n + delta_c.numel()].view_as(delta_c)
            written, newly_filled = float(packed[-2]), float(packed[-1])
        self.G.add_(delta_g)
        self.c.add_(delta_c)
        self.rewritten += written
        self.total_filled += newly_filled

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute ``G = UᵀU`` and ``c = UᵀV`` from all filled rows (chunked, float64; summed over shards)."""
        self._version += 1
        self.G.zero_()
        self.c.zero_()
        for start in range(0, self.capacity, _REFRESH_CHUNK):
            rows = slice(start, start + _REFRESH_CHUNK)
            filled = self.filled[rows]
            u = self.U[rows][filled].double()  # one float64 copy of the chunk's filled rows
            self.G.add_(gram_of(u))
            self.c.add_(cross_of(u, self.V[rows][filled].double()))
        self.total_filled.fill_(float(self.filled.sum()))
        self.rewritten.zero_()
        if self.sharded:
            packed = torch.cat([self.G.reshape(-1), self.c.reshape(-1), self.total_filled.reshape(1)])
            all_reduce_(packed)
            self.G.copy_(packed[: self.G.numel()].view_as(self.G))
            self.c.copy_(packed[self.G.numel() : -1].view_as(self.c))
            self.total_filled.copy_(packed[-1])

    # ------------------------------------------------------------------ training-time view
    def effective(
        self, slots: torch.Tensor, u_grad: torch.Tensor, v_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """G and c with the rows at ``slots`` replaced by ``u_grad``, gradients flowing only through ``u_grad``.

        ``G_eff = sg(G − U_IᵀU_I) + u_gradᵀu_grad`` and ``c_eff = sg(c − U_IᵀV_I) + u_gradᵀv_rows`` (float64), where
        ``U_I, V_I`` are the stored rows (zero for empty slots). Nothing is written.
        """
        swap = self.swap(slots, u_grad, v_rows)
        u64 = u_grad.to(torch.float64)
        return swap.G_without + gram_of(u64), swap.c_without + cross_of(u64, swap.targets.to(torch.float64))

    @torch.no_grad()
    def swap(self, slots: torch.Tensor, u_rows: torch.Tensor, v_rows: torch.Tensor) -> RowSwap:
        """The sums with the rows at ``slots`` replaced by ``u_rows`` (and targets ``v_rows``), and without them.

        The stored and the new rows' Grams come from one batched product. Nothing is written and nothing carries
        gradient; pass the result to :meth:`write` with the same rows to store them without recomputing the change.

        Args:
            slots: (B,) distinct slot numbers (slots past the end count as empty).
            u_rows: (B, L, D) the new feature rows.
            v_rows: (B, L) their targets.

        Raises:
            ValueError: if ``slots`` repeats a slot (its stored row would be subtracted twice).
        """
        slots = self._check_slots(slots)
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("slots must be distinct")
        u_rows, v_rows = u_rows.detach(), v_rows.detach()
        b = slots.numel()
        rows = torch.zeros(2, b, self.heads, self.dim, dtype=torch.float64, device=self.U.device)
        targets = torch.zeros(2, b, self.heads, dtype=torch.float64, device=self.U.device)
        known = slots < self.capacity
        if bool(known.all()):
            rows[0], targets[0] = self.U[slots], self.V[slots]
        else:
            rows[0, known], targets[0, known] = self.U[slots[known]].double(), self.V[slots[known]].double()
        rows[1], targets[1] = u_rows, v_rows
        heads_first = rows.permute(0, 2, 3, 1).reshape(2 * self.heads, self.dim, b)  # (2L, D, B): stored, new
        grams = torch.bmm(heads_first, heads_first.mT).view(2, self.heads, self.dim, self.dim)
        crosses = torch.bmm(heads_first, targets.permute(0, 2, 1).reshape(2 * self.heads, b, 1))
        crosses = crosses.view(2, self.heads, self.dim)
        g_without, c_without = self.G - grams[0], self.c - crosses[0]
        return RowSwap(
            slots=slots,
            rows=u_rows,
            targets=v_rows,
            G=g_without + grams[1],
            c=c_without + crosses[1],
            G_without=g_without,
            c_without=c_without,
            delta_g=grams[1] - grams[0],
            delta_c=crosses[1] - crosses[0],
            version=self._version,
        )

    def _swap_applies(self, swap: RowSwap, slots: torch.Tensor, u_rows: torch.Tensor, v_rows: torch.Tensor) -> bool:
        """Whether ``swap`` was made for these rows, stored exactly as given, on the cache as it is now."""
        return (
            swap.version == self._version
            and u_rows.dtype == self.U.dtype
            and v_rows.dtype == self.V.dtype
            and torch.equal(swap.slots, slots)
            and torch.equal(swap.rows, u_rows)
            and torch.equal(swap.targets, v_rows)
        )
