"""Image panels as tensors: tiles on one shared intensity scale, signed maps in a diverging colour map.

Everything returns CHW float tensors in [0, 1], ready for ``SummaryWriter.add_image``. Tiles are upscaled with
nearest-neighbour sampling so that small inputs (8×8 digits) stay legible, and are never normalised one by one:
per-tile min-max scaling hides exactly the brightness and contrast losses a reconstruction explanation is about.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def to_rgb(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map a CHW image (1 or 3 channels) to RGB in [0, 1] using the fixed range ``[low, high]``."""
    scaled = ((image.float() - low) / max(high - low, 1e-12)).clamp(0, 1)
    if scaled.shape[0] == 1:
        return scaled.expand(3, -1, -1)
    if scaled.shape[0] == 3:
        return scaled
    return scaled.mean(0, keepdim=True).expand(3, -1, -1)  # other channel counts: show the mean


def diverging(signed: torch.Tensor, limit: float) -> torch.Tensor:
    """Map a signed HW (or CHW, averaged over channels) map to RGB: blue < 0 < red, white at 0, saturating at ±limit."""
    if signed.dim() == 3:
        signed = signed.float().mean(0)
    t = (signed.float() / max(limit, 1e-12)).clamp(-1, 1)
    pos, neg = t.clamp(min=0), (-t).clamp(min=0)
    red = 1 - neg
    green = 1 - pos - neg
    blue = 1 - pos
    return torch.stack([red, green, blue]).clamp(0, 1)


def upscale(image: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscale of a CHW image by an integer factor so its shorter side reaches ``min_side``."""
    factor = max(1, -(-min_side // min(image.shape[-2:])))
    if factor == 1:
        return image
    return F.interpolate(image[None], scale_factor=factor, mode="nearest")[0]


def tile_row(tiles: Sequence[torch.Tensor], pad: int = 2, min_side: int = 64) -> torch.Tensor:
    """Upscale RGB tiles of equal size and lay them side by side, separated by ``pad`` grey pixels."""
    tiles = [upscale(t, min_side) for t in tiles]
    height = tiles[0].shape[-2]
    sep = torch.full((3, height, pad), 0.5)
    parts: list[torch.Tensor] = []
    for i, tile in enumerate(tiles):
        if i:
            parts.append(sep)
        parts.append(tile)
    return torch.cat(parts, dim=-1)
