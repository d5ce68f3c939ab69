"""Linearization and Insens as callbacks: exact figures logged once per epoch, untouched training, clear errors."""

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, read_events
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_xai import Insens, Linearization
from lightning_xai.data import BreastCancerDataModule, DigitsDataModule
from lightning_xai.models import MLP, SmallCNN


def fit(tmp_path, callbacks, model=None, datamodule=None, epochs=2, **kwargs):
    L.seed_everything(0)
    model = model or SmallCNN()
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks,
                            logger=TensorBoardLogger(tmp_path, name="", version=""), **kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule())
    return trainer, model


def test_digits_cnn_reports_exact_linearization_and_faithful_orderings(tmp_path):
    trainer, _ = fit(tmp_path, [Linearization(probe_size=3), Insens(probe_size=3)], epochs=3)
    scalars, images = read_events(tmp_path)
    assert images == {"linearization/probes": 3, "insens/probes": 3}
    last = {tag: values[-1][1] for tag, values in scalars.items()}
    assert last["linearization/residual_max"] < 1e-5 and last["linearization/gated"] == 0.0
    assert 0.0 <= last["linearization/bias_share"] <= 1.0
    assert last["linearization/deletion_auc_wx"] < last["linearization/deletion_auc_random"]
    assert last["linearization/insertion_auc_wx"] > last["linearization/insertion_auc_random"]
    assert last["insens/deletion_auc_insens"] < last["insens/deletion_auc_random"]
    fractions = [v for k, v in last.items() if k.startswith("insens/active_fraction_")]
    assert len(fractions) == 3 and all(0.0 < f < 1.0 for f in fractions)
    assert last["insens/r_min_median"] > 0
    assert all(len(values) == 3 for tag, values in scalars.items() if tag.startswith(("linearization/", "insens/")))


def test_attribution_callbacks_leave_the_training_trajectory_unchanged(tmp_path):
    states = []
    for callbacks in ([], [Linearization(metric_size=16, probe_size=2), Insens(metric_size=16, probe_size=2)]):
        _, model = fit(tmp_path / str(len(callbacks)), callbacks, limit_train_batches=4, limit_val_batches=2)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_gated_network_is_reported_as_such_and_insens_refuses_it_at_setup(tmp_path):
    class GeluNet(SmallCNN):
        def __init__(self):
            super().__init__()
            self.head[2] = nn.GELU()

    trainer, _ = fit(tmp_path, [Linearization(metric_size=16, probe_size=0)], model=GeluNet(), epochs=1,
                     limit_train_batches=2, limit_val_batches=1)
    assert trainer.callback_metrics["linearization/gated"] == 1.0
    assert trainer.callback_metrics["linearization/residual_max"] < 1e-4
    with pytest.raises(ValueError, match="piecewise-linear"):
        fit(tmp_path, [Insens()], model=GeluNet(), epochs=1, limit_train_batches=1)


def test_tabular_model_gets_bar_figures(tmp_path):
    fit(tmp_path, [Linearization(probe_size=2), Insens(probe_size=2)], model=MLP(),
        datamodule=BreastCancerDataModule(), epochs=1)
    _, images = read_events(tmp_path)
    assert images == {"linearization/probes": 1, "insens/probes": 1}


def test_metric_set_survives_a_checkpoint(tmp_path):
    trainer, _ = fit(tmp_path, [Linearization(metric_size=10)], epochs=1, limit_train_batches=2)
    state = trainer.callbacks[0].state_dict()
    restored = Linearization(metric_size=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.examples.inputs, trainer.callbacks[0].examples.inputs)
    assert restored.examples.inputs.shape[0] == 10


@pytest.mark.parametrize("factory, match", [
    (lambda: Linearization(mode="linear"), "mode='linear'"),
    (lambda: Insens(method="fast"), "method='fast'"),
    (lambda: Insens(maxpool_losers="maybe"), "maxpool_losers='maybe'"),
    (lambda: Linearization(steps=0), "steps=0"),
])
def test_bad_arguments_name_the_value(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_explain_after_a_checkpoint_load_takes_the_model():
    model = SmallCNN().eval()
    x = torch.rand(3, 1, 8, 8)
    for callback in (Linearization(), Insens()):
        with pytest.raises(RuntimeError, match="model="):
            callback.explain(x)
    lin = Linearization().explain(x, model=model)
    assert lin.residual(x).max() < 1e-5 and lin.weight.shape == (3, 10, 1, 8, 8)
    assert Insens().explain(x, model=model).map.shape == x.shape
