"""Gates: the input-dependent switches that make a network locally linear, recorded and replayed by forward hooks.

For a fixed input x, every nonlinearity of a network acts as a *gate* on its input z:

* piecewise-linear elementwise units (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh) act as ``slope·z + offset`` with the
  slope and offset of the linear piece z lies on (the tangent; exact on the whole region around x);
* max-pooling selects the winning input of each window (a 0/1 selection matrix);
* smooth units have no linear pieces; in **gated-linear** mode they are written ``gate·z + f(0)`` with the gate
  ``(f(z) − f(0))/z`` held fixed (GELU becomes ``z·Φ(z)`` with Φ(z) detached), LayerNorm divides by a fixed
  standard deviation (the centring stays linear), and softmax outputs (attention weights) are held fixed.

With every gate fixed, the network is affine in its input. :class:`GateRecorder` records the gates during a forward
pass on x (``record``) and can replay them on another input (``replay``), e.g. zero, which yields the bias ``b(x)``
of ``F(x) = W(x)·x + b(x)`` independently of the Jacobian. In ``record`` mode with ``gated=True`` the forward pass
itself is rewritten through the detached gates, so autograd differentiates the gated network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.Hardtanh)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
SMOOTH = (nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish,
          nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Softsign)
NORMS = (nn.LayerNorm, nn.GroupNorm)
SOFTMAX = (nn.Softmax,)
# Modules known to be affine in eval mode (or to vanish there); anything else without parameters is reported.
AFFINE = (nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
          nn.Dropout3d, nn.AlphaDropout, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
          nn.ConstantPad3d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
UNSUPPORTED = (nn.MultiheadAttention,)

Mode = Literal["exact", "gated-linear"]


def _is_affine(module: nn.Module) -> bool:
    if isinstance(module, AFFINE):
        return True
    conv_or_norm = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Embedding)
    return isinstance(module, conv_or_norm)


def classify(model: nn.Module) -> tuple[Mode, list[str]]:
    """The linearization mode a model needs, and the names of leaf modules of unknown linearity.

    Returns ``"exact"`` when every gating module is piecewise-linear, ``"gated-linear"`` when smooth units,
    LayerNorm/GroupNorm or softmax are present.

    Raises:
        NotImplementedError: for modules whose gates cannot be fixed from outside (``nn.MultiheadAttention``).
    """
    mode: Mode = "exact"
    unknown = []
    for name, module in model.named_modules():
        if isinstance(module, UNSUPPORTED):
            raise NotImplementedError(
                f"{name!r} is a {type(module).__name__}, whose softmax runs inside a fused kernel and cannot be held "
                "fixed; build attention from nn.Softmax (or nn.Linear + nn.Softmax modules) to linearize it."
            )
        if isinstance(module, SMOOTH + NORMS + SOFTMAX):
            mode = "gated-linear"
        elif not isinstance(module, PIECEWISE_LINEAR + MAX_POOLS) and not list(module.children()):
            if not _is_affine(module) and not isinstance(module, _metric_types()):
                unknown.append(name)
    return mode, unknown


def _metric_types() -> tuple[type, ...]:
    try:
        from torchmetrics import Metric

        return (Metric,)
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return ()


def _slope(module: nn.Module, z: torch.Tensor) -> torch.Tensor | None:
    """Closed-form slope of the common piecewise-linear units (autograd's convention: 0 at the kinks)."""
    if type(module) is nn.ReLU:
        return (z > 0).to(z.dtype)
    if type(module) is nn.LeakyReLU:
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, module.negative_slope))
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        return ((z > module.min_val) & (z < module.max_val)).to(z.dtype)
    return None


