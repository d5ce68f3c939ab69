"""Checks of the GPEX constructor arguments, in one place, so that a bad value fails at construction.

Each check names the bad value and what is valid. They run in a fixed order (the module, then sizes, numbers, flags,
callables), so a constructor call with several bad values always reports the same one first.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lightning_xai.gpex.slots import STREAM_MAX_INDUCING

__all__ = ["check_options"]


def check_options(
    *,
    layer: Any,
    kernel_net: Any,
    dim: Any,
    neighbours: Any,
    scale: Any,
    lr: Any,
    noise: Any,
    refit_each_epoch: Any,
    store_inputs: Any,
    index_fn: Any,
    max_inducing: Any,
    output_fn: Any,
    holdout_weight: Any,
    mix_fraction: Any,
) -> None:
    """Raise ``ValueError`` naming the first bad argument of :class:`~lightning_xai.gpex.GPEX` and its valid values."""
    if layer is not None and not isinstance(layer, str):
        raise ValueError(f"layer={layer!r} must be a dotted module name (str) or None")
    if kernel_net is not None and not isinstance(kernel_net, nn.Module):
        raise ValueError(f"kernel_net={type(kernel_net).__name__} must be an nn.Module or None")
    _check_positive_int("dim", dim)
    _check_positive_int("neighbours", neighbours)
    for arg, value in (("scale", scale), ("lr", lr)):
        if not _positive_number(value):
            raise ValueError(f"{arg}={value!r} must be a positive number")
    if noise is not None and not _positive_number(noise):
        raise ValueError(f"noise={noise!r} must be a positive number or None (None: scale**2)")
    _check_flags(refit_each_epoch, store_inputs)
    if index_fn is not None and not callable(index_fn):
        raise ValueError(f"index_fn={index_fn!r} must be a callable batch -> dataset indices, or None")
    if max_inducing is not None and (
        isinstance(max_inducing, bool) or not isinstance(max_inducing, int) or max_inducing < 1
    ):
        raise ValueError(f"max_inducing={max_inducing!r} must be a positive integer or None (None: the training "
                         f"set's length, {STREAM_MAX_INDUCING} for streams)")
    if output_fn is not None and not callable(output_fn):
        raise ValueError(f"output_fn={output_fn!r} must be a callable model output -> tensor (B, K), or None")
    if isinstance(holdout_weight, bool) or not isinstance(holdout_weight, (int, float)) or not holdout_weight >= 0:
        raise ValueError(f"holdout_weight={holdout_weight!r} must be a number >= 0")
    if isinstance(mix_fraction, bool) or not isinstance(mix_fraction, (int, float)) or not 0 < mix_fraction <= 1:
        raise ValueError(f"mix_fraction={mix_fraction!r} must be a number in (0, 1]")


def _check_positive_int(arg: str, value: Any) -> None:
    """``value`` is an int >= 1 (not a bool), else a ``ValueError`` naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg}={value!r} must be a positive integer")


def _positive_number(value: Any) -> bool:
    """A finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value > 0


def _check_flags(refit_each_epoch: Any, store_inputs: Any) -> None:
    """Both flags are bools, and a refit has stored inputs to re-embed."""
    for arg, value in (("refit_each_epoch", refit_each_epoch), ("store_inputs", store_inputs)):
        if not isinstance(value, bool):
            raise ValueError(f"{arg}={value!r} must be True or False")
    if refit_each_epoch and not store_inputs:
        raise ValueError(
            "refit_each_epoch=True re-embeds the cache from its stored inputs, but store_inputs=False: pass "
            "refit_each_epoch=False (or store_inputs=True)"
        )
