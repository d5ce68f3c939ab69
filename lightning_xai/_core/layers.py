"""Layer taps: resolve a dotted layer name and capture what flows through it with forward hooks.

Every method that explains an inner representation needs the same three things: find a module by its dotted
name (failing early, with the closest valid names, when it is misspelt), record its output (or input) during a
forward pass it does not own, and optionally stop that forward pass right after the layer so a truncated forward
costs less than a full one. :class:`LayerTap` does all three without changing the module's behaviour: the hook
only reads, and only while the tap is armed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

Capture = Literal["output", "input"]


class LayerNotFoundError(ValueError):
    """Raised when a dotted layer name does not name a submodule; the message lists the closest valid names."""


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (a dotted name as in ``model.named_modules()``; ``""`` is the model).

    Names resolve with or without the ``_orig_mod`` segments that ``torch.compile`` inserts (``features.2`` and
    ``features._orig_mod.2`` name the same layer of a model whose ``features`` were compiled).

    Raises:
        LayerNotFoundError: naming the bad value and the closest valid names.
    """
    if name == "":
        return model
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return model.get_submodule(name)
    plain = {_without_compile(n): n for n in names}  # torch.compile wraps modules in `_orig_mod`
    if _without_compile(name) in plain:
        return model.get_submodule(plain[_without_compile(name)])
    names = sorted(set(plain))
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = close or names[:10]
    raise LayerNotFoundError(
        f"layer={name!r} is not a submodule of {type(model).__name__}. "
        f"{'Closest names' if close else 'Valid names include'}: {', '.join(repr(h) for h in hint)}"
        f" ({len(names)} submodules; see model.named_modules())."
    )


def _without_compile(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def last_linear_name(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` in registration order: its input is the network's last hidden representation.

    Raises:
        LayerNotFoundError: if the model has no ``nn.Linear``.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if not linears:
        raise LayerNotFoundError(
            f"{type(model).__name__} has no nn.Linear layer, so no default layer can be chosen: "
            "pass layer='dotted.name'."
        )
    return linears[-1]


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass right after the tapped layer."""


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a layer produced: itself, the first tensor of a tuple/list, or the first tensor value of a dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    if hasattr(value, "last_hidden_state"):  # transformer-style output objects
        return _first_tensor(value.last_hidden_state)
    return None


class LayerTap:
    """Capture the output (or input) of one named layer of a model during forward passes.

    The hook is registered once with :meth:`attach` and removed with :meth:`detach`. It records only while the tap is
    armed (inside :meth:`recording` or :meth:`truncated`), so forward passes the tap does not care about (an
    explainer's own extra forwards, say) pass through untouched.

    Args:
        model: the module that owns the layer.
        name: dotted layer name.
        capture: ``"output"`` records what the layer returns; ``"input"`` records its first positional input.
    """

    def __init__(self, model: nn.Module, name: str, capture: Capture = "output") -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"capture={capture!r} is not one of 'output', 'input'")
        self.name = name
        self.capture = capture
        self.module = resolve_layer(model, name)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._armed = False
        self._stop = False
        self.value: torch.Tensor | None = None
        self.calls = 0

    def describe(self) -> str:
        """Human-readable description such as ``"the output of 'features.7' (MaxPool2d)"``."""
        return f"the {self.capture} of {self.name!r} ({type(self.module).__name__})"

    def attach(self) -> LayerTap:
        """Register the hook (idempotent)."""
        if self._handle is None:
            if self.capture == "output":
                self._handle = self.module.register_forward_hook(self._on_output)
            else:
                self._handle = self.module.register_forward_pre_hook(self._on_input)
        return self

    def detach(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, value: Any) -> None:
        if not self._armed:
            return
        tensor = _first_tensor(value)
        if tensor is None:  # e.g. Lightning's DDP wrapper calls the module as its training/validation step
            return
        self.value = tensor
        self.calls += 1
        if self._stop:
            raise _StopForward

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._record(output)

    def _on_input(self, module: nn.Module, args: Any) -> None:
        self._record(args)

    @contextmanager
    def recording(self) -> Iterator[LayerTap]:
        """Arm the tap for the forward passes run inside the block; the last capture is left in :attr:`value`."""
        self.attach()
        self.value, self.calls, self._armed = None, 0, True
        try:
            yield self
        finally:
            self._armed = False

    def arm(self) -> None:
        """Start recording until :meth:`disarm` (for captures that span Lightning hooks, e.g. a training step)."""
        self.attach()
        self.value, self.calls, self._armed, self._stop = None, 0, True, False

    def disarm(self) -> torch.Tensor | None:
        """Stop recording and return the last capture (``None`` if the layer did not run)."""
        self._armed = False
        value, self.value = self.value, None
        return value

    def truncated(self, model: nn.Module, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``model(*inputs)`` only as far as the tapped layer and return its capture.

        The forward is stopped by an exception raised from the hook, so the layers after the tap never run; autograd
        is unaffected, so the result can be differentiated (this is how a re-initialised copy of a network is trained
        as an encoder up to a layer).

        Raises:
            RuntimeError: if the layer never ran during the forward pass.
        """
        self.attach()
        self.value, self.calls, self._armed, self._stop = None, 0, True, True
        try:
            model(*inputs, **kwargs)
        except _StopForward:
            pass
        finally:
            self._armed, self._stop = False, False
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                f"layer {self.name!r} never ran during {type(model).__name__}.forward: choose a layer on the forward "
                "path (see model.named_modules())."
            )
        return value


@contextmanager
def replaced_output(
    model: nn.Module, name: str | None, value: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[list[torch.Tensor]]:
    """Within the block, the output of layer ``name`` is replaced by ``value(output)``; the replacements are yielded.

    This is how a network is explained in an inner representation rather than its raw input (the embedding of a
    token-id model): the replacement can be a leaf that requires grad, a dual tensor or zeros. ``name=None`` replaces
    nothing.

    Raises:
        TypeError: when the layer does not output one floating-point tensor.
    """
    seen: list[torch.Tensor] = []
    if name is None:
        yield seen
        return

    def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            what = f"a {output.dtype} tensor" if isinstance(output, torch.Tensor) else type(output).__name__
            raise TypeError(
                f"layer {name!r} must output one floating-point tensor to explain the network in, got {what}"
            )
        seen.append(value(output))
        return seen[-1]

    handle = resolve_layer(model, name).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
