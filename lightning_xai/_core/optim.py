"""One optimisation step for a callback-owned module, safe to run beside the user's training.

:func:`owned_step` differentiates with ``torch.autograd.grad`` restricted to the callback's own parameters, so a loss
that flows through the user's network (ClaDec's classification term, say) never writes into the network's
``.grad`` and never fires DDP's reducer hooks. Gradients are then averaged over ranks in one bucket; a step whose
averaged gradient is not finite is skipped on every rank alike (the decision is taken after the all-reduce, so no
extra collective is needed and no rank can diverge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.torch_version import TorchVersion

from lightning_xai._core.distributed import all_reduce_gradients


def owned_step(loss: torch.Tensor, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
    """Backpropagate ``loss`` into ``params`` only, sync gradients across ranks, and step ``optimizer``.

    Returns:
        ``True`` if the optimizer stepped, ``False`` if the step was skipped because a gradient was NaN/Inf.
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g
    all_reduce_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    # a NaN/Inf anywhere makes that tensor's norm non-finite: one fused kernel and one host sync for all of them
    finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def fast_adam(params, lr: float, weight_decay: float = 0.0, device: torch.device | None = None) -> torch.optim.Adam:
    """Adam with its fastest implementation for the device: fused kernels (one launch for all tensors) on CUDA, and
    on the CPU from torch 2.4; the default implementation elsewhere."""
    device = torch.device("cpu") if device is None else torch.device(device)
    fused = device.type == "cuda" or (device.type == "cpu" and TorchVersion(torch.__version__) >= "2.4")
    return torch.optim.Adam(params, lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
