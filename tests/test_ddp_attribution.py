"""Linearization and Insens under DDP on CPU (gloo): the scalars of two processes, each on half of the validation
set, equal those of one process on all of it; images are written once per epoch."""

import lightning as L
import pytest
from conftest import quiet_trainer, read_events
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import Insens, Linearization
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN

# the random ordering is drawn per process, and a median of per-process medians is not the median: not compared
NOT_COMPARED = ("random", "r_min_median")


def validate(tmp_path, model, loader, **kwargs):
    callbacks = [Linearization(metric_size=64, probe_size=2, steps=5), Insens(metric_size=64, probe_size=2, steps=5)]
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, logger=TensorBoardLogger(tmp_path, name="", version=""),
                            **kwargs)
    trainer.validate(model, loader, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("linearization/", "insens/"))}


@pytest.mark.slow
def test_two_processes_report_what_one_process_reports(tmp_path):
    L.seed_everything(0)
    dm = DigitsDataModule()
    model = SmallCNN()
    quiet_trainer(tmp_path, max_epochs=2).fit(model, datamodule=dm)
    x, y = dm.val_dataset.tensors
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=10)

    single = validate(tmp_path / "single", model, loader)
    double = validate(tmp_path / "ddp", model, loader, strategy="ddp_spawn", devices=2)
    compared = [k for k in single if not any(word in k for word in NOT_COMPARED)]
    assert len(compared) > 15 and set(single) == set(double)
    for key in compared:
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    _, images = read_events(tmp_path / "ddp")
    assert images == {"linearization/probes": 1, "insens/probes": 1}
