"""Gate rules: how each nonlinear torch operator is recorded at an input and replayed as a fixed (affine) map.

A *gate* is what an operator's nonlinearity depends on at a given input; held fixed, the operator becomes affine in
its tensor input. The rules are keyed by the operator itself (``F.relu``, ``Tensor.relu_``, ``torch.max``...), not
by module class, so functional calls, in-place variants and modules called at several sites are all seen
(:class:`~lightning_xai._core.gates.GateRecorder` intercepts them with a ``TorchFunctionMode``).

Kinds of rules:

* ``neuron`` / ``piecewise`` (exact): the ReLU family, clamps and ``abs`` act as ``slope·z + offset`` on the linear
  piece z lies on; max-pools and ``max``/``min``/``amax`` over a dimension select fixed winners; ``step`` operators
  (comparisons, ``sign``, rounding) are constant around x, so their outputs (masks for ``torch.where`` or a product,
  as in ``x * (x > 0)``) are held;
* ``activation`` (gated-linear): a smooth unit ``f`` is written ``gate·z + f(0)`` with ``gate = (f(z) − f(0))/z``
  held fixed (``f'(0)`` where z = 0);
* ``held`` (gated-linear): normalisers and attention weights (softmax, exp, sqrt, rsqrt, norms, variances) are held
  at their values; ``log_softmax`` subtracts a fixed ``logsumexp``;
* ``norm`` / ``attention`` (gated-linear): LayerNorm, GroupNorm, RMSNorm and instance norm divide by a fixed
  standard deviation (centring stays linear); scaled-dot-product attention multiplies the values by fixed weights;
* ``product`` (gated-linear): a product (or quotient) of two input-dependent tensors one of which is a smooth unit's
  output (a sigmoid gate of squeeze-excitation, SwiGLU's SiLU branch) holds that factor fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

T = torch.Tensor


# ---------------------------------------------------------------------------------------------- argument helpers
def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``name`` at position ``index`` of a call."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def is_inplace(func: Callable, args: tuple, kwargs: dict, inplace_index: int | None = None) -> bool:
    """Whether a call overwrites its first argument (``relu_``, ``F.relu(x, inplace=True)``...)."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    if name.startswith("__i"):  # __imul__, __itruediv__
        return True
    if inplace_index is not None:
        return bool(arg(args, kwargs, inplace_index, "inplace", False))
    return bool(kwargs.get("inplace", False))


# ---------------------------------------------------------------------------------------------- the rules
@dataclass(frozen=True)
class Rule:
    """How one operator is recorded and replayed.

    Attributes:
        kind: ``neuron``, ``piecewise``, ``activation``, ``held``, ``norm``, ``attention`` or ``log_softmax``.
        slope: for elementwise piecewise-linear units, ``(z, args, kwargs) -> slope`` (None: differentiate the op).
        inplace_index: position of an ``inplace`` argument, if the operator has one.
    """

    kind: str
    slope: Callable[[T, tuple, dict], T] | None = None
    inplace_index: int | None = None

    @property
    def gated(self) -> bool:
        """True when the rule changes the network (gated-linear), False when the op is piecewise-linear (exact)."""
        return self.kind not in ("neuron", "piecewise", "pool", "select", "reduce", "step")


def _relu_slope(z: T, args: tuple, kwargs: dict) -> T:
    return (z > 0).to(z.dtype)


def _leaky_slope(z: T, args: tuple, kwargs: dict) -> T:
    negative = arg(args, kwargs, 1, "negative_slope", 0.01)
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative))


def _hardtanh_slope(z: T, args: tuple, kwargs: dict) -> T:
    low, high = arg(args, kwargs, 1, "min_val", -1.0), arg(args, kwargs, 2, "max_val", 1.0)
    return ((z > low) & (z < high)).to(z.dtype)


def _relu6_slope(z: T, args: tuple, kwargs: dict) -> T:
    return ((z > 0) & (z < 6)).to(z.dtype)


def _clamp_slope(z: T, args: tuple, kwargs: dict) -> T:
    low, high = arg(args, kwargs, 1, "min"), arg(args, kwargs, 2, "max")
    inside = torch.ones_like(z, dtype=torch.bool)
    if low is not None:
        inside = inside & (z >= low)
    if high is not None:
        inside = inside & (z <= high)
    return inside.to(z.dtype)


def _clamp_min_slope(z: T, args: tuple, kwargs: dict) -> T:
    return (z >= arg(args, kwargs, 1, "min")).to(z.dtype)


def _clamp_max_slope(z: T, args: tuple, kwargs: dict) -> T:
    return (z <= arg(args, kwargs, 1, "max")).to(z.dtype)


