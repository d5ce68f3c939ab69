"""The callbacks' scalars under DDP (2 CPU processes, gloo): no Lightning ``sync_dist`` warning per scalar, no
collective per scalar, and the same value in ``callback_metrics`` on every rank."""

from __future__ import annotations

import json
import re
import sys

import lightning as L
import pytest
import torch
from conftest import loaders, quiet_trainer

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization
from lightning_xai.models import SmallCNN

PREFIXES = ("cladec/", "refae/", "linearization/", "insens/", "dmmmen/", "gpex/")


class UnsyncedCNN(SmallCNN):
    """SmallCNN whose own scalars need no reduction by Lightning's logging (a torchmetrics metric, a step-level
    loss), so any reduction it runs would be one for the callbacks' scalars; and one unsynchronised epoch-level
    scalar of its own, ``control/unsynced``, whose warning shows that the ranks' warnings are seen."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, on_epoch=True)
        self.log("control/unsynced", 1.0, on_epoch=True)


class RankRecord(L.Callback):
    """Counts the reductions that Lightning's logging (``logger_connector/result.py``) asks the strategy for, and
    writes each rank's explainer scalars and that count to ``<folder>/rank<r>.json`` at the end of the fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.logging_reductions = 0

    def setup(self, trainer, pl_module, stage):
        reduce = trainer.strategy.reduce

        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            self.logging_reductions += caller.endswith("logger_connector/result.py")
            return reduce(*args, **kwargs)

        trainer.strategy.reduce = counted

    def on_fit_end(self, trainer, pl_module):
        scalars = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(PREFIXES)}
        record = {"scalars": scalars, "logging_reductions": self.logging_reductions}
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(record, handle)


def five_callbacks() -> list[L.Callback]:
    return [
        ClaDec(every_n_steps=1, metric_size=32, probe_size=2),
        Linearization(metric_size=32, probe_size=2, steps=5),
        Insens(metric_size=32, probe_size=2, steps=5),
        DMMMEN(sweeps=20, refit_sweeps=10, metric_size=32, every_n_epochs=1, progress=False, n_features=16),
        GPEX(probe_size=2),
    ]


@pytest.mark.slow
def test_two_processes_log_the_callbacks_scalars_without_warnings_or_collectives(tmp_path, capfd):
    L.seed_everything(0)
    torch.set_num_threads(1)
    train, val = loaders(n_train=128, n_val=64, batch_size=32)
    trainer = quiet_trainer(tmp_path, callbacks=[*five_callbacks(), RankRecord(str(tmp_path))], max_epochs=1,
                            strategy="ddp_spawn", devices=2)
    trainer.fit(UnsyncedCNN(), train, val)
    err = capfd.readouterr().err  # the spawned ranks write their warnings to the inherited stderr

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    logged = sorted(ranks[0]["scalars"])
    assert {name.split("/")[0] + "/" for name in logged} == set(PREFIXES), logged  # all five reported
    assert len(logged) > 40
    warned = re.findall(r"It is recommended to use `self\.log\('([^']+)', \.\.\., sync_dist=True\)`", err)
    assert warned == ["control/unsynced"]  # once (Lightning warns once per name), and none for the callbacks
    assert [r["logging_reductions"] for r in ranks] == [0, 0]
    # the premise of logging without a reduction: each scalar is already the same number on both ranks
    assert ranks[1]["scalars"] == ranks[0]["scalars"]
