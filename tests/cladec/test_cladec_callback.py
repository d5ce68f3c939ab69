"""ClaDec as a callback: it learns, logs what it promises, and never touches the classifier."""

import logging

import lightning as L
import pytest
import torch
from conftest import NestedNet, loaders, quiet_trainer, read_events
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai import ClaDec
from lightning_xai._core import LayerNotFoundError
from lightning_xai.data import BreastCancerDataModule, DigitsDataModule
from lightning_xai.models import MLP, SmallCNN


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_classifier_trajectory_is_identical_with_and_without_cladec(tmp_path):
    """Parameters, BatchNorm buffers and the RNG stream: a fit with ClaDec (alpha > 0) ends bit-identical."""
    finals = []
    for callbacks in ([], [ClaDec(alpha=0.5, every_n_steps=1), ClaDec(layer="features.7", every_n_steps=2)]):
        L.seed_everything(0)
        model = SmallCNN()
        trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=2, callbacks=callbacks)
        trainer.fit(model, datamodule=DigitsDataModule())
        finals.append(snapshot(model))
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_one_step_leaves_parameters_gradients_and_buffers_alone():
    model = SmallCNN().train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()  # the user's accumulated gradients
    state, grads = snapshot(model), {n: p.grad.clone() for n, p in model.named_parameters()}
    cladec = ClaDec(alpha=0.7, activation_mode="eval").attach(model)
    cladec.fit_step(x, y=y)
    cladec.fit_step(x)  # alpha > 0 without targets: the classifier's own predictions
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert model.training and all(m.training for m in model.modules())


def test_unseen_module_nested_names_dict_batches_and_learning(tmp_path):
    train, val = loaders(n_train=640, as_dict=True)
    L.seed_everything(0)
    cladec = ClaDec(layer="backbone.block2", every_n_steps=1, probe_size=3)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(tmp_path, max_epochs=5, callbacks=[cladec], logger=logger)
    trainer.fit(NestedNet(), train, val)
    scalars, images = read_events(tmp_path)
    rec = [v for _, v in sorted(scalars["cladec/rec_loss"])]
    assert len(rec) == 5
    assert rec[-1] < 0.6 * rec[0], rec
    for tag in ("refae/rec_loss", "cladec/acc_on_recon", "refae/acc_on_recon", "cladec/agreement", "cladec/rec_ratio"):
        assert len(scalars[tag]) == 5, tag
    assert images == {"cladec/probes": 5}
    assert cladec.explain(torch.rand(2, 1, 8, 8)).cladec.shape == (2, 1, 8, 8)


def test_default_layer_is_last_hidden_and_several_callbacks_get_distinct_tags(tmp_path, caplog):
    lightning_log = logging.getLogger("lightning.pytorch")  # does not propagate to the root logger
    lightning_log.addHandler(caplog.handler)
    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    callbacks = [ClaDec(probe_size=1), ClaDec(layer="features.3", probe_size=1, refae=False)]
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=8, callbacks=callbacks, logger=logger)
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    assert callbacks[0].tap.name == "head.3" and callbacks[0].tap.capture == "input"
    lightning_log.removeHandler(caplog.handler)
    assert "decoding the input of 'head.3' (Linear)" in caplog.text
    scalars, images = read_events(tmp_path)
    assert {"cladec-default/rec_loss", "refae-default/rec_loss", "cladec-features.3/rec_loss"} <= set(scalars)
    assert "refae-features.3/rec_loss" not in scalars
    assert set(images) == {"cladec-default/probes", "cladec-features.3/probes"}
    assert callbacks[0].state_key != callbacks[1].state_key


def test_misspelt_layer_fails_at_setup_with_closest_names(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[ClaDec(layer="feature.7")])
    with pytest.raises(LayerNotFoundError, match="'features.7'"):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule())


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"activation_mode": "live"}, "activation_mode='live'"),
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"output_activation": "relu"}, "output_activation='relu'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClaDec(**kwargs)


def test_tabular_inputs_get_a_bar_figure(tmp_path):
    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    cladec = ClaDec(probe_size=2, every_n_steps=1)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[cladec], logger=logger)
    trainer.fit(MLP(), datamodule=BreastCancerDataModule())
    scalars, images = read_events(tmp_path)
    assert images == {"cladec/probes": 2}
    assert cladec.core is not None and cladec._shapes["output_activation"] == "identity"  # standardised features
    assert len(scalars["cladec/rec_loss"]) == 2


def test_checkpoint_round_trip_restores_explanations_bit_for_bit(tmp_path):
    L.seed_everything(0)
    model, cladec = SmallCNN(), ClaDec(layer="features.7", every_n_steps=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=5, limit_val_batches=1, callbacks=[cladec])
    trainer.fit(model, datamodule=DigitsDataModule())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # callback state is tensors and plain types only
    x = torch.rand(4, 1, 8, 8)
    expected = cladec.explain(x)
    restored_model = SmallCNN()
    restored_model.load_state_dict(checkpoint["state_dict"])
    fresh = ClaDec(layer="features.7", every_n_steps=1)
    fresh.load_state_dict(checkpoint["callbacks"][fresh.state_key])
    got = fresh.explain(x, model=restored_model)
    assert torch.equal(got.cladec, expected.cladec) and torch.equal(got.refae, expected.refae)
    assert fresh.state_dict()["core"].keys() == cladec.state_dict()["core"].keys()


class UnshuffledDigits(DigitsDataModule):
    """Lightning does not checkpoint the global RNG, so a shuffling loader reshuffles differently after a resume."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=self.batch_size)


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    """Stop after epoch 1, resume from the checkpoint, and end with the same decoder and optimizer state."""
    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        cladec = ClaDec(layer="features.7", every_n_steps=2)
        trainer = quiet_trainer(
            tmp_path, max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=1, callbacks=[cladec]
        )
        trainer.fit(SmallCNN(), datamodule=UnshuffledDigits(), ckpt_path=ckpt_path)
        return trainer, cladec

    full_trainer, full = run(2)
    half_trainer, _ = run(1)
    half_trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = run(2, ckpt_path=tmp_path / "epoch1.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a["steps"] == b["steps"] == 4 and a["batches_seen"] == b["batches_seen"] == 8
    for key in a["core"]:
        assert torch.equal(a["core"][key], b["core"][key]), key
    assert torch.equal(a["probe"]["inputs"], b["probe"]["inputs"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_activation_mode_train_rejects_mismatched_capture(tmp_path):
    class Augmenting(SmallCNN):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(torch.cat([x, x.flip(-1)])), torch.cat([y, y]))

    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[ClaDec(every_n_steps=1)])
    with pytest.raises(RuntimeError, match="activation_mode='eval'"):
        trainer.fit(Augmenting(), datamodule=DigitsDataModule())
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                            callbacks=[ClaDec(every_n_steps=1, activation_mode="eval")])
    trainer.fit(Augmenting(), datamodule=DigitsDataModule())
