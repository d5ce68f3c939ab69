"""A callback's identity is its fitted configuration: twins attach side by side, a checkpoint restores only into the
callback it was fitted for (a changed identity fails at load naming the arguments, a changed safe argument applies
with an info line), and the order of the callbacks never matters."""

import logging
import math

import pytest
import torch
from conftest import assert_same, quiet_trainer, read_events
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN


def tiny_loaders(n_train=64, n_val=16, batch_size=16, nan_rows=()):
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup()
    x, y = dm.train_dataset.tensors
    vx, vy = (t.clone() for t in dm.val_dataset.tensors[:2])
    vx, vy = vx[:n_val], vy[:n_val]
    for row in nan_rows:
        vx[row, 0, 0, 0] = float("nan")
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size)
    return train, DataLoader(TensorDataset(vx, vy), batch_size=batch_size)


def dmmmen(target_class, **kwargs):
    return DMMMEN(target_class=target_class, every_n_epochs=1, sweeps=10, refit_sweeps=5, n_features=16,
                  metric_size=16, max_examples=64, progress=False, **kwargs)


def cladec(alpha, **kwargs):
    return ClaDec(alpha=alpha, every_n_steps=1, probe_size=1, metric_size=16, **kwargs)


@pytest.fixture
def lightning_log(caplog):
    """caplog, also seeing Lightning's rank-zero info lines (the ``lightning.pytorch`` logger does not propagate)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO):
        yield caplog
    logger.removeHandler(caplog.handler)


def fit(tmp_path, callbacks, max_epochs=1, ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    train, val = kwargs.pop("loaders", None) or tiny_loaders()
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(SmallCNN(), train, val, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Two ClaDec alphas and two DMM-MEN classes fitted side by side for one epoch (beside a GPEX and a
    Linearization), and their checkpoint."""
    root = tmp_path_factory.mktemp("four")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest's one-thread fixture is per test: a module fixture runs before it
    callbacks = [cladec(0.0), cladec(0.5), dmmmen(0), dmmmen(1), GPEX(probe_size=2), Linearization(probe_size=2,
                                                                                                   metric_size=8)]
    trainer = fit(root, callbacks, logger=TensorBoardLogger(root, name="", version=""))
    trainer.save_checkpoint(root / "four.ckpt")
    torch.set_num_threads(threads)
    return root, callbacks, trainer


def test_twins_attach_without_names_and_log_under_distinct_prefixes(four):
    root, callbacks, trainer = four
    assert len({cb.state_key for cb in callbacks}) == 6
    assert [cb.prefix for cb in callbacks[:4]] == ["cladec-alpha=0.0", "cladec-alpha=0.5",
                                               "dmmmen-target_class=0", "dmmmen-target_class=1"]
    assert [cb.refae_prefix for cb in callbacks[:2]] == ["refae-alpha=0.0", "refae-alpha=0.5"]
    scalars, _ = read_events(root)
    for prefix in ("cladec-alpha=0.0", "cladec-alpha=0.5", "dmmmen-target_class=0", "dmmmen-target_class=1"):
        assert any(tag.startswith(prefix + "/") for tag in scalars), prefix
    assert callbacks[2].target_class == 0 and callbacks[3].target_class == 1
    saved = torch.load(root / "four.ckpt", weights_only=False)["callbacks"]
    assert saved[callbacks[1].state_key]["config"]["alpha"] == 0.5
    assert saved[callbacks[3].state_key]["config"]["target_class"] == 1


def test_reversed_order_restores_each_state_into_its_own_callback(four, tmp_path):
    root, _, _ = four
    saved = torch.load(root / "four.ckpt", weights_only=False)["callbacks"]
    reversed_callbacks = [Linearization(probe_size=2, metric_size=8), GPEX(probe_size=2), dmmmen(1), dmmmen(0),
                          cladec(0.5), cladec(0.0)]
    fit(tmp_path, reversed_callbacks, ckpt_path=root / "four.ckpt")  # max_epochs reached: restore only
    for callback in reversed_callbacks:
        assert_same(callback.state_dict(), saved[callback.state_key])
    assert reversed_callbacks[2].fits == saved[reversed_callbacks[2].state_key]["fits"] >= 1


def test_resume_with_a_changed_target_class_fails_naming_it(four, tmp_path):
    root, _, _ = four
    with pytest.raises(ValueError, match=r"target_class: saved 1, now 3") as error:
        fit(tmp_path, [dmmmen(3), cladec(0.0), cladec(0.5), dmmmen(0)], max_epochs=2, ckpt_path=root / "four.ckpt")
    assert "target_class: saved 0" not in str(error.value)  # DMMMEN(target_class=0) found its own state


