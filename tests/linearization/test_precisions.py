"""Linearization and Insens under every precision Lightning offers on CPU: no crash, finite scalars, and the
exactness check still meaningful (true precisions run the network in their dtype)."""

import math

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import Insens, Linearization
from lightning_xai.models import SmallCNN

PRECISIONS = ["32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_attribution_callbacks_under_each_precision(tmp_path, precision):
    torch.manual_seed(0)
    x, y = torch.rand(48, 1, 8, 8), torch.randint(0, 10, (48,))
    train, val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16), DataLoader(TensorDataset(x[32:], y[32:]),
                                                                                        batch_size=16)
    small = {"probe_size": 2, "metric_size": 8, "steps": 3}
    trainer = quiet_trainer(tmp_path, max_epochs=1, precision=precision,
                            callbacks=[Linearization(**small), Insens(**small)])
    trainer.fit(SmallCNN(), train, val)
    scalars = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("linearization/", "insens/"))}
    assert scalars and all(math.isfinite(v) for v in scalars.values()), scalars
    bound = {"64-true": 1e-12, "bf16-true": 5e-2}.get(precision, 1e-5)
    assert scalars["linearization/residual_max"] < bound
