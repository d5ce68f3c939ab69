"""ClaDec's probe panel: the picture logged under ``<prefix>/probes``.

Images (``(N, C, H, W)``) get one row per probe example, original | RefAE | ClaDec | ClaDec − original (the signed
difference map is this library's addition, not the paper's), all on the originals' intensity range; anything else
(tabular rows) gets bar charts per feature for the first four examples. Kept apart from the callback as a
Lightning-free function of tensors, so the figure can be drawn and tested without a Trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_xai._core.logging import figure_to_image
from lightning_xai.viz import diverging, feature_bars, stack_rows, tile_row, to_rgb


def probe_image(
    shown: torch.Tensor,
    cladec: torch.Tensor,
    refae: torch.Tensor | None,
    targets: torch.Tensor | None = None,
    feature_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """The probe panel as an image tensor, ready for :func:`lightning_xai._core.logging.log_image`.

    Args:
        shown: the originals on CPU in float, ``(N, C, H, W)`` for images, ``(N, ...)`` otherwise.
        cladec: ClaDec reconstructions, the shape of ``shown``.
        refae: RefAE reconstructions, the shape of ``shown`` (``None`` without a RefAE: its column is left out).
        targets: the probe labels ``(N,)``, named in the bar charts' titles (``None``: no labels).
        feature_names: names of the features of tabular rows (``None``: numbered).
    """
    if shown.dim() == 4:  # original | RefAE | ClaDec | ClaDec − original, on the originals' intensity range
        low, high = float(shown.min()), float(shown.max())
        tiles = [to_rgb(shown, low, high)] + ([to_rgb(refae, low, high)] if refae is not None else [])
        rows = tile_row(tiles + [to_rgb(cladec, low, high), diverging(cladec - shown, high - low)])
        return stack_rows(rows)
    series_rows, titles = [], []
    for i in range(min(4, shown.shape[0])):
        series = {"original": shown[i].flatten()}
        if refae is not None:
            series["RefAE"] = refae[i].flatten()
        series["ClaDec"] = cladec[i].flatten()
        series_rows.append(series)
        label = "" if targets is None else f" (label {int(targets[i])})"
        titles.append(f"probe {i}{label}")
    return figure_to_image(feature_bars(series_rows, feature_names, titles))