def _abs_slope(z: T, args: tuple, kwargs: dict) -> T:
    return torch.sign(z)


def _build_table() -> dict[Callable, Rule]:
    Tn = torch.Tensor
    table: dict[Callable, Rule] = {}

    def add(rule: Rule, *funcs: Any) -> None:
        for func in funcs:
            if func is not None:
                table[func] = rule

    add(Rule("neuron", _relu_slope, 1), F.relu)
    add(Rule("neuron", _relu_slope), F.relu_, torch.relu, torch.relu_, Tn.relu, Tn.relu_)
    add(Rule("neuron", _leaky_slope, 2), F.leaky_relu)
    add(Rule("neuron", _leaky_slope), F.leaky_relu_)
    add(Rule("neuron", None), F.prelu, torch.prelu)
    add(Rule("neuron", _relu6_slope, 1), F.relu6)
    add(Rule("piecewise", _hardtanh_slope, 3), F.hardtanh)
    add(Rule("piecewise", _hardtanh_slope), F.hardtanh_)
    add(Rule("piecewise", _clamp_slope), torch.clamp, torch.clip, Tn.clamp, Tn.clip, Tn.clamp_, Tn.clip_,
        torch.clamp_, torch.clip_)
    add(Rule("piecewise", _clamp_min_slope), torch.clamp_min, Tn.clamp_min, Tn.clamp_min_, torch.clamp_min_)
    add(Rule("piecewise", _clamp_max_slope), torch.clamp_max, Tn.clamp_max, Tn.clamp_max_, torch.clamp_max_)
    add(Rule("piecewise", _abs_slope), torch.abs, Tn.abs, Tn.abs_, torch.abs_, Tn.__abs__)
    add(Rule("pool"), F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
        F.adaptive_max_pool3d)
    add(Rule("select"), torch.max, Tn.max, torch.min, Tn.min, torch.maximum, Tn.maximum, torch.minimum, Tn.minimum)
    add(Rule("reduce"), torch.amax, Tn.amax, torch.amin, Tn.amin)
    # piecewise-constant: comparisons (masks for torch.where or a product), sign, rounding; exact, held at x
    add(Rule("step"), torch.gt, torch.lt, torch.ge, torch.le, Tn.gt, Tn.lt, Tn.ge, Tn.le, Tn.__gt__, Tn.__lt__,
        Tn.__ge__, Tn.__le__, torch.sign, Tn.sign, torch.heaviside, torch.floor, Tn.floor, torch.ceil, Tn.ceil,
        torch.round, Tn.round, torch.trunc, Tn.trunc)

    add(Rule("activation"), F.gelu, F.softsign, F.tanhshrink, F.logsigmoid, torch.tanh,
        Tn.tanh, torch.sigmoid, Tn.sigmoid, F.sigmoid, F.tanh, torch.erf, Tn.erf, Tn.tanh_, Tn.sigmoid_,
        torch.tanh_, torch.sigmoid_, torch.square, Tn.square)
    add(Rule("activation", inplace_index=1), F.silu, F.hardswish, F.hardsigmoid, F.mish)
    add(Rule("activation", inplace_index=2), F.elu, F.celu)
    add(Rule("activation", inplace_index=1), F.selu)
    add(Rule("activation"), F.softplus, F.elu_, F.selu_, F.celu_)
    add(Rule("power"), torch.pow, Tn.pow, Tn.__pow__)
    add(Rule("held"), F.softmax, torch.softmax, Tn.softmax, torch.exp, Tn.exp, Tn.exp_, torch.exp_, torch.sqrt,
        Tn.sqrt, torch.rsqrt, Tn.rsqrt, torch.reciprocal, Tn.reciprocal, torch.log, Tn.log, torch.norm, Tn.norm,
        torch.linalg.vector_norm, torch.linalg.norm, torch.var, Tn.var, torch.std, Tn.std, torch.logsumexp,
        Tn.logsumexp)
    add(Rule("log_softmax"), F.log_softmax, torch.log_softmax, Tn.log_softmax)
    add(Rule("norm"), F.layer_norm, F.group_norm, F.instance_norm, getattr(F, "rms_norm", None))
    add(Rule("attention"), F.scaled_dot_product_attention)
    return table


RULES: dict[Callable, Rule] = _build_table()
PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul_,
            torch.Tensor.__imul__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.div_,
            torch.Tensor.__itruediv__, torch.true_divide}
DIVISIONS = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.div_, torch.Tensor.__itruediv__,
             torch.true_divide}


