"""ClaDec's modules and objective, usable without Lightning.

* :class:`ClaDecModel` holds the explanation decoder ``D`` (classifier activations → input space) and the reference
  auto-encoder :class:`RefAE` of the same shape (Schneider & Vlachos, arXiv:2005.13630).
* :func:`cladec_objective` is the paper's extended loss
  ``(1 − α)·MSE(D(a), x) + α·CE(f(D(a)), y)`` with the reconstruction error averaged per element (the reduction of
  the authors' code; a per-image sum would make ``α`` mean something else entirely).

The classifier ``f`` is never a submodule here: it belongs to the user, and is only called.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_xai._core.layers import Capture, LayerTap, replaced_output
from lightning_xai._core.modules import fresh_copy
from lightning_xai.cladec.decoder import build_decoder


class RefAE(nn.Module):
    """Reference auto-encoder: a freshly initialised copy of the classifier up to the layer, then a decoder.

    It has the explained layer's shape and bottleneck but is trained end to end for reconstruction only, so it shows
    what an encoder of this shape *could* keep; ClaDec's losses relative to it are what the classifier discards.
    With ``input_layer``, the copy runs from that layer on: its output is replaced by the RefAE's input, and the
    model's own input (e.g. token ids, which only fix the shapes) is passed as ``source``.
    """

    def __init__(
        self, classifier: nn.Module, layer: str, capture: Capture, decoder: nn.Module, input_layer: str | None = None
    ) -> None:
        super().__init__()
        self.encoder = fresh_copy(classifier, "RefAE encoder")
        self.decoder = decoder
        self.input_layer = input_layer
        self._tap = LayerTap(self.encoder, layer, capture)

    def encode(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The copy's activation at the layer (the forward stops there)."""
        if self.input_layer is None:
            return self._tap.truncated(self.encoder, x).float()
        if source is None:
            raise ValueError(f"RefAE with input_layer={self.input_layer!r} needs the model's input as source=")
        with replaced_output(self.encoder, self.input_layer, lambda output: x):
            return self._tap.truncated(self.encoder, source).float()

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.encode(x, source))


class ClaDecModel(nn.Module):
    """Decoder of a classifier layer plus its reference auto-encoder.

    Args:
        classifier: the network whose layer is explained (copied, re-initialised, for the RefAE encoder).
        layer: dotted name of the layer.
        capture: whether the layer's ``"output"`` or ``"input"`` is the code.
        code_shape: one example's activation shape at the layer.
        input_shape: one example's input shape.
        width: decoder width (see :func:`~lightning_xai.cladec.decoder.build_decoder`).
        output_activation: ``"sigmoid"`` or ``"identity"``.
        refae: build the reference auto-encoder.
        input_layer: dotted name of the layer whose output stands for the input (decoded to, and fed to the RefAE).
    """

    def __init__(
        self,
        classifier: nn.Module,
        layer: str,
        capture: Capture,
        code_shape: Sequence[int],
        input_shape: Sequence[int],
        width: int = 32,
        output_activation: str = "sigmoid",
        refae: bool = True,
        input_layer: str | None = None,
    ) -> None:
        super().__init__()
        self.code_shape, self.input_shape = tuple(code_shape), tuple(input_shape)
        self.decoder = build_decoder(code_shape, input_shape, width, output_activation)
        ref_decoder = build_decoder(code_shape, input_shape, width, output_activation)
        self.refae = RefAE(classifier, layer, capture, ref_decoder, input_layer) if refae else None

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """Decode a batch of activations to input space."""
        return self.decoder(code)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element (the reduction used by the authors' code)."""
    return F.mse_loss(recon, x.to(recon.dtype))


def cladec_objective(
    recon: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    logits: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ClaDec's loss ``(1 − α)·MSE + α·CE``; returns ``(loss, mse, ce)`` (``ce`` is ``None`` when ``α = 0``)."""
    rec = reconstruction_loss(recon, x)
    if alpha == 0:
        return rec, rec, None
    if logits is None or target is None:
        raise ValueError("alpha > 0 needs the classifier's logits on the reconstruction and a target")
    ce = F.cross_entropy(logits, target)
    return (1 - alpha) * rec + alpha * ce, rec, ce
