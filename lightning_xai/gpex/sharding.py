"""GPEX's inducing cache sharded over DDP processes: global row numbers, neighbour search, checkpoints.

Under DDP each rank caches the rows of the examples its sampler gives it, at slots numbered by position in its own
stream; G and c are all-reduced sums over every shard (:class:`~lightning_xai.gpex.cache.InducingCache` with
``sharded=True``). This module holds what needs all shards at once:

* **Global positions.** Local slot ``s`` on rank ``r`` of ``W`` is global position ``s·W + r``. That is the position
  in the interleaved stream a ``DistributedSampler`` deals from (rank r takes every W-th index), and in one process
  it is the slot itself, so explanations name the same thing whatever the world size.
* **Neighbours** (:func:`sharded_neighbours`): every rank's queries are gathered, each rank searches its own shard
  for all of them, and the per-shard top-k lists (scores, global positions, dataset indices, inputs) are gathered and
  merged by score, then position. The result equals a search of the whole training set. Traffic: the queries'
  features, plus W·k candidates (with their inputs) per query.
* **Checkpoints** (:func:`gather_rows`, :func:`shard_rows`): a checkpoint holds the cache in global-position order,
  independent of the world size it was saved from; a run restored on W' processes takes every W'-th row on each
  rank. G and c are global sums and are saved as they are. Gathering sends each rank's rows to every rank once per
  checkpoint (so the whole cache passes through each rank's memory while the checkpoint is written).
"""

from __future__ import annotations

import torch

from lightning_xai._core.distributed import all_gather_rows
from lightning_xai.gpex.surrogate import GPEXSurrogate

__all__ = ["gather_rows", "global_positions", "shard_rows", "sharded_neighbours"]

ROW_KEYS = ("U", "V", "filled", "index", "key", "inputs")


def global_positions(slots: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Global positions ``slot·world + rank`` of local ``slots`` (−1 stays −1)."""
    return torch.where(slots >= 0, slots * world + rank, slots)


def sharded_neighbours(
    surrogate: GPEXSurrogate, features: torch.Tensor, heads: torch.Tensor, k: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most similar cached examples over *all* shards for this rank's queries (a collective).

    Args:
        features: (B, L, D) this rank's query features; B may differ between ranks (and be 0).
        heads: (B,) the head each query is ranked on.

    Returns:
        ``(positions, scores, index, inputs)``: (B, k) global positions (−1: none), (B, k) float64 scores,
        (B, k) dataset indices (−1: unknown), and (B, k, ...) the neighbours' stored inputs (zeros where none).
    """
    cache = surrogate.cache
    device = cache.U.device
    queries = all_gather_rows(features.to(device, torch.float64))
    sizes = [q.shape[0] for q in queries]
    all_u = torch.cat(queries)
    all_heads = torch.cat(all_gather_rows(heads.to(device, torch.long)))
    slots, scores = surrogate.neighbours(features=all_u, k=k, head=all_heads)
    known = slots >= 0
    positions = global_positions(slots, rank, world)
    index = torch.where(known, cache.index[slots.clamp_min(0)], -1)
    inputs = _inputs_at(cache, slots)
    gathered = [all_gather_rows(t) for t in (scores, positions, index, inputs)]
    scores, positions, index, inputs = (torch.cat(parts, dim=1) for parts in gathered)  # (Q, W·k, ...)
    columns = _best_columns(scores, positions, k)
    rows = torch.arange(scores.shape[0], device=device)[:, None]
    scores, positions, index, inputs = (t[rows, columns] for t in (scores, positions, index, inputs))
    empty = torch.isinf(scores)
    positions, index = positions.masked_fill(empty, -1), index.masked_fill(empty, -1)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    return positions[mine], scores[mine], index[mine], inputs[mine]


def _inputs_at(cache, slots: torch.Tensor) -> torch.Tensor:
    """The stored inputs at local ``slots`` (Q, k, ...), zeros for −1 (or (Q, k, 0) if inputs are not stored)."""
    if cache.inputs.numel() == 0:
        return torch.zeros(*slots.shape, 0, device=slots.device)
    out = cache.inputs[slots.clamp_min(0)].clone()
    out[slots < 0] = 0
    return out


def _best_columns(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the columns of the k best candidates: descending score, ties to the lower global position."""
    by_position = positions.masked_fill(positions < 0, torch.iinfo(torch.long).max).argsort(dim=1, stable=True)
    order = torch.sort(scores.gather(1, by_position), dim=1, descending=True, stable=True).indices[:, :k]
    return by_position.gather(1, order)


def gather_rows(state: dict[str, torch.Tensor], world: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """The cache's row buffers from every rank, interleaved into global-position order (a collective).

    ``state`` is this rank's ``InducingCache.state_dict()`` (or a state holding it under ``prefix``, e.g. a
    surrogate's with ``prefix="cache."``); the returned dict is the same with ``U, V, filled, index, inputs`` replaced
    by the whole training set's rows (position ``s·W + r`` holds rank r's slot s).
    """
    out = dict(state)
    for key in (prefix + k for k in ROW_KEYS):
        local = state[key]
        if key.endswith("inputs") and local.dim() == 1 and local.numel() == 0:
            continue  # never allocated (no inputs stored)
        wire = local.to(torch.uint8) if local.dtype == torch.bool else local
        parts = all_gather_rows(wire)
        longest = max(p.shape[0] for p in parts)
        fill = -1 if key.endswith("index") else 0
        stacked = wire.new_full((longest, world, *wire.shape[1:]), fill)
        for r, part in enumerate(parts):
            stacked[: part.shape[0], r] = part
        rows = stacked.reshape(longest * world, *wire.shape[1:])
        out[key] = rows.bool() if local.dtype == torch.bool else rows
    return out


def shard_rows(state: dict[str, torch.Tensor], rank: int, world: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """This rank's share of a global-order cache state (keys under ``prefix``, as in :func:`gather_rows`): every
    ``world``-th row from ``rank`` (local slot = row // W)."""
    out = dict(state)
    for key in (prefix + k for k in ROW_KEYS):
        rows = state.get(key)
        if rows is None or (key.endswith("inputs") and rows.dim() == 1 and rows.numel() == 0):
            continue
        out[key] = rows[rank::world].clone()
    return out
