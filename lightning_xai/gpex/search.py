"""Exact top-k neighbour search over the inducing cache, in chunks with a running top-k.

GPEX explains a prediction by the cached training examples most similar to the query under one head's kernel (raw
``u*ᵀũ_m``). The search scores the cache chunk by chunk, so memory is O(B·chunk), never O(B·M), and it orders ties
deterministically (descending score, then ascending slot), whatever the chunking: a shard's answer then merges with
the other shards' into exactly the one-process answer (:mod:`lightning_xai.gpex.sharding`).
"""

from __future__ import annotations

import torch

from lightning_xai.gpex.cache import InducingCache

__all__ = ["top_k_slots"]


def _chunk_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, a set of (score, column) pairs that contains every entry that can be in the top k, ties included.

    ``topk`` alone picks arbitrarily among entries tied with the k-th; taking every finite entry at least as large
    as the k-th keeps all of them, so the caller's exact (score, slot) ordering decides.
    """
    kth = scores.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]
    keep = int(((scores >= kth) & torch.isfinite(scores)).sum(1).max())
    values, columns = scores.topk(keep, dim=1)
    return values, columns


def _top_by_score_then_slot(scores: torch.Tensor, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best pairs per row ordered by descending score, then ascending slot (a deterministic order)."""
    by_slot = slots.argsort(dim=1)
    scores, slots = scores.gather(1, by_slot), slots.gather(1, by_slot)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), slots.gather(1, order)


def top_k_slots(
    cache: InducingCache, u: torch.Tensor, heads: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k filled slots of ``cache`` with the largest ``u[b, h_b]ᵀ U[m, h_b]`` per query b, and their scores.

    Args:
        cache: the inducing cache searched (its filled slots only).
        u: (B, L, D) float64 query features, on the cache's device.
        heads: (B,) the head each query is ranked on, on the cache's device.
        k: number of neighbours.
        chunk: cache rows scored at once.

    Returns:
        ``(slots, scores)``, both (B, k), best first; slot −1 and score −inf pad the tail when fewer are filled.
    """
    b = u.shape[0]
    device = cache.U.device
    best_s = torch.full((b, 0), -float("inf"), dtype=torch.float64, device=device)
    best_i = torch.full((b, 0), -1, dtype=torch.long, device=device)
    rows_by_head = [(h, (heads == h).nonzero().squeeze(1)) for h in heads.unique().tolist()]
    for start in range(0, cache.capacity, chunk):
        stop = min(start + chunk, cache.capacity)
        filled = cache.filled[start:stop]
        if not bool(filled.any()):
            continue
        scores = torch.empty(b, stop - start, dtype=torch.float64, device=device)
        for h, rows in rows_by_head:
            scores[rows] = u[rows, h] @ cache.U[start:stop, h].to(torch.float64).T
        scores.masked_fill_(~filled, -float("inf"))
        cand_s, cand_i = _chunk_candidates(scores, k)
        best_s, best_i = _top_by_score_then_slot(
            torch.cat([best_s, cand_s], dim=1), torch.cat([best_i, cand_i + start], dim=1), k
        )
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = torch.cat([best_s, best_s.new_full((b, pad), -float("inf"))], dim=1)
        best_i = torch.cat([best_i, best_i.new_full((b, pad), -1)], dim=1)
    best_i = best_i.masked_fill(torch.isinf(best_s), -1)
    return best_i, best_s
