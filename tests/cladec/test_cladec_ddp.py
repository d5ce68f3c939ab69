"""ClaDec under DDP on CPU (gloo): decoders stay identical on both ranks, images are written once, and two processes
report the scalars one process reports."""

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, read_events, scalars_on_one_and_two_processes
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import ClaDec
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN


class AssertRanksAgree(L.Callback):
    """Inside the workers (ddp_spawn returns no callback state): every rank holds the same ClaDec weights."""

    def __init__(self, cladec: ClaDec) -> None:
        self.cladec = cladec

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in self.cladec.core.parameters()])
        gathered = pl_module.all_gather(flat)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), "ClaDec modules differ across ranks"
        assert self.cladec.steps == 3 * (trainer.current_epoch + 1)


@pytest.mark.slow
def test_cladec_ddp_two_cpu_processes(tmp_path):
    L.seed_everything(0)
    cladec = ClaDec(layer="features.7", every_n_steps=2, probe_size=2)
    trainer = quiet_trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2, limit_train_batches=6, limit_val_batches=2,
        callbacks=[cladec, AssertRanksAgree(cladec)], logger=TensorBoardLogger(tmp_path, name="", version=""),
    )
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    scalars, images = read_events(tmp_path)
    assert images == {"cladec/probes": 2}  # rank zero only, once per epoch
    assert len(scalars["cladec/rec_loss"]) == 2 and len(scalars["refae/rec_loss"]) == 2


@pytest.mark.slow
def test_two_processes_score_what_one_process_scores(tmp_path):
    """A trained ClaDec validated on 2 processes (each scoring half of the validation set) reports the scalars one
    process reports on all of it."""
    L.seed_everything(0)
    dm = DigitsDataModule()
    model = SmallCNN()
    cladec = ClaDec(layer="features.7", every_n_steps=1, probe_size=2, metric_size=128)
    quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=8, callbacks=[cladec]).fit(model, datamodule=dm)
    x, y = dm.val_dataset.tensors
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=10)

    single, double = scalars_on_one_and_two_processes(tmp_path, model, cladec, loader, ("cladec/", "refae/"))
    assert len(single) >= 4 and set(single) == set(double)
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_rank_whose_validation_rows_are_all_nan_still_reports_with_the_others(tmp_path):
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_dataset.tensors
    vx, vy = dm.val_dataset.tensors
    vx = vx[:32].clone()
    vx[1::2] = float("nan")  # rank 1's shard (DistributedSampler, no shuffle) holds only NaN images
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(vx, vy[:32]), batch_size=8)
    trainer = quiet_trainer(tmp_path, max_epochs=1, strategy="ddp_spawn", devices=2,
                            callbacks=[ClaDec(every_n_steps=1, probe_size=2)])
    trainer.fit(SmallCNN(), train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["cladec/skipped"] == 16.0  # rank 1's rows, counted over both ranks
    assert metrics["cladec/rec_loss"] == metrics["cladec/rec_loss"] and metrics["cladec/rec_loss"] > 0  # rank 0's
