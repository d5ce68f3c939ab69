"""The GPEX explanation figure (the paper's): each probe example beside its most similar training examples.

GPEX logs it as ``<prefix>/neighbours``. Drawing is kept apart from the callback because it needs only tensors
(probes, neighbours, scores, heads), no model, cache or trainer: images become one shared-range tile panel with the
similarity scores over the tiles, anything else (or neighbours whose inputs are not stored) a table of names and
scores.
"""

from __future__ import annotations

import torch

from lightning_xai.viz import new_figure, stack_rows, tile_row, to_rgb

__all__ = ["neighbour_figure"]

_CAPTION_BOX = {"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0}


def neighbour_figure(
    probes: torch.Tensor,
    neighbour_inputs: torch.Tensor | None,
    slots: torch.Tensor,
    scores: torch.Tensor,
    heads: torch.Tensor,
    gp_heads: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """A figure with one row per probe: the probe, then its neighbours with their kernel similarity scores.

    Args:
        probes: (P, ...) probe inputs.
        neighbour_inputs: (P, k, ...) the neighbours' stored inputs, or None when inputs are not stored.
        slots: (P, k) their names (−1: none).
        scores: (P, k) their similarities.
        heads: (P,) the network's predicted head (the kernel used for ranking).
        gp_heads: (P,) the GP's predicted head.
        labels: (P,) true labels, if known.

    Images (``(C, H, W)`` examples) are drawn on one shared intensity range with the scores over each tile; other
    inputs, or neighbours whose inputs are not stored, get a table of names and scores.
    """
    captions = _captions(heads, gp_heads, labels, slots.shape[0])
    if neighbour_inputs is not None and probes.dim() == 4 and probes.is_floating_point():
        return _image_panel(probes, neighbour_inputs, slots, scores, captions)
    return _table(slots, scores, captions)


def _captions(heads: torch.Tensor, gp_heads: torch.Tensor, labels: torch.Tensor | None, p: int) -> list[str]:
    """One title per probe: the network's and the GP's predicted heads, and the label when known."""
    captions = []
    for i in range(p):
        label = "" if labels is None else f" y={int(labels[i])}"
        captions.append(f"net {int(heads[i])} GP {int(gp_heads[i])}{label}")
    return captions


def _image_panel(
    probes: torch.Tensor,
    neighbour_inputs: torch.Tensor,
    slots: torch.Tensor,
    scores: torch.Tensor,
    captions: list[str],
):
    """Probes (P, C, H, W) and their neighbours' inputs (P, k, C, H, W) as tiles on one intensity range, each row
    captioned and each neighbour tile labelled with its score (a missing neighbour is a grey tile)."""
    p, k = slots.shape
    both = torch.cat([probes.float(), neighbour_inputs.flatten(0, 1).float()])
    low, high = float(both.min()), float(both.max())
    tiles = [to_rgb(probes, low, high)]
    for j in range(k):
        tile = to_rgb(neighbour_inputs[:, j], low, high).clone()
        tile[slots[:, j] < 0] = 0.5
        tiles.append(tile)
    rows = tile_row(tiles)  # (P, 3, h, w)
    panel = stack_rows(rows)
    height, width = panel.shape[-2:]
    tile_w = (rows.shape[-1] - 2 * k) / (k + 1)
    figure = new_figure(width / 80, height / 80)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(panel.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    box = dict(_CAPTION_BOX)
    for i in range(p):
        top = i * (rows.shape[-2] + 2) + 1
        ax.text(1, top, captions[i], color="yellow", fontsize=6, va="top", ha="left", bbox=box)
        for j in range(k):
            if int(slots[i, j]) < 0:
                continue
            left = (j + 1) * (tile_w + 2) + 1
            ax.text(left, top, f"{float(scores[i, j]):.3g}", color="white", fontsize=6, va="top", ha="left", bbox=box)
    return figure


def _table(slots: torch.Tensor, scores: torch.Tensor, captions: list[str]):
    """A text table: per probe its caption, then each neighbour as ``#name(similarity)``."""
    p = slots.shape[0]
    lines = []
    for i in range(p):
        found = " ".join(f"#{int(s)}({float(c):.3g})" for s, c in zip(slots[i], scores[i]) if int(s) >= 0)
        lines.append(f"probe {i} [{captions[i]}]: {found}")
    figure = new_figure(max(6.0, 0.09 * max(len(line) for line in lines)), 0.3 * p + 0.6)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.text(0.01, 0.98, "nearest training examples: #slot(similarity)", fontsize=8, va="top", family="monospace")
    for i, line in enumerate(lines):
        ax.text(0.01, 0.98 - (i + 1) / (p + 1.5), line, fontsize=7, va="top", family="monospace")
    return figure
