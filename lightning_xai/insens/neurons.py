"""Hidden neurons of a ReLU network: their pre-activations and the norms of their input-space projections.

In a piecewise-linear network every hidden neuron's pre-activation is, around an input x, one linear projection of
the input: ``v_i(x) = ŵ_i·x + b̂_i`` with ``ŵ_i = ∂v_i/∂x`` (Szymanski, McCane & Atkinson, arXiv:1909.11275,
Theorem 1). The neurons here are the inputs of the ReLU-family modules (ReLU, LeakyReLU, PReLU, ReLU6), whose
switching point is ``v = 0``; networks that call ``torch.relu`` functionally expose no neurons to hooks.

:func:`row_norms_squared` gets ``‖ŵ_i‖²`` for every neuron at once with forward-mode derivatives: one dual-number
forward per input direction gives ``J·e_k`` for all neurons, so the exact norms cost ``D`` forwards (chunked into
batched passes) instead of one backward per neuron; for large inputs the Hutchinson estimate uses ``m`` random
directions (relative error about ``√(2/m)`` per neuron).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

NEURON_UNITS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6)


def neuron_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ReLU-family modules of ``model`` by name; their inputs are the hidden neurons' pre-activations."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NEURON_UNITS)}


@contextmanager
def capture_preactivations(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores each neuron layer's input (pre-activation) in the yielded dict."""
    store: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            store[name] = args[0]

        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in neuron_layers(model).items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def directional_derivatives(model: nn.Module, x: torch.Tensor, tangents: torch.Tensor) -> dict[str, torch.Tensor]:
    """``J_l·t`` for each neuron layer l and each tangent t in ``tangents`` ``(T, B, *input_shape)``.

    One dual-number forward over the ``T·B`` stacked copies of ``x``; returns tensors of shape ``(T, B, *layer)``.
    """
    t = tangents.shape[0]
    stacked = x.detach().unsqueeze(0).expand(t, *x.shape).reshape(t * x.shape[0], *x.shape[1:])
    # forward-mode derivatives need no autograd graph (no_grad leaves dual numbers alone)
    with torch.no_grad(), fwAD.dual_level(), capture_preactivations(model) as store:
        model(fwAD.make_dual(stacked, tangents.reshape(stacked.shape).to(stacked)))
        return {name: fwAD.unpack_dual(v).tangent.reshape(t, x.shape[0], *v.shape[1:]) for name, v in store.items()}


def row_norms_squared(
    model: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "exact",
    samples: int = 64,
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``‖ŵ_i‖² = ‖∂v_i/∂x‖²`` for every neuron of every layer, per example: tensors ``(B, *layer)``.

    Args:
        model: a network in eval mode.
        x: inputs ``(B, *input_shape)``.
        method: ``"exact"`` (``D`` directional derivatives along the input basis) or ``"hutchinson"`` (``samples``
            Gaussian directions, unbiased).
        samples: Hutchinson directions.
        chunk_size: directions per batched forward (memory ``O(chunk·B·N)``).
        generator: random source of the Hutchinson directions.
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method={method!r} is not one of ('exact', 'hutchinson')")
    d = x[0].numel()
    total = d if method == "exact" else samples
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, total, chunk_size):
        k = min(chunk_size, total - start)
        if method == "exact":
            basis = torch.zeros(k, d, dtype=x.dtype, device=x.device)
            basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
            tangents = basis[:, None, :].expand(k, x.shape[0], d)
        else:
            tangents = torch.randn(k, x.shape[0], d, dtype=x.dtype, device=x.device, generator=generator)
        for name, jt in directional_derivatives(model, x, tangents.reshape(k, *x.shape)).items():
            part = jt.pow(2).sum(0)
            sums[name] = part if name not in sums else sums[name] + part
    if method == "hutchinson":
        sums = {name: s / samples for name, s in sums.items()}
    return sums
