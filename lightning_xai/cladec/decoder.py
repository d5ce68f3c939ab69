"""Decoders from a layer's activations back to input space, sized from shapes seen at run time.

The shape of a layer's output is only known once data flows, so decoders are built from ``code_shape`` (one example's
activation shape) and ``input_shape`` (one example's input shape):

* image inputs ``(C, H, W)`` and spatial codes ``(C', h, w)``: a 3×3 convolution to ``width·2^(k-1)`` channels,
  then ``k ≈ log2(H / h)`` transposed convolutions (kernel 4, stride 2), each doubling the resolution and halving
  the channels, the last one producing the ``C`` image channels (a 3×3 convolution when ``k = 0``); a bilinear
  resize absorbs sizes that are not a power of two apart;
* image inputs and flat codes ``(d,)``: a linear layer to a small seed grid (4×4 for 8×8 and 32×32 inputs, 7×7 for
  28×28), then the same upsampling stages;
* token codes ``(T, d)``: reshaped to a ``√T×√T`` grid when ``T`` is square, otherwise flattened;
* tabular inputs (anything not ``(C, H, W)``): an MLP ``d → h → h → D``.

This follows the structure of the decoders in the ClaDec paper's code (convolution stem or linear seed, transposed
convolutions kernel 4 stride 2, ReLU, no normalisation) while adapting the depth to the input size instead of fixing
the output at 32 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

OUTPUT_ACTIVATIONS = ("sigmoid", "identity")


class TokensToGrid(nn.Module):
    """Reshape ``(B, T, d)`` tokens on a square grid to ``(B, d, √T, √T)``."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, self.side, self.side)


def _image_decoder(code_shape: tuple[int, ...], input_shape: tuple[int, ...], width: int) -> list[nn.Module]:
    c_out, height, wide = input_shape
    layers: list[nn.Module] = []
    if len(code_shape) == 2 and math.isqrt(code_shape[0]) ** 2 == code_shape[0]:
        side = math.isqrt(code_shape[0])
        layers.append(TokensToGrid(side))
        code_shape = (code_shape[1], side, side)
    if len(code_shape) == 3:  # spatial code: a 3x3 convolution stem at the code's resolution
        c_code, h, w = code_shape
        stages = max(0, round(math.log2(max(1e-9, min(height / h, wide / w)))))
        channels = width * 2 ** max(stages - 1, 0)
        layers += [nn.Conv2d(c_code, channels, kernel_size=3, padding=1), nn.ReLU()]
    else:  # flat code: a linear map to a small seed grid
        stages = max(0, math.floor(math.log2(min(height, wide) / 4)))
        h, w = math.ceil(height / 2**stages), math.ceil(wide / 2**stages)
        channels = width * 2 ** max(stages - 1, 0)
        layers += [nn.Flatten(), nn.Linear(math.prod(code_shape), channels * h * w), nn.ReLU()]
        layers.append(nn.Unflatten(1, (channels, h, w)))
    for stage in range(stages):  # each doubles the resolution; the last one produces the image channels
        last = stage == stages - 1
        out = c_out if last else channels // 2
        layers.append(nn.ConvTranspose2d(channels, out, kernel_size=4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        channels = out
    if stages == 0:
        layers.append(nn.Conv2d(channels, c_out, kernel_size=3, padding=1))
    if (h * 2**stages, w * 2**stages) != (height, wide):
        layers.append(nn.Upsample(size=(height, wide), mode="bilinear", align_corners=False))
    return layers


def _tabular_decoder(code_shape: tuple[int, ...], input_shape: tuple[int, ...], width: int) -> list[nn.Module]:
    d, out = math.prod(code_shape), math.prod(input_shape)
    hidden = min(1024, max(2 * width, d, out))
    return [
        nn.Flatten(),
        nn.Linear(d, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out),
        nn.Unflatten(1, tuple(input_shape)),
    ]


def build_decoder(
    code_shape: Sequence[int], input_shape: Sequence[int], width: int = 32, output_activation: str = "sigmoid"
) -> nn.Sequential:
    """A decoder mapping a batch of codes ``(B, *code_shape)`` to inputs ``(B, *input_shape)``.

    Args:
        code_shape: shape of one example's activation (without the batch dimension).
        input_shape: shape of one example's input.
        width: channels of the last hidden stage (the stem has ``width·2^(k-1)``); tabular decoders use
            ``max(2·width, ...)`` hidden units.
        output_activation: ``"sigmoid"`` for inputs in [0, 1], ``"identity"`` otherwise.
    """
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation={output_activation!r} is not one of {OUTPUT_ACTIVATIONS}")
    code_shape, input_shape = tuple(int(s) for s in code_shape), tuple(int(s) for s in input_shape)
    if len(input_shape) == 3:
        layers = _image_decoder(code_shape, input_shape, width)
    else:
        layers = _tabular_decoder(code_shape, input_shape, width)
    if output_activation == "sigmoid":
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)
