"""GPEX's inducing cache stays bounded and holds each example once: streams without epoch ends, mid-epoch
validation, fits stopped mid-epoch, new fits on other data."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import digits_tensors, quiet_trainer
from digit_net import DigitNet
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_xai.gpex import GPEX, InducingCache
from lightning_xai.gpex.cache import fingerprint
from lightning_xai.gpex.callback import STREAM_MAX_INDUCING


class RandomStream(IterableDataset):
    """An endless stream of distinct random 1×8×8 examples (example i from seed i), as an IterableDataset."""

    def __iter__(self):
        i = 0
        while True:
            g = torch.Generator().manual_seed(i)
            yield torch.rand(1, 8, 8, generator=g), torch.randint(0, 10, (), generator=g)
            i += 1

    @staticmethod
    def example(i: int) -> torch.Tensor:
        return torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i))


class CyclingStream(IterableDataset):
    """An endless stream that cycles over a few examples (a set of 40 repeated forever)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        i = 0
        while True:
            yield self.x[i % len(self.x)], self.y[i % len(self.x)]
            i += 1


def cached_inputs(gpex: GPEX) -> torch.Tensor:
    cache = gpex.surrogate.cache
    return cache.inputs[cache.filled]


def distinct_rows(rows: torch.Tensor) -> int:
    return torch.unique(rows.flatten(1), dim=0).shape[0]


def assert_sums_describe_the_rows(cache: InducingCache) -> None:
    """G and c equal UᵀU and UᵀV over the filled rows (after evictions, nothing stale is left in the sums)."""
    u, v = cache.U[cache.filled].double(), cache.V[cache.filled].double()
    torch.testing.assert_close(cache.G, torch.einsum("bld,ble->lde", u, u), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache.c, torch.einsum("bld,bl->ld", u, v), rtol=1e-9, atol=1e-9)
    assert float(cache.total_filled) == cache.num_filled


def test_stream_without_epoch_end_fills_a_ring_of_max_inducing_rows(tmp_path):
    gpex = GPEX(probe_size=1, max_inducing=100)
    trainer = quiet_trainer(tmp_path, max_steps=10, callbacks=[gpex], limit_val_batches=0)
    trainer.fit(DigitNet(), DataLoader(RandomStream(), batch_size=32))
    cache = gpex.surrogate.cache
    assert gpex._rows_per_rank == 100 and cache.capacity == 100 and cache.num_filled == 100
    # the ring holds the 100 most recent of the 320 examples streamed, each once
    expected = torch.stack([RandomStream.example(i) for i in range(220, 320)])
    assert set(fingerprint(cached_inputs(gpex)).tolist()) == set(fingerprint(expected).tolist())
    assert_sums_describe_the_rows(cache)


def test_stream_default_bound_and_a_repeating_stream_is_cached_once(tmp_path):
    x, y = digits_tensors(40)
    gpex = GPEX(probe_size=1)
    trainer = quiet_trainer(tmp_path, max_steps=10, callbacks=[gpex], limit_val_batches=0)
    trainer.fit(DigitNet(), DataLoader(CyclingStream(x, y), batch_size=16))
    assert gpex._rows_per_rank == STREAM_MAX_INDUCING == 65_536
    inputs = cached_inputs(gpex)
    assert inputs.shape[0] == distinct_rows(inputs) == distinct_rows(x) == 40  # 160 streamed, 40 distinct
    assert_sums_describe_the_rows(gpex.surrogate.cache)


