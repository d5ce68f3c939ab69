"""Batch unpacking: get the model input and the target out of whatever a datamodule yields.

The defaults understand ``(x, y, ...)`` tuples/lists, dicts keyed ``x``/``image``/``input`` (and
``y``/``label``/``target``) and bare tensors (no target). Anything else needs ``input_fn``/``target_fn``. The
defaults are module-level functions rather than lambdas so callbacks holding them pickle under ``ddp_spawn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

BatchFn = Callable[[Any], Any]

INPUT_KEYS = ("x", "image", "images", "input", "inputs")
TARGET_KEYS = ("y", "label", "labels", "target", "targets")


class BatchFormatError(TypeError):
    """Raised when a batch has a structure the default unpacking does not understand."""


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items ({', '.join(type(b).__name__ for b in batch)})"
    return f"a {type(batch).__name__}"


def default_input_fn(batch: Any) -> torch.Tensor:
    """The model input of a batch: ``batch[0]``, ``batch[key]`` for a known input key, or the batch itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise BatchFormatError(
        f"Cannot find the model input in {_describe(batch)}. The default understands (x, y, ...) tuples, bare tensors "
        f"and dicts keyed {INPUT_KEYS}. Pass input_fn=<callable batch -> input tensor> to the callback."
    )


def default_target_fn(batch: Any) -> torch.Tensor | None:
    """The target of a batch (``batch[1]`` or a known target key), or ``None`` when the batch carries none."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


class BatchUnpacker:
    """Apply ``input_fn``/``target_fn`` (or the defaults) and check that what they return is usable.

    Args:
        input_fn: callable ``batch -> tensor``; ``None`` for :func:`default_input_fn`.
        target_fn: callable ``batch -> tensor | None``; ``None`` for :func:`default_target_fn`.
    """

    def __init__(self, input_fn: BatchFn | None = None, target_fn: BatchFn | None = None) -> None:
        self.input_fn = input_fn or default_input_fn
        self.target_fn = target_fn or default_target_fn

    def input(self, batch: Any) -> torch.Tensor:
        x = self.input_fn(batch)
        if not isinstance(x, torch.Tensor):
            raise BatchFormatError(
                f"input_fn returned {type(x).__name__}, expected a tensor (batch was {_describe(batch)})"
            )
        return x

    def target(self, batch: Any) -> torch.Tensor | None:
        y = self.target_fn(batch)
        if y is not None and not isinstance(y, torch.Tensor):
            raise BatchFormatError(f"target_fn returned {type(y).__name__}, expected a tensor or None")
        return y