# ---------------------------------------------------------------------------------------------- elementwise gates
def tangent(rule: Rule, func: Callable, args: tuple, kwargs: dict, z0: T, out: T) -> tuple[T, T]:
    """Slope and offset of a piecewise-linear unit's piece at ``z0`` (autograd's convention at kinks)."""
    if rule.slope is not None:
        slope = rule.slope(z0, args, kwargs)
    else:  # PReLU and friends: differentiate the op itself
        with torch.enable_grad():
            zg = z0.detach().clone().requires_grad_(True)
            (slope,) = torch.autograd.grad(func(zg, *args[1:], **kwargs).sum(), zg)
    return slope.detach(), (out.detach() - slope * z0).detach()


def _without_inplace(func: Callable, args: tuple, kwargs: dict, rule: Rule) -> tuple[tuple, dict]:
    if rule.inplace_index is None:
        return args, {k: v for k, v in kwargs.items() if k != "inplace"}
    if len(args) > rule.inplace_index:
        return args[: rule.inplace_index] + (False,) + args[rule.inplace_index + 1 :], kwargs
    return args, {**kwargs, "inplace": False}


_OUT_OF_PLACE = {torch.Tensor.tanh_: torch.tanh, torch.Tensor.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh,
                 torch.sigmoid_: torch.sigmoid, F.elu_: F.elu, F.selu_: F.selu, F.celu_: F.celu,
                 torch.Tensor.exp_: torch.exp, torch.exp_: torch.exp}


def out_of_place(func: Callable, args: tuple, kwargs: dict, rule: Rule) -> tuple[Callable, tuple, dict]:
    """The same call without overwriting its input."""
    func = _OUT_OF_PLACE.get(func, func)
    args, kwargs = _without_inplace(func, args, kwargs, rule)
    return func, args, kwargs


def secant(func: Callable, args: tuple, kwargs: dict, z: T) -> tuple[T, T]:
    """Gate ``(f(z) − f(0))/z`` (``f'(0)`` at z = 0) and offset ``f(0)`` of an elementwise smooth unit at ``z``."""
    rest = args[1:]
    with torch.no_grad():
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        f0 = func(zero, *rest, **kwargs)
        fz = func(z, *rest, **kwargs)
    with torch.enable_grad():
        zero_g = zero.clone().requires_grad_(True)
        (d0,) = torch.autograd.grad(func(zero_g, *rest, **kwargs), zero_g)
    safe = torch.where(z == 0, torch.ones_like(z), z)
    gate = torch.where(z == 0, d0.to(z.dtype), (fz - f0) / safe)
    return gate.detach(), f0.detach().expand_as(z)


# ---------------------------------------------------------------------------------------------- pools and selections
_POOL_INDEX_POSITION = {F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6, F.adaptive_max_pool1d: 2,
                        F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2}


def pool_with_winners(func: Callable, args: tuple, kwargs: dict) -> tuple[T, T, bool]:
    """A max-pool call run once with ``return_indices=True``: its output, the flat per-channel index of each
    window's winner, and whether the caller asked for the indices itself."""
    position = _POOL_INDEX_POSITION[func]
    wanted = bool(arg(args, kwargs, position, "return_indices", False))
    if len(args) > position:
        args = args[:position] + (True,) + args[position + 1 :]
    else:
        kwargs = {**kwargs, "return_indices": True}
    out, idx = func(*args, **kwargs)
    return out, idx, wanted


def pool_winners(func: Callable, args: tuple, kwargs: dict) -> tuple[T, bool]:
    """Flat per-channel indices of each max-pool window's winner, and whether the call returned them itself."""
    with torch.no_grad():
        _, idx, wanted = pool_with_winners(func, (args[0].detach(), *args[1:]), kwargs)
    return idx, wanted


def gather_pool(z: T, idx: T) -> T:
    """Each window's output taken from the recorded winner: a fixed 0/1 selection, linear in z."""
    if z.dim() == idx.dim() - 1:  # unbatched (C, ...) input
        return gather_pool(z[None], idx[None])[0]
    picked = z.flatten(start_dim=2).gather(2, idx.flatten(start_dim=2))
    return picked.view(idx.shape)


def selection_dim(args: tuple, kwargs: dict) -> int | None:
    """The ``dim`` of a ``max``/``min`` reduction call (None for the elementwise two-tensor form)."""
    second = arg(args, kwargs, 1, "dim")
    if isinstance(second, torch.Tensor):
        return None
    return second


def _reduced_dims(z: T, args: tuple, kwargs: dict) -> tuple[int, ...]:
    dim = arg(args, kwargs, 1, "dim", ())
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % z.dim() for d in dims) if dims else tuple(range(z.dim()))


