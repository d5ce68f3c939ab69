"""The classifier the benchmarks explain: SmallCNN trained briefly on the bundled digits (seed 0)."""

from __future__ import annotations

import lightning as L

from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN


def trained_digits_cnn(epochs: int) -> tuple[SmallCNN, DigitsDataModule]:
    """SmallCNN fitted on digits for ``epochs`` epochs from seed 0, in eval mode, and its set-up datamodule."""
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule()
    model = SmallCNN()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    dm.setup()
    return model.eval(), dm
