"""Every callback: a run stopped mid-epoch and resumed from its checkpoint ends with the explainer state of an
uninterrupted run, bit for bit.

Needs a stateful training loader (torchdata's StatefulDataLoader): Lightning then saves and restores the position
and shuffling state within the epoch; with a plain DataLoader the resumed epoch would restart its data."""

import lightning as L
import pytest
import torch
from conftest import assert_same, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN

torchdata = pytest.importorskip("torchdata.stateful_dataloader")

FACTORIES = {
    "cladec": lambda: ClaDec(layer="features.7", every_n_steps=2, probe_size=2),
    "linearization": lambda: Linearization(probe_size=2, metric_size=16, steps=4),
    "insens": lambda: Insens(probe_size=2, metric_size=16, steps=4),
    "gpex": lambda: GPEX(probe_size=2, every_n_steps=2),
    "dmmmen": lambda: DMMMEN(target_class=1, every_n_epochs=1, sweeps=20, refit_sweeps=5, progress=False),
}


class StatefulDigits(DigitsDataModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return torchdata.StatefulDataLoader(self.train_dataset, batch_size=32, shuffle=True, generator=generator)


def run(tmp_path, name, ckpt_path=None, checkpoint=None):
    L.seed_everything(0)
    callback = FACTORIES[name]()
    callbacks = [callback] + ([checkpoint] if checkpoint else [])
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=10, limit_val_batches=1,
                            callbacks=callbacks, enable_checkpointing=checkpoint is not None)
    trainer.fit(SmallCNN(), datamodule=StatefulDigits(), ckpt_path=ckpt_path)
    return callback


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_midepoch_resume_matches_uninterrupted(tmp_path, name):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1,
                            save_on_train_epoch_end=False, filename="{step}")
    full = run(tmp_path / "full", name, checkpoint=saver)
    mid = tmp_path / "ckpt" / "step=5.ckpt"
    assert torch.load(mid, weights_only=False)["callbacks"][full.state_key]["batches_seen"] == 5
    resumed = run(tmp_path / "resumed", name, ckpt_path=mid)
    a, b = full.state_dict(), resumed.state_dict()
    assert a["batches_seen"] == b["batches_seen"] == 10
    assert_same(a, b)
