"""A validation's scalars and images land on one step of TensorBoard's slider."""

from conftest import NestedNet, loaders, quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xai import Linearization


def test_scalars_and_images_of_one_validation_share_a_step(tmp_path):
    train, val = loaders(n_train=64, n_val=32, batch_size=16, as_dict=True)
    logger = TensorBoardLogger(tmp_path, name="", version="run")
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=logger,
                            callbacks=[Linearization(probe_size=2, metric_size=8, steps=3)])
    trainer.fit(NestedNet(), train, val)
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    scalar_steps = [e.step for e in events.Scalars("linearization/bias_share")]
    image_steps = [e.step for e in events.Images("linearization/probes")]
    assert len(scalar_steps) == 2 and scalar_steps == image_steps
