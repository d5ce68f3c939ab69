"""Switched linear projections and the inactive-state sensitivity (Insens) of a ReLU network.

Szymanski, McCane & Atkinson (arXiv:1909.11275) write each hidden neuron's pre-activation around an input x as one
linear projection, ``v_i(x) = ŵ_i·x + b̂_i`` (:func:`switched_projections`), and explain x by the neurons that are
*off*: each inactive neuron i (``v_i ≤ 0``) contributes ``ω̂_i = (v_i / ‖ŵ_i‖²)·ŵ_i``, the step from x to its
switching hyperplane (its length ``|v_i|/‖ŵ_i‖`` is the distance to it), and Insens is their mean,

    Ω̂(x) = (1/|I|) Σ_{i∈I} ω̂_i,   I = {hidden neurons with v_i ≤ 0 and ‖ŵ_i‖ > 0}.

Computed naively this is one backward pass per inactive neuron. :func:`insens` gets all ``‖ŵ_i‖²`` from
forward-mode derivatives (:func:`~lightning_xai._core.relu_regions.row_norms_squared`) and then the whole sum in
**one** backward pass, since ``Σ_i c_i ŵ_i = ∇_x Σ_i c_i v_i(x)`` for fixed ``c_i = v_i/‖ŵ_i‖²``. Neurons with
``‖ŵ_i‖ = 0`` (dead receptive fields) have no hyperplane and are left out and counted; by default a max-pool loser
with ``v > 0`` counts as active (the paper's equation), ``maxpool_losers="inactive"`` follows its remark that losers
are "deemed inactive".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_xai._core.autograd import batched_vjp
from lightning_xai._core.gates import GateRecorder, classify
from lightning_xai._core.modules import eval_mode
from lightning_xai._core.relu_regions import (
    forward_at,
    layer_output,
    neuron_recorder,
    row_norms_squared,
    switch_distance,
)

LOSER_POLICIES = ("active", "inactive")


@dataclass
class InsensMap:
    """Insens for a batch.

    Attributes:
        map: ``Ω̂(x)``, shape of the input batch.
        inactive: ``|I|`` per example.
        zero_norm: neurons left out because ``‖ŵ_i‖ = 0``, per example.
        r_min: distance from x to the nearest neuron switching hyperplane (active or not), per example; max-pool
            switches are not counted, so it bounds the radius of the linear region from above.
        active_fraction: per neuron layer, the fraction of its neurons with ``v > 0``, per example.
        method: ``"exact"`` or ``"hutchinson"``.
    """

    map: torch.Tensor
    inactive: torch.Tensor
    zero_norm: torch.Tensor
    r_min: torch.Tensor
    active_fraction: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "exact"


def require_relu_network(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model``'s modules are piecewise-linear (a static check for set-up time; functional
    smooth units are caught when the network runs, see :func:`neuron_preactivations`)."""
    mode, gated = classify(model)
    if mode != "exact":
        raise ValueError(f"insens needs a piecewise-linear (ReLU) network; {gated[:5]} are smooth units, norms or "
                         "softmax, which have no switching hyperplanes (Linearization explains such networks)")


