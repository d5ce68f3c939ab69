"""Gates: the input-dependent switches that make a network locally linear, recorded and replayed per operator call.

For a fixed input x, every nonlinearity of a network acts as a *gate* on its input z (see
:mod:`~lightning_xai._core.gate_rules` for the rule of each operator): piecewise-linear units (ReLU family, clamps,
max-pooling) are exactly affine on the region around x; smooth units, normalisations, softmax and attention become
affine once their gates are held fixed (**gated-linear** mode). With every gate fixed, the network is affine in its
input.

:class:`GateRecorder` is a ``TorchFunctionMode``: it sees every torch operator call of a forward pass, whether it
comes from an ``nn.ReLU`` module, ``F.relu``, ``torch.relu``, ``x.relu_()`` or an activation module called at two
sites. It records one gate per *call* (named after the module the call ran in, ``layer1.0.relu`` then
``layer1.0.relu#2``) and replays them in call order on another input, e.g. zero, which yields the bias ``b(x)`` of
``F(x) = W(x)·x + b(x)`` independently of the Jacobian. While recording, gated-linear rules route the forward itself
through the detached gates, so autograd differentiates the gated network. Compiled (``torch.compile``) submodules run
eagerly inside the recorder, so their operators are seen too.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from lightning_xai._core import gate_rules as R
from lightning_xai._core.gate_modules import (  # noqa: F401 - re-exported: the static view lives there
    GATED_MODULES,
    MAX_POOLS,
    NEURON_UNITS,
    PIECEWISE_LINEAR,
    Mode,
    classify,
    refuse_recurrent,
    unwrap_compiled,
)

Phase = Literal["off", "record", "replay", "capture"]

@dataclass
class Site:
    """One recorded call of a nonlinear operator.

    Attributes:
        name: the module the call ran in, with ``:<op>`` for calls inside a non-leaf module's ``forward`` and
            ``#k`` for the k-th call under the same name in one forward pass.
        kind: the rule's kind (``neuron``, ``piecewise``, ``pool``, ``select``, ``activation``, ``held``...).
        gated: whether holding the gate changes the network (gated-linear) rather than describing its linear piece.
        gates: the tensors the replay needs.
        info: rule-specific flags (e.g. which factor of a product is held).
    """

    name: str
    kind: str
    gated: bool
    gates: tuple[torch.Tensor, ...]
    info: Any = None


class GateRecorder(TorchFunctionMode):
    """Record every nonlinear operator's gate during one forward pass, and replay the gates on another input.

    Args:
        model: the network (its modules name the call sites; evaluated in eval mode by the caller).
        gated: hold smooth units, norms, softmax and attention fixed (gated-linear); otherwise only piecewise-linear
            operators are recorded and smooth ones run as they are (and are listed in :attr:`ungated`).
        neurons: also keep the input of every ReLU-family call (its pre-activation, cloned before an in-place call)
            in :attr:`neuron_inputs`, and for those feeding a max-pool the losers' mask in :attr:`losers`.
    """

    def __init__(self, model: nn.Module, gated: bool = True, neurons: bool = False) -> None:
        super().__init__()
        self.model = model
        self.gated = gated
        self.neurons = neurons
        self.sites: list[Site] = []
        self.ungated: list[str] = []
        self.neuron_inputs: dict[str, torch.Tensor] = {}
        self.losers: dict[str, torch.Tensor] = {}
        self._phase: Phase = "off"
        self._cursor = 0
        self._stack: list[tuple[str, nn.Module]] = []
        self._counts: dict[str, int] = {}
        self._dependent: dict[int, weakref.ref] = {}
        self._gate_outputs: dict[int, weakref.ref] = {}
        self._neuron_outputs: dict[int, tuple[weakref.ref, str]] = {}
        self._manual = False
        self._names: dict[int, str] | None = None  # module id -> name, built at the first session
        self._compiled = False

    # ------------------------------------------------------------------ public contexts
    @property
    def mode(self) -> Mode:
        """``"gated-linear"`` when a recorded site changed the network, else ``"exact"``."""
        return "gated-linear" if any(site.gated for site in self.sites) else "exact"

    def gated_sites(self) -> list[str]:
        """Names of the recorded sites that hold a smooth gate fixed."""
        return [site.name for site in self.sites if site.gated]

    def record(self) -> contextlib.AbstractContextManager:
        """Context: forward passes inside record the gates (and, when gated, route outputs through them)."""
        self.sites, self.ungated, self.neuron_inputs, self.losers = [], [], {}, {}
        return self._session("record")

    def replay(self) -> contextlib.AbstractContextManager:
        """Context: forward passes inside apply the recorded gates instead of each operator's nonlinearity."""
        return self._session("replay")

    def capture(self) -> contextlib.AbstractContextManager:
        """Context: forward passes only collect the ReLU-family pre-activations (no gates; cheap)."""
        self.neuron_inputs, self.losers, self.ungated = {}, {}, []
        return self._session("capture")

    def track(self, x: torch.Tensor) -> torch.Tensor:
        """Mark ``x`` as an input the network is linear in. The tensor arguments of the outermost module call are
        marked automatically; gates only apply to operators whose input depends on a marked tensor."""
        self._manual = True
        self._mark(x)
        return x

    # ------------------------------------------------------------------ session plumbing
    @contextlib.contextmanager
    def _session(self, phase: Phase) -> Iterator[GateRecorder]:
        self._phase, self._cursor, self._counts, self._stack = phase, 0, {}, []
        self._dependent, self._gate_outputs, self._neuron_outputs = {}, {}, {}
        self._manual = False
        if self._names is None:
            # remove_duplicate=False: no memo set, so no hashing of every module (torchmetrics Metrics hash their state)
            modules = list(self.model.named_modules(remove_duplicate=False))
            self._names = {}
            for name, module in modules:
                self._names.setdefault(id(module), unwrap_compiled(name))
            self._compiled = any(type(m).__name__ == "OptimizedModule" for _, m in modules)
        with contextlib.ExitStack() as stack:
            # global module hooks (two registrations, whatever the model's size), active for this session only
            stack.enter_context(register_module_forward_pre_hook(self._enter))
            stack.enter_context(register_module_forward_hook(self._leave, always_call=True))
            stance = getattr(torch.compiler, "set_stance", None)
            if stance is not None and self._compiled:
                stack.enter_context(stance("force_eager"))
            stack.enter_context(self)
            try:
                yield self
            finally:
                self._phase = "off"
        if phase == "replay" and self._cursor != len(self.sites):
            raise RuntimeError(f"replay ran {self._cursor} of {len(self.sites)} recorded gates: the forward pass took "
                               "another path on the replayed input (data-dependent control flow cannot be linearized)")

    def _enter(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module)) if self._names is not None else None
        if name is None:
            return  # a module outside the explained model
        if not self._stack:  # a new forward pass: names count from one again
            self._counts = {}
            if not self._manual:
                self._mark(args)  # the outermost call's inputs are what the network is linear in
        self._stack.append((name, module))

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1][1] is module:
            self._stack.pop()

    def _site_name(self, func: Callable) -> str:
        name, module = self._stack[-1] if self._stack else ("", None)
        leaf = module is not None and name and not any(True for _ in module.children())
        op = getattr(func, "__name__", "op").strip("_")
        base = name if leaf else (f"{name}:{op}" if name else op)
        self._counts[base] = self._counts.get(base, 0) + 1
        count = self._counts[base]
        return base if count == 1 else f"{base}#{count}"

    # ------------------------------------------------------------------ dependence bookkeeping
    def _mark(self, value: Any, registry: dict | None = None) -> None:
        registry = self._dependent if registry is None else registry
        for leaf in _tensors(value):
            registry[id(leaf)] = weakref.ref(leaf)

    @staticmethod
    def _member(t: Any, registry: dict) -> bool:
        ref = registry.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _depends(self, value: Any) -> bool:
        return any(self._member(leaf, self._dependent) for leaf in _tensors(value))

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._phase == "off":
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._composite(func, args, kwargs)
        rule = R.RULES.get(func)
        z = args[0] if args else None
        if self._phase != "capture" and func in R.PRODUCTS:
            return self._product(func, args, kwargs)
        if rule is None or not (isinstance(z, torch.Tensor) and z.is_floating_point()):
            return self._passthrough(func, args, kwargs)
        if self._phase == "capture":
            return self._capture(rule, func, args, kwargs) if self._depends(args[:1]) else func(*args, **kwargs)
        if not self._depends(args if rule.kind in ("attention", "select", "step") else args[:1]):
            return self._passthrough(func, args, kwargs)  # a constant of the network (e.g. exp of a parameter)
        if rule.gated and not self.gated:
            self.ungated.append(self._site_name(func))
            return self._passthrough(func, args, kwargs)
        if rule.kind == "select" and not self._selection_applies(func, args, kwargs):
            return self._passthrough(func, args, kwargs)
        name = self._site_name(func)
        if self._phase == "record":
            out = self._record(rule, name, func, args, kwargs)
        else:
            out = self._replay(rule, name, func, args, kwargs)
        self._after_site(rule, name, args, out)
        return out

    def _passthrough(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if self._depends((args, kwargs)):
            self._mark(out)
            name = getattr(func, "__name__", "")
            if (name.endswith("_") or name in ("__setitem__",) or name.startswith("__i")) and args:
                self._mark(args[0])
        return out

    def _after_site(self, rule: R.Rule, name: str, args: tuple, out: Any) -> None:
        if rule.kind in ("held", "step"):
            return  # held outputs and step outputs (masks) are constants of the (gated) network around x
        if self._depends(args[:1]) or rule.kind in ("attention", "select") and self._depends(args):
            self._mark(out)
        if rule.kind == "activation":
            self._mark(out, self._gate_outputs)
        if self.neurons and rule.kind == "neuron" and isinstance(out, torch.Tensor):
            self._neuron_outputs[id(out)] = (weakref.ref(out), name)

    @staticmethod
    def _selection_applies(func: Callable, args: tuple, kwargs: dict) -> bool:
        if func in (torch.maximum, torch.Tensor.maximum, torch.minimum, torch.Tensor.minimum):
            return isinstance(R.arg(args, kwargs, 1, "other"), torch.Tensor)
        return isinstance(R.selection_dim(args, kwargs), int)

    # ------------------------------------------------------------------ record / replay
    def _record(self, rule: R.Rule, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        z = args[0]
        if rule.kind in ("neuron", "piecewise"):
            inplace = R.is_inplace(func, args, kwargs, rule.inplace_index)
            z0 = z.detach().clone() if inplace else z.detach()
            self._keep_neuron(rule, name, z, inplace)
            out = func(*args, **kwargs)
            self.sites.append(Site(name, rule.kind, False, R.tangent(rule, func, args, kwargs, z0, out)))
            return out
        if rule.kind == "pool":
            out, idx, wanted = R.pool_with_winners(func, args, kwargs)
            self._note_losers(z, idx.detach())
            self.sites.append(Site(name, "pool", False, (idx.detach(),), wanted))
            return (out, idx) if wanted else out
        if rule.kind == "select":
            return self._record_selection(name, func, args, kwargs)
        if rule.kind == "reduce":
            idx, dims, keepdim = R.reduce_winners(func, args, kwargs)
            self.sites.append(Site(name, "reduce", False, (idx,), (dims, keepdim)))
            return func(*args, **kwargs)
        if rule.kind == "step":
            out = func(*args, **kwargs)
            self.sites.append(Site(name, "step", False, (out.detach(),)))
            return out
        return self._record_gated(rule, name, func, args, kwargs)

    def _record_selection(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if func in (torch.maximum, torch.Tensor.maximum, torch.minimum, torch.Tensor.minimum):
            picked_first = (args[0] == out).detach()
            self.sites.append(Site(name, "select", False, (picked_first,)))
        else:
            keepdim = bool(R.arg(args, kwargs, 2, "keepdim", False))
            self.sites.append(Site(name, "select", False, (out.indices.detach(),), (R.selection_dim(args, kwargs),
                                                                                     keepdim, type(out))))
        return out

    def _record_gated(self, rule: R.Rule, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        z = args[0]
        inplace = R.is_inplace(func, args, kwargs, rule.inplace_index)
        base, base_args, base_kwargs = R.out_of_place(func, args, kwargs, rule)
        if rule.kind == "activation":
            gate, offset = R.secant(base, base_args, base_kwargs, z.detach())
            site, new = (gate, offset), gate * z + offset
        elif rule.kind == "power":
            exponent = R.arg(args, kwargs, 1, "exponent")
            if isinstance(exponent, torch.Tensor) or exponent <= 0:
                held = base(*base_args, **base_kwargs).detach()
                self.sites.append(Site(name, "held", True, (held,)))
                return _write(z, held, inplace)
            gate = z.detach().pow(exponent - 1)
            site, new = (gate, torch.zeros_like(gate)), gate * z
        elif rule.kind == "held":
            new = base(*base_args, **base_kwargs)
            site = tuple(t.detach() for t in _tensors(new))
            new = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, new)
        elif rule.kind == "log_softmax":
            dim = R.arg(args, kwargs, 1, "dim")
            lse = torch.logsumexp(z.detach(), dim=dim, keepdim=True)
            site, new = (lse,), z - lse
        elif rule.kind == "norm":
            std = R.norm_std(func, args, kwargs)
            site, new = (std,), R.norm_with_std(func, args, kwargs, std)
        else:  # attention
            weights = R.attention_weights(args, kwargs)
            site, new = (weights,), R.attend(weights, args, kwargs)
        self.sites.append(Site(name, rule.kind, True, site))
        return _write(z, new, inplace) if isinstance(new, torch.Tensor) else new

    def _replay(self, rule: R.Rule, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        site = self._next_site(name)
        z = args[0]
        inplace = R.is_inplace(func, args, kwargs, rule.inplace_index)
        kind = site.kind
        if kind in ("neuron", "piecewise"):
            self._keep_neuron(rule, name, z, inplace)
            slope, offset = site.gates
            return _write(z, slope * z + offset, inplace)
        if kind == "pool":
            picked = R.gather_pool(z, site.gates[0])
            return (picked, site.gates[0]) if site.info else picked
        if kind == "select":
            return self._replay_selection(site, args)
        if kind == "reduce":
            return R.gather_reduced(z, site.gates[0], *site.info)
        if kind == "step":
            return site.gates[0].clone()
        if kind == "activation" or (kind == "power" and len(site.gates) == 2):
            gate, offset = site.gates
            return _write(z, gate * z + offset, inplace)
        if kind == "held":
            held = site.gates[0].clone() if len(site.gates) == 1 else tuple(g.clone() for g in site.gates)
            return _write(z, held, inplace) if inplace else held
        if kind == "log_softmax":
            return z - site.gates[0]
        if kind == "norm":
            return _write(z, R.norm_with_std(func, args, kwargs, site.gates[0]), inplace)
        return R.attend(site.gates[0], args, kwargs)

    def _replay_selection(self, site: Site, args: tuple) -> Any:
        if site.info is None:
            return torch.where(site.gates[0], args[0], args[1])
        dim, keepdim, kind = site.info
        idx = site.gates[0]
        values = args[0].gather(dim, idx if keepdim else idx.unsqueeze(dim))
        return kind((values if keepdim else values.squeeze(dim), idx))

    def _next_site(self, name: str) -> Site:
        if self._cursor >= len(self.sites) or self.sites[self._cursor].name != name:
            expected = self.sites[self._cursor].name if self._cursor < len(self.sites) else "nothing"
            raise RuntimeError(f"replay reached gate {name!r} where {expected!r} was recorded: the forward pass took "
                               "another path on the replayed input (data-dependent control flow cannot be linearized)")
        site = self.sites[self._cursor]
        self._cursor += 1
        return site

    # ------------------------------------------------------------------ products and composites
    def _product(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``a * b`` (or ``a / b``) of two input-dependent tensors where one is a smooth unit's output: hold it."""
        operands = [a for a in args[:2]]
        if len(operands) < 2 or not all(isinstance(a, torch.Tensor) for a in operands):
            return self._passthrough(func, args, kwargs)
        if not (self._depends(operands[0]) and self._depends(operands[1])):
            return self._passthrough(func, args, kwargs)
        candidates = [1] if func in R.DIVISIONS else [1, 0]
        held = next((i for i in candidates if self._member(operands[i], self._gate_outputs)), None)
        if held is None:
            return self._passthrough(func, args, kwargs)
        name = self._site_name(func)
        if self._phase == "record":
            value = operands[held].detach()
            self.sites.append(Site(name, "product", True, (value,), held))
        else:
            value = self._next_site(name).gates[0]
        new_args = list(args)
        new_args[held] = value
        out = func(*new_args, **kwargs)
        self._mark(out)
        return out

    def _composite(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run a Python composite (``F.multi_head_attention_forward``) with the recorder seeing its inner calls."""
        with self:
            out = _unchecked(func)(*args, **kwargs)
        return out

    # ------------------------------------------------------------------ neurons (Insens)
    def _keep_neuron(self, rule: R.Rule, name: str, z: torch.Tensor, inplace: bool) -> None:
        if self.neurons and rule.kind == "neuron":
            self.neuron_inputs[name] = z.clone() if inplace else z

    def _note_losers(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        entry = self._neuron_outputs.get(id(z)) if self.neurons else None
        if entry is None or entry[0]() is not z:
            return
        won = torch.zeros_like(z.detach()).flatten(2)
        won.scatter_(2, idx.flatten(2), 1.0)
        self.losers[entry[1]] = won.view_as(z) == 0

    def _capture(self, rule: R.Rule, func: Callable, args: tuple, kwargs: dict) -> Any:
        name = self._site_name(func)
        z = args[0]
        if rule.kind == "neuron":
            self._keep_neuron(rule, name, z, R.is_inplace(func, args, kwargs, rule.inplace_index))
        elif rule.kind == "pool":
            self._note_losers(z, R.pool_winners(func, args, kwargs)[0])
        elif rule.gated:
            self.ungated.append(name)
        out = func(*args, **kwargs)
        self._mark(out)  # nothing is held while capturing: the network runs as it is
        if rule.kind == "neuron":
            self._neuron_outputs[id(out)] = (weakref.ref(out), name)
        return out


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a call's arguments or result, however nested in tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, (torch.Tensor, tuple, list, dict)):
                yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, (torch.Tensor, tuple, list, dict)):
                yield from _tensors(item)


def _write(z: torch.Tensor, new: Any, inplace: bool) -> Any:
    """``new`` as the call's result; for an in-place call, written into ``z`` (autograd records the copy)."""
    if not inplace or not isinstance(new, torch.Tensor):
        return new
    return z.copy_(new)


_UNCHECKED: dict[Callable, Callable] = {}


def _unchecked(func: Callable) -> Callable:
    """A copy of a Python torch function whose ``has_torch_function`` entry check is off, so that running it inside
    the active mode does not dispatch to the mode again (its inner operator calls still do)."""
    if func not in _UNCHECKED:
        scope = {**func.__globals__, "has_torch_function": lambda *_: False}
        copy = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
        copy.__kwdefaults__ = func.__kwdefaults__
        _UNCHECKED[func] = copy
    return _UNCHECKED[func]
