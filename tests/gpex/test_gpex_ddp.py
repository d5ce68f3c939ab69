"""GPEX on two CPU processes (gloo): the inducing cache is sharded, the ranks agree on G, c and f after every step,
fidelity matches a single-process run, neighbours equal a brute-force search of the whole training set, and a
checkpoint written by two ranks resumes on one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, read_events
from digit_net import DigitNet
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai._core.distributed import all_gather_rows
from lightning_xai.data import DigitsDataModule
from lightning_xai.gpex import GPEX

EPOCHS = 12
N_TRAIN = 1256  # the digits training split less one: even, so the DistributedSampler pads with no duplicate
QUERIES = 6  # per rank, different on each rank


def data(batch_size: int):
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_dataset.tensors
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN], torch.arange(N_TRAIN))
    val = DataLoader(dm.val_dataset, batch_size=64)
    return DataLoader(train, batch_size=batch_size, shuffle=True), val, x[:N_TRAIN]


def by_index(batch):
    return batch[2]


class ShardWatch(Callback):
    """Runs in each worker after GPEX: compares G, c and the kernel net across ranks after every training batch;
    at the end saves this rank's shard size and an explanation of its own queries beside a brute-force ranking."""

    def __init__(self, out_dir, train_x: torch.Tensor, queries: torch.Tensor) -> None:
        self.out_dir, self.train_x, self.queries = out_dir, train_x, queries
        self.max_difference, self.compared = 0.0, 0

    @staticmethod
    def gpex(trainer) -> GPEX:
        return next(cb for cb in trainer.callbacks if isinstance(cb, GPEX))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = self.gpex(trainer).surrogate
        flat = torch.cat([s.cache.G.flatten(), s.cache.c.flatten()]
                         + [p.detach().double().flatten() for p in s.kernel_net.parameters()])
        mine, other = all_gather_rows(flat[None])
        self.max_difference = max(self.max_difference, float((mine - other).abs().max()))
        self.compared += 1

    def on_fit_end(self, trainer, pl_module):
        gpex, rank = self.gpex(trainer), trainer.global_rank
        queries = self.queries[rank * QUERIES : (rank + 1) * QUERIES]
        e = gpex.explain(queries, k=5)
        f = gpex.surrogate.kernel_net.eval()
        with torch.no_grad():
            u, u_all = f(queries).double(), f(self.train_x).double()
        rows = torch.arange(len(queries))
        scores = torch.einsum("bd,mbd->bm", u[rows, e.head], u_all[:, e.head])
        cache = gpex.surrogate.cache
        torch.save(
            {
                "rows": cache.num_filled,
                "compared": self.compared,
                "max_difference": self.max_difference,
                "explanation": e,
                "brute_force": scores.topk(5, dim=1),
            },
            self.out_dir / f"rank{rank}.pt",
        )


def fidelity_of(trainer) -> dict[str, float]:
    return {k: float(trainer.callback_metrics[f"gpex/{k}"]) for k in ("agreement", "pearson")}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """DigitNet co-trained with GPEX on 2 processes (batch 32 each) and, for comparison, on one (batch 64)."""
    root = tmp_path_factory.mktemp("gpex_ddp")
    train, val, train_x = data(batch_size=32)
    queries = val.dataset.tensors[0][: 2 * QUERIES]
    L.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="ddp")
    trainer = quiet_trainer(
        root, strategy="ddp_spawn", devices=2, max_epochs=EPOCHS, enable_checkpointing=True,
        callbacks=[GPEX(index_fn=by_index, probe_size=3), ShardWatch(root, train_x, queries), checkpoints],
        logger=TensorBoardLogger(root / "logs", name="", version=""),
    )  # fmt: skip
    trainer.fit(DigitNet(), train, val)
    ddp = fidelity_of(trainer)

    single_train, single_val, _ = data(batch_size=64)
    L.seed_everything(0)
    single_trainer = quiet_trainer(root / "single", max_epochs=EPOCHS, callbacks=[GPEX(index_fn=by_index)])
    single_trainer.fit(DigitNet(), single_train, single_val)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"root": root, "ddp": ddp, "single": fidelity_of(single_trainer), "ranks": ranks, "queries": queries,
            "train_x": train_x, "ckpt": root / "ckpt" / "ddp.ckpt"}


