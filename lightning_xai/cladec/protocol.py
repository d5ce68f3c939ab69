"""The ClaDec paper's evaluation protocol, for a trained classifier and fitted decoders.

Schneider & Vlachos measure how much classification-relevant information an explanation carries by training a
**fresh classifier of the same architecture on reconstructed training images** and testing it on reconstructed test
images: ClaDec reconstructions should support a better classifier than the reference auto-encoder's, although the
RefAE reconstructs the input better. :func:`paper_protocol` runs this for ClaDec, the RefAE and the original data, and
also reports each fresh classifier on the *original* test images and the explained (frozen) classifier's accuracy
on the reconstructions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai._core.modules import eval_mode, fresh_copy
from lightning_xai._core.rng import PrivateRNG
from lightning_xai.cladec.callback import ClaDec
from lightning_xai.cladec.model import reconstruction_loss


@torch.no_grad()
def reconstruct_loader(
    cladec: ClaDec, loader: Iterable[Any], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Originals, targets, ClaDec and RefAE reconstructions of every batch of ``loader`` (on the CPU)."""
    unpack = cladec.batches
    parts: dict[str, list[torch.Tensor]] = {"x": [], "y": [], "cladec": [], "refae": []}
    for batch in loader:
        x, y = unpack.input(batch).to(device), unpack.target(batch)
        out = cladec.explain(x)
        parts["x"].append(x.cpu())
        parts["y"].append(y.cpu())
        parts["cladec"].append(out.cladec.cpu())
        if out.refae is not None:
            parts["refae"].append(out.refae.cpu())
    return {k: torch.cat(v) for k, v in parts.items() if v}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size].to(device)).argmax(-1).cpu() == y[i : i + batch_size]).sum())
    return correct / len(x)


def train_fresh_classifier(
    architecture: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A re-initialised copy of ``architecture`` trained with Adam and cross-entropy on ``(x, y)``."""
    rng = PrivateRNG(seed)
    device = next(architecture.parameters()).device
    with rng.active(device):
        model = fresh_copy(architecture, "fresh classifier").train()
        optimizer = torch.optim.Adam(model.parameters(), lr)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
        for _ in range(epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def paper_protocol(
    cladec: ClaDec,
    classifier: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    epochs: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Run the paper's protocol and the frozen-classifier checks; returns a flat dict of figures.

    Keys: ``<src>/rec_loss`` for src in {cladec, refae}; ``<src>/frozen_acc`` (the explained classifier on the
    test reconstructions, or on the original test images for ``orig``) and ``<src>/fresh_acc`` (fresh
    classifier trained on ``src`` training reconstructions, tested on ``src`` test reconstructions — the paper's
    number) and ``<src>/fresh_acc_on_orig`` (same classifier on the original test images) for src in
    {orig, cladec, refae}.
    """
    device = next(classifier.parameters()).device
    train = reconstruct_loader(cladec.attach(classifier), train_loader, device)
    test = reconstruct_loader(cladec, test_loader, device)
    figures: dict[str, float] = {}
    sources = ["orig", "cladec"] + (["refae"] if "refae" in test else [])
    for src in sources:
        key = "x" if src == "orig" else src
        if src != "orig":
            figures[f"{src}/rec_loss"] = float(reconstruction_loss(test[key], test["x"]))
        figures[f"{src}/frozen_acc"] = accuracy(classifier, test[key], test["y"])
        fresh = train_fresh_classifier(classifier, train[key], train["y"], epochs=epochs, seed=seed)
        figures[f"{src}/fresh_acc"] = accuracy(fresh, test[key], test["y"])
        figures[f"{src}/fresh_acc_on_orig"] = accuracy(fresh, test["x"], test["y"])
    return figures
