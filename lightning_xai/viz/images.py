"""Image panels as tensors: tiles on one shared intensity scale, signed maps in a diverging colour map.

Every function takes a batch of images ``(N, C, H, W)`` (or one ``(C, H, W)`` image) and returns RGB values in
[0, 1] in the same layout, ready for ``SummaryWriter.add_image``. Tiles are upscaled with nearest-neighbour sampling
so that small inputs (8×8 digits) stay legible, and are never normalised one by one: per-tile min-max scaling hides
exactly the brightness and contrast losses a reconstruction explanation is about.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def to_rgb(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map images with 1 or 3 channels to RGB using the fixed range ``[low, high]`` (other counts: channel mean)."""
    scaled = ((images.float() - low) / max(high - low, 1e-12)).clamp(0, 1)
    channels = scaled.shape[-3]
    if channels == 3:
        return scaled
    if channels != 1:
        scaled = scaled.mean(-3, keepdim=True)
    return scaled.expand(*scaled.shape[:-3], 3, *scaled.shape[-2:])


def diverging(signed: torch.Tensor, limit: float) -> torch.Tensor:
    """Map signed images (channel-averaged) to RGB: blue < 0 < red, white at 0, saturating at ±``limit``."""
    t = (signed.float().mean(-3) / max(limit, 1e-12)).clamp(-1, 1)
    pos, neg = t.clamp(min=0), (-t).clamp(min=0)
    return torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=-3).clamp(0, 1)


def upscale(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscale by an integer factor so that the shorter side reaches ``min_side``."""
    factor = max(1, -(-min_side // min(images.shape[-2:])))
    if factor == 1:
        return images
    batched = images if images.dim() == 4 else images[None]
    out = F.interpolate(batched, scale_factor=factor, mode="nearest")
    return out if images.dim() == 4 else out[0]


def tile_row(tiles: Sequence[torch.Tensor], pad: int = 2, min_side: int = 64) -> torch.Tensor:
    """Upscale RGB tiles of equal size and lay them side by side, separated by ``pad`` grey columns."""
    tiles = [upscale(t, min_side) for t in tiles]
    sep = torch.full((*tiles[0].shape[:-1], pad), 0.5)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [sep, tile]
    return torch.cat(parts, dim=-1)


def stack_rows(rows: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Stack a batch of equally sized RGB panels ``(N, 3, H, W)`` vertically into one image, ``pad`` grey rows apart."""
    sep = torch.full((3, pad, rows.shape[-1]), 0.5)
    parts = [rows[0]]
    for row in rows[1:]:
        parts += [sep, row]
    return torch.cat(parts, dim=-2)


def attribution_rows(x: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """One image: a row per example, the input then each signed map (blue < 0 < red, white at 0).

    The input uses the batch's intensity range. Each signed map is scaled symmetrically by its own largest magnitude:
    maps in one row may have different units (a gradient, a displacement in input space), so only the pattern within
    a tile, not the colour strength across tiles, is comparable.
    """
    low, high = float(x.min()), float(x.max())
    tiles = [to_rgb(x, low, high)]
    for m in maps:
        m = m.detach().float()
        limit = m.abs().flatten(1).amax(1).clamp_min(1e-12)
        tiles.append(diverging(m / limit.view(-1, *([1] * (m.dim() - 1))), 1.0))
    return stack_rows(tile_row(tiles))
