"""Logger adapters: scalars through Lightning's logging, images to every attached logger that can take them.

Scalars go through ``pl_module.log`` so they reach every logger, ``trainer.callback_metrics`` (checkpoint monitors,
early stopping) and the progress bar. Images go to each logger whose experiment has ``add_image`` (TensorBoard's
``SummaryWriter`` and look-alikes), from global rank zero only; a logger without image support gets scalars only
and one warning naming it.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

_warned: set[str] = set()


def log_scalars(pl_module: pl.LightningModule, metrics: Mapping[str, torch.Tensor | float]) -> None:
    """Log already-synchronised epoch-level scalars: every rank logs the same value, and no collective runs.

    The callbacks reduce their scalars themselves (explicit all-reduces, torchmetrics), so every rank holds the same
    number and a further ``sync_dist`` reduction would only cost one collective per scalar. Logged with
    ``sync_dist=False``, though, Lightning (2.x, ``_ResultCollection._get_cache``) warns "It is recommended to use
    ``self.log(..., sync_dist=True)``" once per name at the end of the epoch, after this call has returned, so a
    ``warnings.catch_warnings`` here could not catch it. ``sync_dist=True`` together with ``rank_zero_only=True``
    says what holds: nothing to reduce (Lightning's ``_Sync`` then uses its no-op, keeping this rank's value) and no
    warning. Each rank still logs, so ``trainer.callback_metrics`` (checkpoint monitors, early stopping) holds the
    scalar on every rank.
    """
    for name, value in metrics.items():
        value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, rank_zero_only=True)


def image_loggers(trainer: pl.Trainer) -> list:
    """The experiments (writers) of the attached loggers that accept images; warns once per other logger."""
    writers = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and callable(getattr(experiment, "add_image", None)):
            writers.append(experiment)
        else:
            kind = type(logger).__name__
            if kind not in _warned:
                _warned.add(kind)
                rank_zero_warn(f"lightning_xai: {kind} cannot store images; it receives scalars only.")
    return writers


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives the scalars logged now, so that a validation's images and scalars share one step on
    TensorBoard's slider (during a fit Lightning logs at the count of batches that stepped, one behind
    ``global_step`` while the last batch's validation runs)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return trainer.global_step if stepped is None else int(stepped)


def log_image(trainer: pl.Trainer, tag: str, image: torch.Tensor, step: int | None = None) -> None:
    """Write one CHW image with values in [0, 1] to every image-capable logger (global rank zero only)."""
    if not trainer.is_global_zero:
        return
    step = logging_step(trainer) if step is None else step
    image = image.detach().float().clamp(0, 1).cpu()
    for writer in image_loggers(trainer):
        writer.add_image(tag, image, global_step=step, dataformats="CHW")


def figure_to_image(figure) -> torch.Tensor:
    """Render a matplotlib figure (made with :func:`lightning_xai.viz.new_figure`) to a CHW float tensor in [0, 1]."""
    import numpy as np

    figure.canvas.draw()
    rgba = torch.from_numpy(np.asarray(figure.canvas.buffer_rgba()).copy())
    return rgba[..., :3].permute(2, 0, 1).float() / 255.0


def write_chart_layout(trainer: pl.Trainer, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
    """Give TensorBoard's CUSTOM SCALARS tab one category per callback prefix, each chart overlaying paired curves
    (``{prefix: {chart title: [tag regexes]}}``); written once, on global rank zero, to each TensorBoard writer."""
    layout = {prefix: {title: ["Multiline", tags] for title, tags in group.items()}
              for prefix, group in charts.items() if group}
    if not layout or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        writer = getattr(logger, "experiment", None)
        if callable(getattr(writer, "add_custom_scalars", None)):
            writer.add_custom_scalars(layout)