def neuron_preactivations(
    model: nn.Module, x: torch.Tensor, input_layer: str | None = None, point: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass: the pre-activation of every ReLU-family call (differentiable in ``point``, which defaults to
    ``x``; with ``input_layer``, ``point`` replaces that layer's output) and, for calls whose output feeds a max-pool
    directly, True where a neuron wins no pooling window.

    Raises:
        ValueError: when smooth units run (no switching hyperplanes) or no ReLU-family call runs at all.
    """
    with neuron_recorder(model) as recorder:
        forward_at(model, x, input_layer, x if point is None else point, recorder)
    if recorder.ungated:
        raise ValueError(f"insens needs a piecewise-linear (ReLU) network; the calls {recorder.ungated[:5]} are smooth "
                         "units, norms or softmax, which have no switching hyperplanes")
    if not recorder.neuron_inputs:
        raise ValueError(f"{type(model).__name__} runs no ReLU-family unit (nn.ReLU, F.relu, LeakyReLU, PReLU, ReLU6): "
                         "it has no neurons with switching hyperplanes")
    return recorder.neuron_inputs, recorder.losers


def insens(
    model: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "exact",
    samples: int = 64,
    chunk_size: int = 32,
    maxpool_losers: str = "active",
    generator: torch.Generator | None = None,
    input_layer: str | None = None,
) -> InsensMap:
    """Insens ``Ω̂(x)`` for each example of ``x``, with the fast scheme (row norms forward, one backward).

    Args:
        model: a ReLU-family network (evaluated in eval mode; its modes are restored).
        x: inputs ``(B, *input_shape)``.
        method: ``"exact"`` or ``"hutchinson"`` row norms (the latter for large inputs; see ``samples``).
        samples: Hutchinson directions.
        chunk_size: input directions per batched forward.
        maxpool_losers: ``"active"`` (the paper's equation: only ``v ≤ 0`` is inactive) or ``"inactive"``.
        generator: random source for the Hutchinson directions.
        input_layer: explain in this module's output instead of ``x`` (e.g. the embedding of a token-id model); the
            map then has that output's shape.
    """
    if maxpool_losers not in LOSER_POLICIES:
        raise ValueError(f"maxpool_losers={maxpool_losers!r} is not one of {LOSER_POLICIES}")
    require_relu_network(model)
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        _check_input(x, input_layer)
        norms = row_norms_squared(model, x, method=method, samples=samples, chunk_size=chunk_size,
                                  generator=generator, input_layer=input_layer)
        xg = layer_output(model, x, input_layer).detach().clone().requires_grad_(True)
        pre, losers = neuron_preactivations(model, x, input_layer, xg.clone())
        losers = losers if maxpool_losers == "inactive" else {}
        batch = x.shape[0]
        x = xg.detach()  # the point the map is over: the input, or the input layer's output
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        inactive = torch.zeros(batch, dtype=x.dtype, device=x.device)
        zero_norm = torch.zeros(batch, dtype=x.dtype, device=x.device)
        r_min = torch.full((batch,), float("inf"), dtype=x.dtype, device=x.device)
        active_fraction = {}
        for name, v in pre.items():
            n2 = norms[name]
            value = v.detach()
            off = value <= 0
            if name in losers:
                off = off | losers[name]
            usable = n2 > 0
            chosen = off & usable
            c = torch.where(chosen, value / torch.where(usable, n2, torch.ones_like(n2)), torch.zeros_like(value))
            total = total + (c * v).sum()
            inactive += chosen.flatten(1).sum(1)
            zero_norm += (~usable).flatten(1).sum(1)
            r_min = torch.minimum(r_min, switch_distance(value, n2).flatten(1).min(1).values)
            active_fraction[name] = (value > 0).flatten(1).float().mean(1)
        (grad,) = torch.autograd.grad(total, xg) if total.requires_grad else (torch.zeros_like(x),)
        scale = inactive.clamp_min(1).view(-1, *([1] * (x.dim() - 1)))
    return InsensMap(
        map=(grad / scale).detach(), inactive=inactive, zero_norm=zero_norm, r_min=r_min,
        active_fraction=active_fraction, method=method,
    )


def _check_input(x: torch.Tensor, input_layer: str | None) -> None:
    if input_layer is None and not x.is_floating_point():
        raise TypeError(f"the input is {x.dtype} (token ids?), which has no neighbourhood to project onto: pass "
                        "input_layer='<module name>' (e.g. the embedding) to explain in that layer's output")


def insens_naive(model: nn.Module, x: torch.Tensor, maxpool_losers: str = "active") -> torch.Tensor:
    """Insens by definition: one backward pass per inactive neuron (a reference for tests and benchmarks)."""
    require_relu_network(model)
    maps = []
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            _, losers = neuron_preactivations(model, x.detach().clone())
        losers = losers if maxpool_losers == "inactive" else {}
        for b in range(x.shape[0]):
            xb = x[b : b + 1].detach().clone().requires_grad_(True)
            pre, _ = neuron_preactivations(model, xb.clone())
            acc, count = torch.zeros_like(xb), 0
            for name, v in pre.items():
                flat = v.flatten()
                off = flat.detach() <= 0
                if name in losers:
                    off = off | losers[name][b].flatten()
                for i in torch.nonzero(off).flatten().tolist():
                    (w,) = torch.autograd.grad(flat[i], xb, retain_graph=True)
                    n2 = w.pow(2).sum()
                    if n2 > 0:
                        acc += flat[i].detach() / n2 * w
                        count += 1
            maps.append(acc / max(count, 1))
    return torch.cat(maps).detach()


@dataclass
class SwitchedProjections:
    """``v_i(x) = ŵ_i·x + b̂_i`` for the neurons of one layer.

    Attributes:
        weight: ``ŵ``, shape ``(B, N, *input_shape)``.
        bias: ``b̂`` from the frozen-gate zero pass, ``(B, N)``.
        pre: the pre-activations ``v`` themselves, ``(B, N)``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    pre: torch.Tensor

    def centres(self, x: torch.Tensor) -> torch.Tensor:
        """Each neuron's centre ``ĉ_i = x − (v_i/‖ŵ_i‖²)·ŵ_i``: x projected onto the neuron's hyperplane."""
        w = self.weight.flatten(2)
        step = (self.pre / w.pow(2).sum(-1).clamp_min(1e-300))[..., None] * w
        return (x.flatten(1)[:, None, :] - step).view_as(self.weight)


def switched_projections(
    model: nn.Module, x: torch.Tensor, layer: str, neurons: torch.Tensor | None = None, chunk_size: int = 256
) -> SwitchedProjections:
    """The linear projections of the neurons at the input of the ReLU-family module ``layer`` (Theorem 1).

    Args:
        model: a ReLU-family network.
        x: inputs ``(B, *input_shape)``.
        layer: a ReLU-family call site (a module name such as ``"features.2"``; ``"<name>#2"`` for its second call;
            ``"<block>:relu"`` for a functional call inside ``<block>.forward``).
        neurons: flat indices of the neurons to project (default: all of the layer's).
        chunk_size: neurons per batched backward.
    """
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        pre, _ = neuron_preactivations(model, xg.clone())
        if layer not in pre:
            raise ValueError(f"layer={layer!r} is not a ReLU-family call site; neuron layers: {sorted(pre)}")
        v = pre[layer].flatten(1)
        idx = torch.arange(v.shape[1], device=v.device) if neurons is None else neurons.to(v.device)
        rows = []
        for start in range(0, idx.numel(), chunk_size):
            part = idx[start : start + chunk_size]
            cot = F.one_hot(part, v.shape[1]).to(v.dtype)[:, None, :].expand(-1, v.shape[0], -1)
            rows.append(batched_vjp(v, xg, cot, retain=True))
        weight = torch.cat(rows).movedim(0, 1).detach()
        recorder = GateRecorder(model, gated=False, neurons=True)
        with torch.no_grad():
            with recorder.record():
                model(xg.detach().clone())
            with recorder.replay():
                model(torch.zeros_like(xg))
        bias = recorder.neuron_inputs[layer].flatten(1)[:, idx]
    return SwitchedProjections(weight=weight, bias=bias, pre=v.detach()[:, idx])
