"""The Hydra default callback set on a model one method cannot explain: that method is skipped with a warning, the
others run; selected explicitly, the method fails at set-up naming the modules."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from lightning_xai.train import train

TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0", "+trainer.enable_progress_bar=false", "logger=none"]


def _compose(run_dir, *overrides):
    with initialize_config_module(version_base="1.3", config_module="lightning_xai.configs"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.run.dir = cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _no_hydra_leftovers():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    HydraConfig.instance().cfg = None


def test_default_set_skips_insens_on_a_smooth_network_and_runs_the_rest(tmp_path):
    cfg = _compose(tmp_path, "model=mlp", "model.activation=gelu", "data=breast_cancer",
                   "callbacks.dmmmen.sweeps=20", "callbacks.dmmmen.refit_sweeps=5", *TINY)
    with pytest.warns(UserWarning, match=r"Insens is skipped .*GELU|Insens is skipped .*net\.\d"):
        metrics = train(cfg)
    assert not any(name.startswith("insens/") for name in metrics)
    assert metrics["linearization/gated"] == 1.0 and metrics["linearization/residual_max"] < 1e-4
    assert any(name.startswith("gpex/") for name in metrics) and any(name.startswith("cladec/") for name in metrics)


def test_explicit_insens_on_a_smooth_network_fails_at_setup_naming_the_modules(tmp_path):
    cfg = _compose(tmp_path, "model=mlp", "model.activation=silu", "data=breast_cancer", "callbacks=[insens]", *TINY)
    with pytest.raises(ValueError, match=r"net\.2"):
        train(cfg)
