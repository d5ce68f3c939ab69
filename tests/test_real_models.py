"""All five callbacks on architectures the library never saw (torchvision ResNet-18, MobileNetV3-small, a ViT; random
weights, 3×32×32): a two-epoch fit runs, or a callback refuses at set-up naming the module and why."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _vision import torchvision_models
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization

pytestmark = pytest.mark.slow


class Classifier(L.LightningModule):
    """Any torchvision classifier as a LightningModule (the callbacks never see this wrapper's code)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _vit(models) -> nn.Module:
    vit = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                   mlp_dim=64, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
    return vit


NETS = {
    "resnet18": (lambda m: m.resnet18(weights=None, num_classes=10), "exact"),
    "mobilenet_v3_small": (lambda m: m.mobilenet_v3_small(weights=None, num_classes=10), "gated-linear"),
    "vit": (_vit, "gated-linear"),
}


def _callbacks() -> list[L.Callback]:
    small = {"probe_size": 2, "metric_size": 8, "steps": 3}
    return [ClaDec(), GPEX(probe_size=2), Linearization(**small), Insens(samples=8, **small),
            DMMMEN(sweeps=10, refit_sweeps=3, every_n_epochs=1, progress=False)]


@pytest.mark.parametrize("name", sorted(NETS))
def test_all_five_callbacks_on_a_real_architecture(tmp_path, name):
    build, mode = NETS[name]
    torch.manual_seed(0)
    model = Classifier(build(torchvision_models()))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    val = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=16)
    callbacks = _callbacks()
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    if mode != "exact":  # Insens has no switching hyperplanes to offer: it refuses at set-up, naming the modules
        with pytest.raises(ValueError, match=r"net\.\S+.*smooth units"):
            trainer.fit(model, train, val)
        callbacks = [cb for cb in _callbacks() if not isinstance(cb, Insens)]
        trainer = L.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["linearization/gated"] == float(mode == "gated-linear")
    assert metrics["linearization/residual_max"] < 1e-4
    for prefix in ("cladec/", "gpex/", "dmmmen/") + (("insens/",) if mode == "exact" else ()):
        scalars = {k: v for k, v in metrics.items() if k.startswith(prefix)}
        assert scalars, f"no {prefix} scalars"
        assert all(v == v for v in scalars.values()), f"NaN among {scalars}"
