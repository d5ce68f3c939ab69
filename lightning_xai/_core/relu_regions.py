"""Linear regions of a ReLU network: its hidden neurons, their input-space projections, and the distance to the
nearest switching hyperplane (shared by Insens and Linearization).

In a piecewise-linear network every hidden neuron's pre-activation is, around an input x, one linear projection of
the input: ``v_i(x) = ŵ_i·x + b̂_i`` with ``ŵ_i = ∂v_i/∂x`` (Szymanski, McCane & Atkinson, arXiv:1909.11275,
Theorem 1). The neurons here are the inputs of every ReLU-family call (``nn.ReLU``, ``F.relu``, ``torch.relu_``,
LeakyReLU, PReLU, ReLU6), whose switching point is ``v = 0``, seen per operator call.

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

from lightning_xai._core.gate_modules import NEURON_UNITS, unwrap_compiled
from lightning_xai._core.gates import GateRecorder
from lightning_xai._core.layers import LayerTap, replaced_output
from lightning_xai._core.modules import eval_mode


def neuron_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ReLU-family *modules* of ``model`` by name (a static view for set-up checks; functional ``F.relu`` calls
    are neurons too, found when the network runs: see :func:`capture_preactivations`)."""
    return {unwrap_compiled(name): m for name, m in model.named_modules() if isinstance(m, NEURON_UNITS)}


@contextmanager
def capture_preactivations(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores the input (pre-activation) of each ReLU-family *call* in the
    yielded dict, keyed by call site (``layer1.0.relu``, then ``layer1.0.relu#2`` for a module called twice).

    Calls are seen at the operator level (``nn.ReLU``, ``F.relu``, ``torch.relu_``, ``F.leaky_relu``, ``F.prelu``,
    ``F.relu6``); an in-place unit's input is cloned before it is overwritten. Use :func:`neuron_recorder` to also
    see the smooth units that ran (``recorder.ungated``) and the max-pool losers.
    """
    with neuron_recorder(model) as recorder:
        yield recorder.neuron_inputs


@contextmanager
def neuron_recorder(model: nn.Module) -> Iterator[GateRecorder]:
    """A :class:`~lightning_xai._core.gates.GateRecorder` collecting pre-activations and max-pool losers only."""
    recorder = GateRecorder(model, gated=False, neurons=True)
    with recorder.capture():
        yield recorder


def layer_output(model: nn.Module, x: torch.Tensor, layer: str | None) -> torch.Tensor:
    """The tensor neurons are explained in: ``x`` itself, or the output of ``layer`` on ``x`` (e.g. an embedding)."""
    if layer is None:
        return x
    tap = LayerTap(model, layer)
    try:
        with torch.no_grad():
            return tap.truncated(model, x).detach()
    finally:
        tap.detach()


def forward_at(model: nn.Module, x: torch.Tensor, layer: str | None, point: torch.Tensor,
               recorder: GateRecorder) -> None:
    """Run ``model`` with ``point`` as its input (``layer=None``) or as ``layer``'s output on input ``x``."""
    point = recorder.track(point)
    if layer is None:
        model(point)
        return
    repeats = point.shape[0] // x.shape[0]
    stacked = x.repeat(repeats, *([1] * (x.dim() - 1))) if repeats > 1 else x
    with replaced_output(model, layer, lambda output: point):
        model(stacked)


def directional_derivatives(
    model: nn.Module, x: torch.Tensor, tangents: torch.Tensor, input_layer: str | None = None
) -> dict[str, torch.Tensor]:
    """``J_l·t`` for each neuron layer l and each tangent t in ``tangents`` ``(T, B, *point_shape)``, where the point is
    ``x`` or, with ``input_layer``, that layer's output on ``x``.

    One dual-number forward over ``T·B`` stacked copies; returns tensors of shape ``(T, B, *layer)``.
    """
    t, batch = tangents.shape[0], x.shape[0]
    point = layer_output(model, x, input_layer)
    stacked = point.detach().repeat(t, *([1] * (point.dim() - 1)))
    # forward-mode derivatives need no autograd graph (no_grad leaves dual numbers alone)
    with torch.no_grad(), fwAD.dual_level(), neuron_recorder(model) as recorder:
        dual = fwAD.make_dual(stacked, tangents.reshape(stacked.shape).to(stacked))
        forward_at(model, x, input_layer, dual, recorder)
        return {name: fwAD.unpack_dual(v).tangent.reshape(t, batch, *v.shape[1:])
                for name, v in recorder.neuron_inputs.items()}


def row_norms_squared(
    model: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "exact",
    samples: int = 64,
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
    input_layer: str | None = None,
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
        input_layer: norms in the output of this module instead of the input (e.g. an embedding).
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method={method!r} is not one of ('exact', 'hutchinson')")
    point = layer_output(model, x, input_layer)
    d = point[0].numel()
    total = d if method == "exact" else samples
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, total, chunk_size):
        k = min(chunk_size, total - start)
        if method == "exact":
            basis = torch.zeros(k, d, dtype=point.dtype, device=point.device)
            basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
            tangents = basis[:, None, :].expand(k, x.shape[0], d)
        else:
            tangents = torch.randn(k, x.shape[0], d, dtype=point.dtype, device=point.device, generator=generator)
        for name, jt in directional_derivatives(model, x, tangents.reshape(k, *point.shape), input_layer).items():
            part = jt.pow(2).sum(0)
            sums[name] = part if name not in sums else sums[name] + part
    if method == "hutchinson":
        sums = {name: s / samples for name, s in sums.items()}
    return sums


def switch_distance(pre: torch.Tensor, norms_squared: torch.Tensor) -> torch.Tensor:
    """Distance ``|v_i|/‖ŵ_i‖`` from the input to each neuron's switching hyperplane (inf where ``‖ŵ_i‖ = 0``)."""
    usable = norms_squared > 0
    return torch.where(usable, pre.abs() / norms_squared.clamp_min(1e-300).sqrt(), torch.full_like(pre, float("inf")))


def region_radius(
    model: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "exact",
    samples: int = 64,
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Per example, the distance from ``x`` to the nearest ReLU switching hyperplane: how far the exact local linear
    map reaches (max-pool switches not counted, so an upper bound of the region's radius). None when no ReLU-family
    unit runs."""
    with eval_mode(model), torch.inference_mode(False), torch.no_grad():
        with neuron_recorder(model) as recorder:
            model(x)
        if not recorder.neuron_inputs:
            return None
        norms = row_norms_squared(model, x, method=method, samples=samples, chunk_size=chunk_size,
                                  generator=generator)
        radius = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
        for name, pre in recorder.neuron_inputs.items():
            radius = torch.minimum(radius, switch_distance(pre, norms[name]).flatten(1).min(1).values)
    return radius
