"""Every callback under odd set-ups: no validation, no logger, a CSV logger, fit twice, fast_dev_run, tiny data,
unexpected batches, NaN inputs."""

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization
from lightning_xai._core import BatchFormatError
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN

FACTORIES = {
    "cladec": lambda: ClaDec(every_n_steps=1, probe_size=4),
    "linearization": lambda: Linearization(probe_size=4, metric_size=16, steps=4),
    "insens": lambda: Insens(probe_size=4, metric_size=16, steps=4),
    "gpex": lambda: GPEX(probe_size=4, neighbours=3),
    "dmmmen": lambda: DMMMEN(target_class=1, every_n_epochs=1, sweeps=20, refit_sweeps=5, progress=False),
}


def digits_loaders(n_train=96, n_val=32, batch_size=16):
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup()
    x, y = dm.train_dataset.tensors
    vx, vy = dm.val_dataset.tensors
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(vx[:n_val], vy[:n_val]), batch_size=batch_size)
    return train, val


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_validation_no_logger_and_fit_twice(tmp_path, name):
    callback = FACTORIES[name]()
    train, val = digits_loaders()
    model = SmallCNN()
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], limit_val_batches=0).fit(model, train, val)
    for _ in range(2):  # the same callback (and model) through two fits: state carries on, nothing breaks
        trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
        trainer.fit(model, train, val)
        assert any(k.startswith(f"{name}/") for k in trainer.callback_metrics)
    trainer.fit(model, train, val)  # and again on a finished trainer: max_epochs reached, a no-op


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_csv_logger_gets_scalars_and_fast_dev_run_works(tmp_path, name):
    train, val = digits_loaders()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[FACTORIES[name]()], logger=CSVLogger(tmp_path))
    trainer.fit(SmallCNN(), train, val)
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert f"{name}/" in header
    quiet_trainer(tmp_path, fast_dev_run=True, callbacks=[FACTORIES[name]()]).fit(SmallCNN(), train, val)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fewer_validation_examples_than_probes(tmp_path, name):
    callback = FACTORIES[name]()
    train, val = digits_loaders(n_val=3, batch_size=2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    trainer.fit(SmallCNN(), train, val)
    assert len(callback.probe) == min(3, callback.probe.size)  # DMM-MEN draws no probe examples (size 0)
    assert any(k.startswith(f"{name}/") for k in trainer.callback_metrics)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_unexpected_batches_say_how_to_pass_input_fn(tmp_path, name):
    class ListBatches(SmallCNN):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["pixels"], batch["digit"]), batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().validation_step((batch["pixels"], batch["digit"]), batch_idx)

    class Pixels(torch.utils.data.Dataset):  # dict examples with keys the defaults do not know
        def __init__(self, loader):
            self.x, self.y = loader.dataset.tensors

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"pixels": self.x[i], "digit": self.y[i]}

    def as_dicts(loader):
        return DataLoader(Pixels(loader), batch_size=16)

    train, val = digits_loaders()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[FACTORIES[name]()])
    with pytest.raises(BatchFormatError, match="input_fn"):
        trainer.fit(ListBatches(), as_dicts(train), as_dicts(val))


def test_nan_inputs_leave_out_the_bad_rows_and_keep_the_cladec_decoder_finite():
    model = SmallCNN().eval()
    cladec = ClaDec(activation_mode="eval").attach(model)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    cladec.fit_step(x, y=y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        cladec.fit_step(bad, y=y)  # row 0 is left out, the other 7 are used
    assert cladec.skipped == 1 and cladec.skipped_steps == 0 and cladec.steps == 2
    before = {k: v.clone() for k, v in cladec.core.state_dict().items()}
    with pytest.warns(UserWarning, match="NaN/Inf"):
        cladec.fit_step(torch.full_like(x, float("nan")), y=y)  # no usable row: the step is skipped whole
    assert cladec.skipped == 9 and cladec.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in cladec.core.state_dict().items())
    assert all(torch.isfinite(v).all() for v in cladec.core.state_dict().values())

def test_a_layer_that_never_runs_is_reported(tmp_path):
    class Spare(SmallCNN):
        def __init__(self):
            super().__init__()
            self.spare = torch.nn.Linear(3, 3)

    train, val = digits_loaders()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[ClaDec(layer="spare", every_n_steps=1)])
    with pytest.raises(RuntimeError, match="captured nothing"):
        trainer.fit(Spare(), train, val)
    trainer = quiet_trainer(tmp_path, max_epochs=1,
                            callbacks=[ClaDec(layer="spare", every_n_steps=1, activation_mode="eval")])
    with pytest.raises(RuntimeError, match="never ran"):
        trainer.fit(Spare(), train, val)