@pytest.mark.slow
def test_each_rank_holds_half_the_rows_and_the_ranks_agree_after_every_step(two_ranks):
    for rank in two_ranks["ranks"]:
        assert rank["rows"] == N_TRAIN // 2
        assert rank["compared"] == EPOCHS * 20  # ceil(628 / 32) batches per epoch
        assert rank["max_difference"] == 0.0  # G, c and every kernel-net parameter bit-identical


@pytest.mark.slow
def test_fidelity_matches_one_process(two_ranks):
    ddp, single = two_ranks["ddp"], two_ranks["single"]
    print(f"GPEX fidelity after {EPOCHS} epochs: 2 processes {ddp}, 1 process {single}")
    assert ddp["agreement"] >= 0.97 and ddp["pearson"] >= 0.97
    assert abs(ddp["agreement"] - single["agreement"]) <= 0.01
    assert abs(ddp["pearson"] - single["pearson"]) <= 0.01
    _, images = read_events(two_ranks["root"] / "logs")
    assert images == {"gpex/neighbours": EPOCHS}  # one panel per epoch, from rank zero


@pytest.mark.slow
def test_neighbours_equal_brute_force_over_the_whole_training_set(two_ranks):
    train_x = two_ranks["train_x"]
    for rank in two_ranks["ranks"]:
        e, (scores, index) = rank["explanation"], rank["brute_force"]
        assert torch.equal(e.neighbours, index)  # dataset indices, found across both shards
        assert torch.allclose(e.scores, scores, rtol=0, atol=1e-9)
        assert torch.equal(e.examples, train_x[index])  # the examples themselves, from whichever rank held them


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(two_ranks, tmp_path):
    state = torch.load(two_ranks["ckpt"], weights_only=False)
    (gpex_state,) = [v for k, v in state["callbacks"].items() if k.startswith("GPEX")]
    cache = {k[len("cache.") :]: v for k, v in gpex_state["surrogate"].items() if k.startswith("cache.")}
    assert int(cache["filled"].sum()) == N_TRAIN  # both shards, gathered
    assert sorted(cache["index"][cache["filled"]].tolist()) == list(range(N_TRAIN))
    u = cache["U"][cache["filled"]].double()
    assert torch.allclose(cache["G"], torch.einsum("mld,mle->lde", u, u), atol=1e-8)

    # restored on one process, the surrogate explains exactly as the two ranks did
    restored = GPEX(index_fn=by_index)
    restored.load_state_dict(gpex_state)
    model = DigitNet()
    model.load_state_dict(state["state_dict"])
    for r, rank in enumerate(two_ranks["ranks"]):
        queries = two_ranks["queries"][r * QUERIES : (r + 1) * QUERIES]
        e, expected = restored.explain(queries, k=5, model=model), rank["explanation"]
        assert torch.equal(e.mean, expected.mean) and torch.equal(e.neighbours, expected.neighbours)
        assert torch.equal(e.examples, expected.examples)
        assert torch.allclose(e.scores, expected.scores, rtol=0, atol=1e-12)  # another batch shape: BLAS rounding

    # and training goes on from it on one process
    train, val, _ = data(batch_size=64)
    gpex = GPEX(index_fn=by_index)
    trainer = quiet_trainer(tmp_path, max_epochs=EPOCHS + 1, callbacks=[gpex])
    trainer.fit(DigitNet(), train, val, ckpt_path=two_ranks["ckpt"])
    assert gpex.surrogate.cache.num_filled == N_TRAIN
    assert fidelity_of(trainer)["agreement"] >= 0.97
