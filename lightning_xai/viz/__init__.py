"""Panels and heatmaps as image tensors, and off-screen matplotlib figures."""

from lightning_xai.viz.figures import feature_bars, new_figure
from lightning_xai.viz.images import attribution_rows, diverging, stack_rows, tile_row, to_rgb, upscale

__all__ = ["attribution_rows", "diverging", "feature_bars", "new_figure", "stack_rows", "tile_row", "to_rgb", "upscale"]
