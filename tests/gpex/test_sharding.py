"""The sharded inducing cache on two gloo processes, checked against one cache holding every row."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_xai.gpex.cache import InducingCache
from lightning_xai.gpex.sharding import gather_rows, shard_rows, sharded_neighbours
from lightning_xai.gpex.surrogate import GPEXSurrogate

L, D, WORLD, PER_RANK = 3, 4, 2, 40


class Features(torch.nn.Module):
    """Inputs are already features (B, L, D): the kernel net is the identity."""

    heads, dim = L, D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def rows(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=g), torch.randn(n, L, generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        gp = GPEXSurrogate(Features(), noise=1.0, store_inputs=True, sharded=True, refresh_every=None)
        u, v = rows(rank, PER_RANK)
        for part in torch.arange(PER_RANK).split(16):  # rank r's slot s is global position s·2 + r
            gp.cache.write(part, u[part], v[part], inputs=u[part], index=part * WORLD + rank + 100)
        overwritten, _ = rows(10 + rank, 5)
        first = torch.arange(5)
        gp.cache.write(first, overwritten, v[:5], inputs=overwritten, index=first * WORLD + rank + 100)
        gp.cache.write(torch.zeros(0, dtype=torch.long), torch.zeros(0, L, D), torch.zeros(0, L))  # nothing to add
        after_writes = (gp.cache.G.clone(), gp.cache.c.clone())
        gp.cache.refresh()
        queries = rows(20 + rank, 3 + rank)[0]  # the ranks ask different numbers of questions
        heads = torch.arange(queries.shape[0]) % L
        found = sharded_neighbours(gp, queries, heads, 6, rank, WORLD)
        cache_state = {k[len("cache.") :]: v for k, v in gp.state_dict().items() if k.startswith("cache.")}
        whole = gather_rows(cache_state, WORLD)
        again = shard_rows(whole, rank, WORLD)
        torch.save(
            {
                "after_writes": after_writes,
                "refreshed": (gp.cache.G, gp.cache.c, gp.cache.total_filled),
                "found": found,
                "queries": (queries, heads),
                "whole": whole,
                "reshard_equal": all(torch.equal(again[k], cache_state[k]) for k in ("U", "V", "filled", "index")),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference() -> GPEXSurrogate:
    """One unsharded cache holding both ranks' final rows at their global positions."""
    gp = GPEXSurrogate(Features(), noise=1.0, store_inputs=True, refresh_every=None)
    for rank in range(WORLD):
        u, v = rows(rank, PER_RANK)
        u[:5] = rows(10 + rank, 5)[0]
        slots = torch.arange(PER_RANK) * WORLD + rank
        gp.cache.write(slots, u, v, inputs=u, index=slots + 100)
    return gp


def test_ranks_agree_on_sums_over_every_shard(ranks):
    ref = reference()
    for r in ranks:
        G, c = r["after_writes"]
        assert torch.allclose(G, ref.cache.G, atol=1e-10) and torch.allclose(c, ref.cache.c, atol=1e-10)
        G, c, total = r["refreshed"]
        assert torch.allclose(G, ref.cache.G, atol=1e-10) and torch.allclose(c, ref.cache.c, atol=1e-10)
        assert float(total) == WORLD * PER_RANK
    assert torch.equal(ranks[0]["refreshed"][0], ranks[1]["refreshed"][0])  # bit-identical on both ranks


def test_neighbours_merge_the_shards(ranks):
    ref = reference()
    for rank, r in enumerate(ranks):
        positions, scores, index, inputs = r["found"]
        queries, heads = r["queries"]
        slots, expected = ref.neighbours(features=queries, k=6, head=heads)
        assert torch.equal(positions, slots)  # in one cache, global positions are slots
        assert torch.allclose(scores, expected, rtol=0, atol=1e-12)
        assert torch.equal(index, slots + 100) and torch.equal(inputs, ref.cache.inputs[slots])


def test_checkpoint_rows_are_in_global_order_and_reshard(ranks):
    ref = reference()
    for r in ranks:
        whole = r["whole"]
        for key in ("U", "V", "filled", "index", "inputs"):
            assert torch.equal(whole[key], getattr(ref.cache, key)[: whole[key].shape[0]]), key
        assert r["reshard_equal"]


def test_one_process_reads_a_two_process_state(ranks):
    whole = dict(ranks[0]["whole"])
    single = shard_rows(whole, 0, 1)
    cache = InducingCache(L, D, store_inputs=True)
    cache.load_state_dict(single)
    ref = reference().cache
    assert cache.num_filled == ref.num_filled and torch.allclose(cache.G, ref.G, atol=1e-10)
