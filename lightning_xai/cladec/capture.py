"""Capture a layer's activation from the user's own training forward of a batch, and from nothing else.

ClaDec's ``activation_mode="train"`` reuses the activation the classifier computed for the batch in the user's
``training_step``, so it costs no extra forward. Other code also runs the model between the start and the end of a
training batch: other callbacks (GPEX runs eval-mode forwards of the batch and of mixtures in its hooks), a user
callback scoring another batch, ClaDec's own forwards. A plain "last capture wins" layer hook then pairs a batch with
activations of other inputs, silently when the sizes agree.

:class:`BatchCapture` keeps a capture only from a forward pass of the explained model (or of a submodule on the path
down to the layer, for a ``training_step`` that calls ``self.backbone(x)`` directly) that

* runs while Lightning is inside ``training_step`` (``LightningModule._current_fx_name``; callback hooks, the
  module's own batch hooks and ``on_before_backward`` run under their own names), and
* receives the batch's input: the very tensor ``input_fn(batch)`` returned, a view of its memory with as many
  elements (a ``view``/``flatten`` in ``training_step``), or a tensor equal to it element by element (a copy, a
  cast).

Among such forwards the last one that reached the layer is kept (a ``training_step`` that runs the model twice on the
batch gives the second pass). Everything else is ignored and counted, for the error message when nothing matched.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_xai._core.layers import LayerTap, _first_tensor

TRAINING_STEP = "training_step"


def first_tensor_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The model's input in a forward call: the first tensor among the positional, then the keyword arguments."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def same_input(candidate: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``candidate`` holds the batch input ``x``: the same tensor, a view of its memory with as many elements,
    or equal values after a cast to ``candidate``'s dtype and device (NaN equal to NaN)."""
    if candidate is x:
        return True
    if candidate.numel() != x.numel():
        return False
    if candidate.device == x.device and candidate.dtype == x.dtype and candidate.data_ptr() == x.data_ptr():
        return True
    with torch.no_grad():
        a = candidate.detach().reshape(-1)
        b = x.detach().reshape(-1).to(device=a.device, dtype=a.dtype)
        if torch.equal(a, b):
            return True
        if not a.is_floating_point():
            return False
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_capture(code: torch.Tensor | None, x: torch.Tensor, matched: int, tap: LayerTap, model: nn.Module) -> None:
    """Fail with the fix when the user's training forward of the batch gave no usable activation at ``tap``.

    Args:
        code: what :meth:`BatchCapture.disarm` returned (``None`` when no matching forward reached the layer).
        x: the batch input ``input_fn(batch)``, ``(B, ...)``.
        matched: :attr:`BatchCapture.matched`, read before disarming.
        tap: the layer the capture listened at (named in the message).
        model: the explained network (named in the message).
    """
    fix = "Use activation_mode='eval' when training_step does not run the model once on input_fn(batch)."
    if matched == 0:
        raise RuntimeError(
            f"ClaDec(activation_mode='train') saw no forward of {type(model).__name__} on input_fn(batch) "
            f"inside training_step (forwards on other inputs, or from other hooks, are ignored), so it captured "
            f"nothing at {tap.describe()}. {fix}"
        )
    if code is None or code.shape[0] != x.shape[0]:
        got = "nothing" if code is None else f"a batch of {code.shape[0]}"
        raise RuntimeError(
            f"ClaDec(activation_mode='train') captured {got} at {tap.describe()} during training_step's "
            f"forward of input_fn(batch), which has {x.shape[0]} examples. {fix}"
        )


def module_chain(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules from ``model`` down to the layer called ``name``, both included (each once)."""
    parts = name.split(".") if name else []
    chain: list[nn.Module] = []
    for module in [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]:
        if all(module is not m for m in chain):
            chain.append(module)
    return chain


class BatchCapture:
    """Record ``tap``'s layer activation during forwards on one batch's input inside ``training_step``.

    A forward counts when any module on the path from the explained model down to the layer is called on the batch's
    input: the model itself (``self(x)``), or a submodule holding the layer when ``training_step`` calls it directly
    (``self.backbone(x)``). Calls nest: Lightning's DDP wrapper runs ``training_step`` *as* the model's forward, which
    calls the model again. A call deeper on the path than a matching call is part of it; any other call (the same
    module again, or a module higher up) is judged on its own input. The layer is recorded only while the innermost
    running call on the path matches.

    Args:
        model: the explained network.
        tap: names the layer and whether its ``"output"`` or ``"input"`` is recorded (its own hook is not used).
    """

    def __init__(self, model: nn.Module, tap: LayerTap) -> None:
        self.model, self.tap = model, tap
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._x: torch.Tensor | None = None
        self._owner: Any = None
        self._frames: list[tuple[int, bool]] = []  # one per running call on the path: (depth on the path, matches)
        self._current: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.matched = 0
        self.ignored = 0

    def attach(self) -> BatchCapture:
        """Register the hooks on the path's modules and on the layer (idempotent)."""
        if self._handles:
            return self
        layer = self.tap.module
        for depth, module in enumerate(module_chain(self.model, self.tap.name)):
            self._handles.append(module.register_forward_pre_hook(partial(self._before, depth), with_kwargs=True))
            if module is layer:  # between the frame hooks, so that the layer's record runs inside its own frame
                self._handles.append(self._record_hook(layer))
            self._handles.append(
                module.register_forward_hook(partial(self._after, depth), with_kwargs=True, always_call=True)
            )
        return self

    def _record_hook(self, layer: nn.Module) -> torch.utils.hooks.RemovableHandle:
        if self.tap.capture == "output":
            return layer.register_forward_hook(self._on_output)
        return layer.register_forward_pre_hook(self._on_input)

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.disarm()

    @property
    def armed(self) -> bool:
        return self._x is not None

    def arm(self, x: torch.Tensor, owner: Any = None) -> None:
        """Start waiting for forwards on ``x``; ``owner`` is the LightningModule whose ``training_step`` counts."""
        self.attach()
        self._x, self._owner, self._frames, self._current = x, owner, [], None
        self.value, self.matched, self.ignored = None, 0, 0

    def disarm(self) -> torch.Tensor | None:
        """Stop listening; return the kept capture (``None`` when no matching forward reached the layer)."""
        value, self.value = self.value, None
        self._x, self._owner, self._frames, self._current = None, None, [], None
        return value

    def _in_training_step(self) -> bool:
        name = getattr(self._owner, "_current_fx_name", TRAINING_STEP) if self._owner is not None else TRAINING_STEP
        return name == TRAINING_STEP

    def _inside_match(self) -> bool:
        return bool(self._frames) and self._frames[-1][1]

    def _before(self, depth: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._x is None:
            return
        if self._inside_match() and depth > self._frames[-1][0]:  # deeper on the path: part of the matching call
            self._frames.append((depth, True))
            return
        given = first_tensor_argument(args, kwargs)
        match = given is not None and self._in_training_step() and same_input(given, self._x)
        self.matched += int(match)
        self.ignored += int(not match)
        if match:
            self._current = None
        self._frames.append((depth, match))

    def _after(
        self, depth: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._x is None or not self._frames:
            return
        _, match = self._frames.pop()
        if match and not self._inside_match() and self._current is not None:
            self.value = self._current  # the outermost matching call ended: keep what the layer gave in it

    def _record(self, value: Any) -> None:
        if self._x is not None and self._inside_match():
            tensor = _first_tensor(value)
            if tensor is not None:
                self._current = tensor

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._record(output)

    def _on_input(self, module: nn.Module, args: Any) -> None:
        self._record(args)
