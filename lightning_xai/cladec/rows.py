"""ClaDec's bad-row policy: which rows of a batch a training step or the metric set may use.

A row with a NaN/Inf input, activation or classifier output, or an integer label outside ``[0, K)``, is left out of
the step or the scalars it would poison, while the other rows are still used; a step is skipped only when some
process has no usable row left (decided together, so every rank skips together). Inputs a decoder cannot produce
at all (token ids) are refused outright, with the fix. These rules live here, apart from the callback, so that the
training step (:mod:`lightning_xai.cladec.cotraining`) and the metric set (:mod:`lightning_xai.cladec.reporting`)
apply one and the same policy.
"""

from __future__ import annotations

import torch

from lightning_xai._core.distributed import all_reduce_


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mask of the rows that are finite in every tensor (each ``(B, ...)``; integer tensors are finite)."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            keep &= torch.isfinite(t.reshape(t.shape[0], -1)).all(1).to(keep.device)
    return keep


def labels_in_range(y: torch.Tensor, classes: int) -> torch.Tensor:
    """``(B,)`` mask of integer class labels in ``[0, classes)``; other targets (soft labels) are all kept."""
    if y.is_floating_point() or y.dim() != 1:
        return torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    return (y >= 0) & (y < classes)


def rows_on_every_rank(keep: torch.Tensor) -> bool:
    """Whether every rank has at least one usable row (one tiny all-reduce under DDP: all ranks skip together)."""
    none = (~keep.any()).float().reshape(1)
    return not bool(all_reduce_(none, "max").item())


def check_decodable(x: torch.Tensor, input_layer: str | None) -> None:
    """Refuse inputs a decoder cannot produce (token ids) without ``input_layer``, before any low-level dtype error.

    Args:
        x: the batch input ``input_fn(batch)``, ``(B, ...)``.
        input_layer: the callback's ``input_layer``; when set, the decoder targets that layer's output instead.
    """
    if input_layer is None and not x.is_floating_point():
        raise TypeError(
            f"ClaDec decodes the layer's activations back to the model's input, but input_fn(batch) gave a "
            f"{x.dtype} tensor of shape {tuple(x.shape)} (token ids?): a decoder cannot produce integer ids and "
            "the classifier cannot be run on a reconstruction of them. Pass input_layer='<the embedding "
            "layer>' to decode to that layer's output instead, or give input_fn the model's continuous input."
        )
