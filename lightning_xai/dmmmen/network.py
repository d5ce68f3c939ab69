"""The explained network as DMM-MEN reads it: inputs cast to the network's dtype, the chosen output, float64 logits.

Every forward DMM-MEN runs (the class's logit for a fit or a report, the bootstrap tests' positive rates) goes through
:func:`network_logits`, so the boundary between the user's network and the sampler's float64 algebra is one place:

* floating-point inputs are cast to the dtype of the network's parameters (``precision="64-true"``, ``"bf16-true"``),
  integer inputs (token ids) keep their dtype;
* the model's output goes through :func:`~lightning_xai._core.outputs.select_output` (``output_fn`` for dict, tuple
  or object outputs) and must be ``(B, K)`` logits;
* the inputs go to the network's device and the logits come back as float64 on the input's device.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_xai._core.modules import eval_mode
from lightning_xai._core.outputs import OutputFn, select_output


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    """The model's first floating-point parameter or buffer (``None`` when it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def as_model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the model's device, cast to its floating dtype when ``x`` is floating point (integer inputs such as
    token ids keep their dtype)."""
    reference = _first_tensor(model)
    if reference is None:
        return x
    return x.to(reference.device, dtype=reference.dtype if x.is_floating_point() else x.dtype)


def network_logits(
    model: nn.Module, x: torch.Tensor, output_fn: OutputFn | None = None, batch_size: int = 512
) -> torch.Tensor:
    """The model's logits ``(n, K)`` on ``x`` in float64 on ``x``'s device (eval mode, no gradients, in chunks of
    ``batch_size``)."""
    chunks = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            out = select_output(model(as_model_input(model, x[start : start + batch_size])), output_fn, who="DMMMEN")
            if out.dim() != 2:
                raise ValueError(
                    f"DMMMEN: the model's output has shape {tuple(out.shape)}; DMM-MEN explains (B, K) class logits. "
                    "Pass output_fn=<callable: model output -> tensor (B, K)> to choose or reshape it."
                )
            chunks.append(out.to(x.device, torch.float64))
    if not chunks:
        return torch.empty(0, 0, dtype=torch.float64, device=x.device)
    return torch.cat(chunks)


def check_class_logits(model: nn.Module, x: torch.Tensor, output_fn: OutputFn | None, target_class: int) -> None:
    """Fail early unless the model's output on a row or two of ``x`` is ``(B, K)`` logits with ``K >= 2`` and
    ``target_class < K`` (one eval-mode forward; every random stream is left alone)."""
    with torch.random.fork_rng(devices=[]):
        logits = network_logits(model, x[:2], output_fn)
    if logits.shape[1] < 2 or target_class >= logits.shape[1]:
        raise ValueError(f"DMMMEN: target_class={target_class} needs logits (B, K) with K >= 2 and "
                         f"target_class < K; the model's output gives shape {tuple(logits.shape)} (choose the "
                         "logits with output_fn, or a class in range).")
