"""Matplotlib figures for what does not read well as an image (tabular features), rendered off-screen."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no GUI, safe in worker processes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(figure)
    return figure


def feature_bars(
    rows: Sequence[dict[str, torch.Tensor]],
    feature_names: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
):
    """Grouped bars per feature, one subplot per row; each row maps a series name to a 1-D tensor of values.

    Used for tabular inputs: e.g. ``{"original": x, "RefAE": x_r, "ClaDec": x_e}`` for each probe example.
    """
    n_features = len(next(iter(rows[0].values())))
    names = list(feature_names) if feature_names is not None else [str(i) for i in range(n_features)]
    figure = new_figure(max(6.0, 0.28 * n_features), 2.2 * len(rows))
    axes = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    for r, (ax, series) in enumerate(zip(axes, rows)):
        k = len(series)
        width = 0.8 / k
        for i, (label, values) in enumerate(series.items()):
            positions = [j + (i - (k - 1) / 2) * width for j in range(n_features)]
            ax.bar(positions, values.detach().float().cpu().tolist(), width=width, label=label)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(n_features))
        ax.set_xticklabels(names if r == len(rows) - 1 else [], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, n_features - 0.4)
        if titles is not None:
            ax.set_title(titles[r], fontsize=8)
        if r == 0:
            ax.legend(fontsize=7, ncol=k, loc="upper right")
    figure.tight_layout()
    return figure
