"""ClaDec under DDP on CPU (gloo): decoders stay identical on both ranks and images are written once."""

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, read_events
from lightning.pytorch.loggers import TensorBoardLogger

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