def test_resume_with_a_changed_alpha_fails_and_so_does_a_changed_layer(four, tmp_path):
    root, _, _ = four
    with pytest.raises(ValueError, match=r"alpha: saved 0.5, now 0.25"):
        fit(tmp_path, [cladec(0.0), cladec(0.25)], max_epochs=2, ckpt_path=root / "four.ckpt")
    lone = tmp_path / "lone"
    fit(lone, [Linearization(metric_size=4, probe_size=2, steps=2)]).save_checkpoint(lone / "a.ckpt")
    with pytest.raises(ValueError, match=r"mode: saved 'auto', now 'exact'"):
        fit(lone, [Linearization(mode="exact", metric_size=4, probe_size=2, steps=2)], max_epochs=2,
            ckpt_path=lone / "a.ckpt")


def test_resume_with_a_changed_learning_rate_applies_it_and_says_so(four, tmp_path, lightning_log):
    root, _, _ = four
    callbacks = [cladec(0.0, lr=1e-3), cladec(0.5)]
    fit(tmp_path, callbacks, max_epochs=2, limit_train_batches=1, ckpt_path=root / "four.ckpt")
    assert "lr: saved 0.005, now 0.001" in lightning_log.text
    assert [g["lr"] for g in callbacks[0]._optimizer.param_groups] == [1e-3] * len(callbacks[0]._optimizer.param_groups)
    assert all(g["lr"] == 5e-3 for g in callbacks[1]._optimizer.param_groups)


def test_resume_with_a_smaller_probe_set_keeps_its_first_examples(tmp_path, lightning_log):
    first = Linearization(probe_size=4, metric_size=8, steps=2)
    fit(tmp_path, [first]).save_checkpoint(tmp_path / "a.ckpt")
    second = Linearization(probe_size=2, metric_size=8, steps=2)
    fit(tmp_path, [second], ckpt_path=tmp_path / "a.ckpt")
    assert "probe_size: saved 4, now 2" in lightning_log.text
    assert second.probe.size == 2 and torch.equal(second.probe.inputs, first.probe.inputs[:2])


def test_a_checkpoint_without_a_saved_configuration_loads_with_a_warning(tmp_path):
    first = Linearization(probe_size=2, metric_size=8, steps=2)
    fit(tmp_path, [first]).save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    state = checkpoint["callbacks"].pop(first.state_key)
    del state["config"], state["validations"]
    checkpoint["callbacks"]["Linearization{'layer': None, 'name': None}"] = state  # the key of earlier versions
    torch.save(checkpoint, tmp_path / "old.ckpt")
    second = Linearization(probe_size=2, metric_size=8, steps=2)
    with pytest.warns(UserWarning, match="does not record the configuration"):
        fit(tmp_path, [second], ckpt_path=tmp_path / "old.ckpt")
    assert torch.equal(second.examples.inputs, first.examples.inputs)
    assert second.validations == checkpoint["epoch"] == 1  # without the count: the checkpoint's epoch, 1 finished


def test_a_state_saved_without_a_newer_argument_is_adopted_with_a_warning(tmp_path):
    first = Linearization(probe_size=2, metric_size=8, steps=2, seed=3)
    fit(tmp_path, [first]).save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    state = checkpoint["callbacks"].pop(first.state_key)
    del state["config"]["seed"]  # as if saved by a version before the argument existed
    checkpoint["callbacks"]["Linearization{'mode': 'auto', 'name': None}"] = state
    torch.save(checkpoint, tmp_path / "old.ckpt")
    second = Linearization(probe_size=2, metric_size=8, steps=2, seed=3)
    with pytest.warns(UserWarning, match=r"seed: saved '<absent>', now 3"):
        fit(tmp_path, [second], ckpt_path=tmp_path / "old.ckpt")
    assert torch.equal(second.examples.inputs, first.examples.inputs)


def test_every_n_epochs_counts_validation_runs(tmp_path):
    callback = Linearization(probe_size=0, metric_size=4, steps=2, every_n_epochs=2)
    reports = []
    original = callback.report

    def report(trainer, pl_module):
        reports.append(trainer.current_epoch)
        original(trainer, pl_module)

    callback.report = report
    fit(tmp_path, [callback], max_epochs=8, limit_train_batches=1, check_val_every_n_epoch=2, num_sanity_val_steps=1)
    assert callback.validations == 4
    assert reports == [3, 7]  # every 2nd validation: training epochs 4 and 8 (0-based 3 and 7)


@pytest.mark.parametrize("factory", [Linearization, Insens])
def test_one_nan_validation_image_leaves_every_epoch_finite(tmp_path, factory):
    callback = factory(probe_size=2, metric_size=16, steps=2)
    name = callback.method
    with pytest.warns(UserWarning, match="NaN/Inf"):
        fit(tmp_path, [callback], max_epochs=3, limit_train_batches=1, loaders=tiny_loaders(nan_rows=(1,)),
            logger=TensorBoardLogger(tmp_path, name="", version=""))
    scalars, _ = read_events(tmp_path)
    ours = {tag: points for tag, points in scalars.items() if tag.startswith(f"{name}/")}
    assert len(ours) > 5
    for tag, points in ours.items():
        assert len(points) == 3 and all(math.isfinite(v) for _, v in points), (tag, points)
    assert [v for _, v in ours[f"{name}/skipped"]] == [1.0, 1.0, 1.0]
    assert len(callback.examples) == 15 and callback.examples.skipped == 1