def reduce_winners(func: Callable, args: tuple, kwargs: dict) -> tuple[T, tuple[int, ...], bool]:
    """Flat index of the winner of each ``amax``/``amin`` reduction, the reduced dims and ``keepdim``."""
    z = args[0].detach()
    dims = _reduced_dims(z, args, kwargs)
    flat = z.movedim(dims, tuple(range(z.dim() - len(dims), z.dim()))).flatten(z.dim() - len(dims))
    largest = func in (torch.amax, torch.Tensor.amax)
    idx = flat.argmax(-1) if largest else flat.argmin(-1)
    return idx, dims, bool(arg(args, kwargs, 2, "keepdim", False))


def gather_reduced(z: T, idx: T, dims: tuple[int, ...], keepdim: bool) -> T:
    """The recorded winners of a reduction taken from ``z``: a fixed selection, linear in z."""
    flat = z.movedim(dims, tuple(range(z.dim() - len(dims), z.dim()))).flatten(z.dim() - len(dims))
    out = flat.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    for d in sorted(dims) if keepdim else ():
        out = out.unsqueeze(d)
    return out


# ---------------------------------------------------------------------------------------------- norms and attention
def norm_std(func: Callable, args: tuple, kwargs: dict) -> T:
    """The standard deviation (RMS for RMSNorm) a normalisation layer divides by, per normalised group."""
    z = args[0].detach()
    if func is F.layer_norm:
        dims = tuple(range(-len(arg(args, kwargs, 1, "normalized_shape")), 0))
        eps = arg(args, kwargs, 4, "eps", 1e-5)
        return torch.sqrt(z.var(dim=dims, unbiased=False, keepdim=True) + eps)
    if func is getattr(F, "rms_norm", None):
        dims = tuple(range(-len(arg(args, kwargs, 1, "normalized_shape")), 0))
        eps = arg(args, kwargs, 3, "eps", None)
        eps = torch.finfo(z.dtype).eps if eps is None else eps
        return torch.sqrt(z.pow(2).mean(dim=dims, keepdim=True) + eps)
    if func is F.group_norm:
        groups, eps = arg(args, kwargs, 1, "num_groups"), arg(args, kwargs, 4, "eps", 1e-5)
        grouped = z.reshape(z.shape[0], groups, -1)
        return torch.sqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + eps)
    eps = arg(args, kwargs, 7, "eps", 1e-5)  # instance_norm
    flat = z.reshape(z.shape[0], z.shape[1], -1)
    return torch.sqrt(flat.var(dim=-1, unbiased=False, keepdim=True) + eps)


def norm_with_std(func: Callable, args: tuple, kwargs: dict, std: T) -> T:
    """The normalisation with its standard deviation held at ``std``: linear in the input."""
    z = args[0]
    if func in (F.layer_norm, getattr(F, "rms_norm", None)):
        shape = arg(args, kwargs, 1, "normalized_shape")
        dims = tuple(range(-len(shape), 0))
        centred = z if func is not F.layer_norm else z - z.mean(dim=dims, keepdim=True)
        out = centred / std
        weight = arg(args, kwargs, 2, "weight")
        bias = arg(args, kwargs, 3, "bias") if func is F.layer_norm else None
    elif func is F.group_norm:
        groups = arg(args, kwargs, 1, "num_groups")
        grouped = z.reshape(z.shape[0], groups, -1)
        out = ((grouped - grouped.mean(dim=-1, keepdim=True)) / std).view_as(z)
        weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    else:  # instance_norm (running statistics are not used in eval)
        flat = z.reshape(z.shape[0], z.shape[1], -1)
        out = ((flat - flat.mean(dim=-1, keepdim=True)) / std).view_as(z)
        weight, bias = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    channel = func in (F.group_norm, F.instance_norm)
    view = (1, -1) + (1,) * (z.dim() - 2) if channel else None
    if weight is not None:
        out = out * (weight.view(view) if channel else weight)
    if bias is not None:
        out = out + (bias.view(view) if channel else bias)
    return out


def attention_weights(args: tuple, kwargs: dict) -> T:
    """The softmax weights of ``F.scaled_dot_product_attention`` (mask, causal mask, scale and GQA applied)."""
    q, k = args[0].detach(), args[1].detach()
    mask = arg(args, kwargs, 3, "attn_mask")
    causal = bool(arg(args, kwargs, 5, "is_causal", False))
    scale = arg(args, kwargs, 6, "scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if kwargs.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = q @ k.transpose(-2, -1) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def attend(weights: T, args: tuple, kwargs: dict) -> T:
    """Values mixed by fixed attention weights (GQA heads repeated as the fused kernel does)."""
    q, v = args[0], args[2]
    if kwargs.get("enable_gqa", False) and v.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    return weights.to(v.dtype) @ v
