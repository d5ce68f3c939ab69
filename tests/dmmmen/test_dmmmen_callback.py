"""DMMMEN as a callback: fits during training, logs fidelity and the bootstrap tests, leaves training alone."""

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, read_events, scalars_on_one_and_two_processes
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai.data import DigitsDataModule
from lightning_xai.dmmmen.callback import DMMMEN
from lightning_xai.models import SmallCNN


def fit(tmp_path, callbacks, epochs=3, **kwargs):
    L.seed_everything(0)
    model = SmallCNN()
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks,
                            logger=TensorBoardLogger(tmp_path, name="", version=""), **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule())
    return trainer, model


def test_digits_surrogate_is_faithful_and_its_top_features_matter(tmp_path):
    dmm = DMMMEN(target_class=3, every_n_epochs=3, sweeps=300, refit_sweeps=100, progress=False)
    trainer, model = fit(tmp_path, [dmm], epochs=3)
    m = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dmmmen/")}
    assert m["r2"] > 0.5 and m["rmsd_prob"] < 0.25 and m["occupied"] >= 1
    # the paper's bootstrap tests: editing the surrogate's top features moves the network more than random ones
    assert m["pcr_nullification_top"] < m["pcr_nullification_random"]
    assert m["pcr_filling_top"] > m["pcr_filling_random"]
    assert m["pcr_new_cases_top"] > m["pcr_new_cases_random"]
    scalars, images = read_events(tmp_path)
    assert images == {"dmmmen/components": 2, "dmmmen/weights": 2}  # the report at epoch 3 and the final fit
    assert "dmmmen/final_r2" in scalars

    dm = DigitsDataModule()
    dm.setup()
    x = dm.val_dataset.tensors[0][:5]
    out = dmm.explain(x)
    assert out.coefficients.shape == (5, 1, 8, 8) and out.contributions.shape == (5, 1, 8, 8)
    restored = DMMMEN(target_class=3, every_n_epochs=3, sweeps=300, refit_sweeps=100, progress=False)
    restored.load_state_dict(trainer.callbacks[0].state_dict())
    again = restored.explain(x, model=model)
    assert torch.equal(again.coefficients, out.coefficients) and torch.equal(again.component, out.component)


def test_collecting_examples_leaves_the_training_trajectory_unchanged(tmp_path):
    states = []
    for callbacks in ([], [DMMMEN(every_n_epochs=1, sweeps=20, refit_sweeps=10, max_examples=50, progress=False)]):
        _, model = fit(tmp_path / str(len(callbacks)), callbacks, epochs=1, limit_train_batches=5, limit_val_batches=2)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"target_class": -1}, "target_class=-1"),
    ({"sweeps": 0}, "sweeps=0"),
    ({"time_budget": 0}, "time_budget=0"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMMMEN(**kwargs)


def test_user_given_features_are_the_only_ones_explained(tmp_path):
    corner = [0, 1, 8, 9]
    dmm = DMMMEN(target_class=0, feature_indices=corner + [27, 28, 35, 36], every_n_epochs=1, sweeps=50,
                 refit_sweeps=20, progress=False)
    fit(tmp_path, [dmm], epochs=1, limit_train_batches=5)
    dm = DigitsDataModule()
    dm.setup()
    maps = dmm.explain(dm.val_dataset.tensors[0][:3]).coefficients.flatten(1)
    kept = torch.zeros(64, dtype=torch.bool)
    kept[corner + [27, 28, 35, 36]] = True
    assert (maps[:, ~kept] == 0).all()


class AssertSameSurrogate(L.Callback):
    def __init__(self, dmm):
        self.dmm = dmm

    def on_train_end(self, trainer, pl_module):
        beta = self.dmm.surrogate.components.coefficients.float().flatten()
        gathered = pl_module.all_gather(beta)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree on the DMM-MEN fit"


@pytest.mark.slow
def test_ddp_gathers_the_reservoirs_and_shares_one_fit(tmp_path):
    dmm = DMMMEN(target_class=1, every_n_epochs=1, sweeps=60, refit_sweeps=20, progress=False)
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=6,
                            callbacks=[dmm, AssertSameSurrogate(dmm)],
                            logger=TensorBoardLogger(tmp_path, name="", version=""))
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    _, images = read_events(tmp_path)
    assert images == {"dmmmen/components": 2, "dmmmen/weights": 2}  # epoch report + final fit, rank zero only


@pytest.mark.slow
def test_two_processes_report_what_one_process_reports(tmp_path):
    """A DMM-MEN fitted during training, validated again on 2 processes and on 1: the pooled examples and metric sets
    are gathered into one canonical set, so the refit and its scalars are those of one process."""
    from torch.utils.data import DataLoader, TensorDataset

    dmm = DMMMEN(target_class=1, every_n_epochs=1, sweeps=40, refit_sweeps=10, progress=False, metric_size=256)
    _, model = fit(tmp_path / "fit", [dmm], epochs=1, limit_train_batches=8)
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.val_dataset.tensors
    loader = DataLoader(TensorDataset(x[:120], y[:120]), batch_size=20)

    single, double = scalars_on_one_and_two_processes(tmp_path, model, dmm, loader, ("dmmmen/",))
    assert len(single) >= 5 and set(single) == set(double)
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_non_finite_training_inputs_stay_out_of_the_reservoir():
    dmm = DMMMEN(target_class=1, sweeps=5, progress=False)
    x, y = torch.rand(6, 1, 8, 8), torch.ones(6, dtype=torch.long)
    x[2, 0, 3, 3], x[4, 0, 0, 0] = float("nan"), float("inf")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        dmm.train_batch(None, None, (x, y))
    dmm.train_batch(None, None, (x, y))  # warned once; counted again
    assert dmm.skipped_rows == 4 and dmm.pool.shape[0] == 8
    assert torch.isfinite(dmm.pool).all() and torch.equal(dmm.pool[:4], x[[0, 1, 3, 5]])