def _tangent(module: nn.Module, z: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slope and offset of the linear piece of a piecewise-linear unit at z (derivative 0 at kinks, as autograd)."""
    z = z.detach()
    slope = _slope(module, z)
    if slope is not None:
        return slope, (output.detach() - slope * z)
    with torch.enable_grad():  # other units (PReLU, subclasses): differentiate the unit itself
        z_ = z.detach().requires_grad_(True)
        out = module.forward(z_)  # forward(), not __call__: our own hook must not fire again
        (slope,) = torch.autograd.grad(out.sum(), z_)
    return slope.detach(), (out - slope * z_).detach()


def _secant(module: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate ``(f(z) − f(0))/z`` (``f'(0)`` at z = 0) and offset ``f(0)`` of a smooth unit: ``f(z) = gate·z + f(0)``."""
    with torch.no_grad():
        f0 = module.forward(torch.zeros((), dtype=z.dtype, device=z.device))
        fz = module.forward(z)
        safe = torch.where(z == 0, torch.ones_like(z), z)
        gate = torch.where(z == 0, _derivative_at_zero(module, z), (fz - f0) / safe)
    return gate, f0.expand_as(z)


def _derivative_at_zero(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        zero = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        (d,) = torch.autograd.grad(module.forward(zero), zero)
    return d.detach()


class GateRecorder:
    """Record the gates of every gating module during one forward pass, and replay them on another input.

    Args:
        model: the network (evaluated in eval mode by the caller).
        gated: also fix the gates of smooth units, norms and softmax (gated-linear mode); otherwise only
            piecewise-linear units and max-pools are recorded.
    """

    def __init__(self, model: nn.Module, gated: bool) -> None:
        self.model = model
        self.gated = gated
        self.gates: dict[str, tuple[torch.Tensor, ...]] = {}
        self._phase: Literal["off", "record", "replay"] = "off"
        self._modules = {
            name: m for name, m in model.named_modules()
            if isinstance(m, PIECEWISE_LINEAR + MAX_POOLS) or (gated and isinstance(m, SMOOTH + NORMS + SOFTMAX))
        }

    @contextmanager
    def _hooks(self, phase: Literal["record", "replay"]) -> Iterator[GateRecorder]:
        handles = [m.register_forward_hook(self._hook(name), with_kwargs=True) for name, m in self._modules.items()]
        self._phase = phase
        try:
            yield self
        finally:
            self._phase = "off"
            for handle in handles:
                handle.remove()

    def record(self) -> Any:
        """Context: forward passes inside record the gates (and, when gated, route outputs through them)."""
        self.gates = {}
        return self._hooks("record")

    def replay(self) -> Any:
        """Context: forward passes inside apply the recorded gates instead of each unit's own nonlinearity."""
        if not self.gates and self._modules:
            raise RuntimeError("no gates recorded: run a forward pass inside record() first")
        return self._hooks("replay")

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            z = args[0] if args else next(iter(kwargs.values()))
            if self._phase == "record":
                self.gates[name] = self._gate(module, z, output)
            return self._apply(module, name, z, output)

        return hook

    def _gate(self, module: nn.Module, z: torch.Tensor, output: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(module, PIECEWISE_LINEAR):
            return _tangent(module, z, output)
        if isinstance(module, MAX_POOLS):
            return (pool_indices(module, z),)
        if isinstance(module, SMOOTH):
            return _secant(module, z)
        if isinstance(module, NORMS):
            return (_norm_std(module, z).detach(),)
        return (output.detach(),)  # softmax: the attention weights themselves

    def _apply(self, module: nn.Module, name: str, z: torch.Tensor, output: Any) -> Any:
        """The unit's output through its recorded gate; ``None`` keeps the module's own output."""
        gates = self.gates[name]
        if isinstance(module, PIECEWISE_LINEAR + MAX_POOLS) and self._phase == "record":
            return None  # autograd already differentiates the linear piece / routes to the winner
        if isinstance(module, PIECEWISE_LINEAR):
            slope, offset = gates
            return slope * z + offset
        if isinstance(module, MAX_POOLS):
            return _gather_pool(z, gates[0])
        if isinstance(module, SMOOTH):
            gate, offset = gates
            return gate * z + offset
        if isinstance(module, NORMS):
            return _norm_with_std(module, z, gates[0])
        return gates[0]  # softmax weights held fixed


def pool_indices(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Flat indices (per channel) of the winners of each max-pool window."""
    dims = z.dim() - 2 if z.dim() >= 3 else 1
    with torch.no_grad():
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            fn = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[dims]
            _, idx = fn(z, module.output_size, return_indices=True)
        else:
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            _, idx = fn(z, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
                        return_indices=True)
    return idx


def _gather_pool(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each window's output taken from the recorded winner: a fixed 0/1 selection, linear in z."""
    picked = z.flatten(start_dim=2).gather(2, idx.flatten(start_dim=2))
    return picked.view(idx.shape)


def _norm_std(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        return torch.sqrt(z.var(dim=dims, unbiased=False, keepdim=True) + module.eps)
    groups = z.view(z.shape[0], module.num_groups, -1)
    std = torch.sqrt(groups.var(dim=-1, unbiased=False, keepdim=True) + module.eps)
    return std


def _norm_with_std(module: nn.Module, z: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """LayerNorm/GroupNorm with the standard deviation held fixed: centring and scaling stay linear in z."""
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        out = (z - z.mean(dim=dims, keepdim=True)) / std
        if module.elementwise_affine:
            out = out * module.weight + (module.bias if module.bias is not None else 0)
        return out
    groups = z.view(z.shape[0], module.num_groups, -1)
    out = ((groups - groups.mean(dim=-1, keepdim=True)) / std).view_as(z)
    if module.affine:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out
