"""Helpers for the modules an explainer touches: mode switches that restore, and fresh re-initialised copies."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and every submodule) in eval mode for the block, then restore each submodule's own mode.

    Restoring per submodule matters: users freeze parts of a network (e.g. BatchNorm layers kept in eval mode), and a
    blanket ``module.train()`` afterwards would silently unfreeze them.
    """
    # remove_duplicate=False skips the memo set (hashing every module: torchmetrics Metrics hash their state);
    # a shared module listed twice is flipped and restored twice, harmlessly
    flipped = [m for _, m in module.named_modules(remove_duplicate=False) if m.training]
    for m in flipped:
        m.training = False
    try:
        yield module
    finally:
        for m in flipped:
            m.training = True


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares nothing with it, without dragging along a Lightning trainer.

    A ``LightningModule`` keeps a reference to its trainer (and through it, data loaders and loggers); mapping that
    reference to ``None`` in the deep-copy memo leaves the copy trainer-free and cheap.
    """
    memo: dict[int, object] = {}
    for attr in ("_trainer", "_fabric"):
        ref = module.__dict__.get(attr)
        if ref is not None:
            memo[id(ref)] = None
    for m in module.modules():  # forward hooks (ours included) must not run on the copy
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            if hooks:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(module, memo)


def reinitialise(module: nn.Module) -> list[str]:
    """Call ``reset_parameters()`` on every submodule that has it; return names of parameters left untouched.

    Parameters registered directly (``nn.Parameter`` attributes of modules without ``reset_parameters``) keep their
    trained values; callers warn about them because they leak trained information into a "fresh" copy.
    """
    reset_ids: set[int] = set()
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
            reset_ids.update(id(p) for p in m.parameters(recurse=False))
        if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
            m.reset_running_stats()
    return [n for n, p in module.named_parameters() if id(p) not in reset_ids]


def fresh_copy(module: nn.Module, what: str = "copy") -> nn.Module:
    """A re-initialised copy of ``module`` (same architecture, new weights from the current RNG stream).

    Warns once, naming them, if some parameters could not be re-initialised.
    """
    clone = detached_copy(module)
    untouched = reinitialise(clone)
    if untouched:
        shown = ", ".join(untouched[:5]) + (" ..." if len(untouched) > 5 else "")
        warnings.warn(
            f"{what}: {len(untouched)} parameter(s) have no reset_parameters() and keep their trained values: {shown}",
            stacklevel=2,
        )
    return clone


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter or buffer (its precision), or None if it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def to_module_dtype(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` cast to ``module``'s floating dtype when both are floating point (``precision="64-true"``,
    ``"bf16-true"``: examples kept from validation batches meet the network in its own precision); integer inputs
    (token ids) are left alone."""
    dtype = floating_dtype(module)
    if dtype is None or not x.is_floating_point() or x.dtype == dtype:
        return x
    return x.to(dtype)
