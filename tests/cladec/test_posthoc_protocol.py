"""Post-hoc ClaDec: decoders fitted to a frozen, trained classifier, and the paper's fresh-classifier protocol."""

import lightning as L
import torch
from conftest import quiet_trainer

from lightning_xai import ClaDec
from lightning_xai.cladec.protocol import paper_protocol
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN
from lightning_xai.posthoc import fit_explainers


def test_fit_explainers_leaves_the_model_alone_and_the_protocol_reports_every_source(tmp_path):
    L.seed_everything(0)
    dm = DigitsDataModule()
    model = SmallCNN()
    quiet_trainer(tmp_path, max_epochs=2).fit(model, datamodule=dm)
    model.train()
    model.head.eval()  # a user-chosen mix of modes must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}

    cladecs = [ClaDec(layer="features.7", every_n_steps=1, probe_size=0, activation_mode=mode, name=mode)
               for mode in ("train", "eval")]
    trainer = fit_explainers(model, dm, cladecs, epochs=2, accelerator="cpu", logger=False,
                             enable_progress_bar=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.head.training and model.features.training
    # frozen model: "train" capture sees eval-mode activations, so both modes fit the same decoder
    for key in cladecs[0].core.state_dict():
        assert torch.equal(cladecs[0].core.state_dict()[key], cladecs[1].core.state_dict()[key]), key
    assert trainer.callback_metrics["train/rec_loss"] < 0.07  # below the mean image (≈0.073)

    figures = paper_protocol(cladecs[0], model, dm.train_dataloader(), dm.test_dataloader(), epochs=1)
    measures = ("frozen_acc", "fresh_acc", "fresh_acc_on_orig")
    expected = {f"{s}/{m}" for s in ("orig", "cladec", "refae") for m in measures}
    assert expected | {"cladec/rec_loss", "refae/rec_loss"} == set(figures)
    assert all(0.0 <= figures[k] <= 1.0 for k in expected)
    assert figures["orig/frozen_acc"] > 0.5
