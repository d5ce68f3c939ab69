"""A validation's scalars and images land on one step of TensorBoard's slider; the CUSTOM SCALARS tab pairs curves."""

import re

from conftest import NestedNet, loaders, quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_xai import ClaDec, Linearization


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


def test_custom_scalar_layout_pairs_the_curves_of_each_callback(tmp_path):
    train, val = loaders(n_train=64, n_val=32, batch_size=16, as_dict=True)
    logger = TensorBoardLogger(tmp_path, name="", version="run")
    callbacks = [ClaDec(every_n_steps=1, probe_size=2), ClaDec(alpha=0.5, every_n_steps=1, probe_size=2),
                 Linearization(probe_size=2, metric_size=8, steps=3)]
    trainer = quiet_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=callbacks)
    trainer.fit(NestedNet(), train, val)
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    events.Reload()
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    categories = {c.title: c for c in layout.category}
    assert set(categories) == {cb.prefix for cb in callbacks}
    scalar_tags = set(events.Tags()["scalars"])
    for category in categories.values():
        for chart in category.chart:
            matched = {t for t in scalar_tags for pattern in chart.multiline.tag if re.fullmatch(pattern, t)}
            assert len(matched) >= 2, (category.title, chart.title)  # each chart overlays at least two curves