def test_default_bound_is_the_training_set_length_and_storage_never_exceeds_it(tmp_path):
    x, y = digits_tensors(200)
    gpex = GPEX(probe_size=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[gpex], limit_val_batches=0)
    trainer.fit(DigitNet(), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    cache = gpex.surrogate.cache
    assert gpex._rows_per_rank == 200 and cache.capacity == 200 and cache.num_filled == 200  # not 256 (doubling)
    assert cache.U.shape[0] == cache.inputs.shape[0] == cache.key.shape[0] == 200


def test_mid_epoch_validation_sees_no_duplicate_rows(tmp_path):
    x, y = digits_tensors(320)
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=32)
    gpex = GPEX(probe_size=1)
    seen = []

    class Spy(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            rows = cached_inputs(gpex)
            seen.append((rows.shape[0], distinct_rows(rows)))
            assert_sums_describe_the_rows(gpex.surrogate.cache)

    L.seed_everything(0)
    quiet_trainer(tmp_path, max_epochs=3, val_check_interval=0.5, callbacks=[gpex, Spy()]).fit(DigitNet(), train, val)
    assert len(seen) == 6
    assert all(n == distinct for n, distinct in seen), seen  # was 61 duplicates of 256 at the second epoch's middle
    assert [n for n, _ in seen][1::2] == [256, 256, 256]  # the end of every epoch: the whole training set


def test_a_new_fit_starts_a_fresh_cache_and_a_stopped_fit_leaves_no_duplicates(tmp_path):
    x, y = digits_tensors(900)
    big = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=32, shuffle=True)
    small = DataLoader(TensorDataset(x[600:856], y[600:856]), batch_size=32, shuffle=True)
    gpex = GPEX(probe_size=1)
    # two epochs and a half of the big set: max_steps stops mid-epoch
    quiet_trainer(tmp_path, max_steps=40, callbacks=[gpex], limit_val_batches=0).fit(DigitNet(), big)
    rows = cached_inputs(gpex)
    assert rows.shape[0] == distinct_rows(rows)
    steps = gpex.steps
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[gpex], limit_val_batches=0).fit(DigitNet(), small)
    rows = cached_inputs(gpex)
    assert gpex.steps == steps + 8  # the kernel net carries on learning
    assert rows.shape[0] == distinct_rows(rows) == 256 and gpex.surrogate.cache.capacity == 256
    small_keys = set(fingerprint(x[600:856]).tolist())
    assert set(fingerprint(rows).tolist()) == small_keys  # no row of the earlier, larger fit is left
    assert_sums_describe_the_rows(gpex.surrogate.cache)


def test_dataset_indices_identify_examples_and_max_inducing_is_checked(tmp_path):
    x, y = digits_tensors(96)
    index = torch.arange(96) + 500
    loader = DataLoader(TensorDataset(x, y, index), batch_size=32, shuffle=True)
    gpex = GPEX(probe_size=1, index_fn=lambda batch: batch[2], max_inducing=64)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[gpex], limit_val_batches=0).fit(DigitNet(), loader)
    cache = gpex.surrogate.cache
    names = cache.index[cache.filled]
    assert cache.capacity == 64 and names.numel() == names.unique().numel() == 64
    assert torch.equal(cache.key[cache.filled], names)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"max_inducing={bad!r}"):
            GPEX(max_inducing=bad)


def test_eviction_subtracts_exactly_and_fingerprints_follow_the_bits():
    g = torch.Generator().manual_seed(0)
    cache = InducingCache(2, 3, store_inputs=True, max_capacity=8)
    x = torch.rand(6, 4, generator=g, dtype=torch.float64)
    keys = fingerprint(x)
    assert torch.equal(keys, fingerprint(x.clone())) and keys.unique().numel() == 6
    assert torch.equal(fingerprint(x[2:4]), keys[2:4])  # a row's key does not depend on its batch
    cache.write(torch.arange(6), torch.randn(6, 2, 3, generator=g), torch.randn(6, 2, generator=g), x, keys=keys)
    assert cache.evict(keys[[1, 4]], keep=torch.tensor([4])) == 1  # slot 4 is about to be overwritten: kept
    assert cache.filled.tolist() == [True, False, True, True, True, True, False, False]
    assert_sums_describe_the_rows(cache)
    with pytest.raises(IndexError, match="max_capacity=8"):
        cache.write(torch.tensor([8]), torch.zeros(1, 2, 3), torch.zeros(1, 2))
    cache.reset(4)
    assert cache.capacity == 0 and cache.num_filled == 0 and float(cache.G.abs().sum()) == 0


def test_resume_in_the_middle_of_a_reshuffled_epoch_is_bit_exact(tmp_path):
    """Mid-epoch of the second epoch the cache evicts the previous epoch's copies; a run resumed there (the key ->
    slot map rebuilt from the checkpoint) ends with the uninterrupted run's cache, bit for bit."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = digits_tensors(192)

    def run(root, ckpt_path=None, saver=None):
        L.seed_everything(0)
        gpex = GPEX(probe_size=1, every_n_steps=2)
        loader = stateful.StatefulDataLoader(TensorDataset(x[:160], y[:160]), batch_size=32, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        trainer = quiet_trainer(root, max_epochs=2, callbacks=[gpex] + ([saver] if saver else []),
                                enable_checkpointing=saver is not None, limit_val_batches=0)
        trainer.fit(DigitNet(), loader, ckpt_path=ckpt_path)
        return gpex

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1,
                            save_on_train_epoch_end=False, filename="{step}")
    full = run(tmp_path / "full", saver=saver)
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "step=7.ckpt")  # 2 batches into epoch 2
    a, b = full.surrogate.state_dict(), resumed.surrogate.state_dict()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    rows = cached_inputs(full)
    assert rows.shape[0] == distinct_rows(rows) == 160
