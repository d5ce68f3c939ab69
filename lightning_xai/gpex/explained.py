"""The explained module as GPEX sees it: its input and flattened output on a batch, without touching the network.

GPEX explains the whole model (its input → its output) or one submodule (``layer``). Either way it needs, for a
batch of model inputs, the explained module's input (the GP's input) and its output as float32 ``(B, L)`` (the GP
targets), computed in eval mode without gradient so that the network's parameters, gradients, BatchNorm statistics
and random stream are never touched; for a submodule the forward stops right after it. :class:`ExplainedModuleIO` is
that reading, a mixin of the callback (it reads the callback's model, taps and ``output_fn``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_xai._core import LayerTap, eval_mode
from lightning_xai._core.outputs import OutputFn, select_output

__all__ = ["ExplainedModuleIO", "module_output"]


class _StopForward(Exception):
    """Ends a forward pass right after the explained layer (raised from a hook)."""


def module_output(model: nn.Module, tap: LayerTap, x: torch.Tensor) -> Any:
    """What the tapped layer returns (as it is: a tensor, tuple or dict) when ``model`` runs on ``x``; the layers
    after it do not run."""
    captured: list[Any] = []

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    handle = tap.module.register_forward_hook(stop)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"GPEX: layer {tap.name!r} never ran during {type(model).__name__}.forward: choose a "
                           "layer on the forward path (see model.named_modules()).")
    return captured[0]


class ExplainedModuleIO:
    """Reads the explained module's input and output (mixed into :class:`~lightning_xai.gpex.GPEX`).

    Uses the callback's ``model``, ``_in_tap`` (``None`` when the whole model is explained), ``_out_tap``,
    ``_module`` (the explained module) and ``output_fn``.
    """

    model: nn.Module | None
    output_fn: OutputFn | None
    _in_tap: LayerTap | None
    _out_tap: LayerTap | None
    _module: nn.Module | None

    def _io(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The explained module's input and flattened float output ``(B, L)`` on ``x`` (truncated eval forward)."""
        assert self.model is not None and self._out_tap is not None
        with torch.no_grad(), eval_mode(self.model):
            if self._in_tap is None:
                out = self.model(x)
                gp_in = x
            else:
                with self._in_tap.recording():
                    out = module_output(self.model, self._out_tap, x)
                gp_in = self._in_tap.value
                if gp_in is None:
                    raise RuntimeError(f"GPEX: {self._in_tap.describe()} received no tensor input")
        return gp_in.detach(), self._explained(out)

    def _g(self, z: torch.Tensor) -> torch.Tensor:
        """The explained module's flattened output on its own inputs ``z`` (eval mode, no gradient)."""
        assert self.model is not None and self._out_tap is not None and self._module is not None
        with torch.no_grad(), eval_mode(self.model):
            out = self._module(z)
        return self._explained(out)

    def _explained(self, out: Any) -> torch.Tensor:
        """The explained output as float32 ``(B, L)``: ``output_fn`` applied (a dict or tuple without it fails, naming
        what the model returned), flattened, cast at the boundary (the GP algebra runs in float32/float64 whatever the
        training precision)."""
        out = select_output(out, self.output_fn, who="GPEX")
        return out.detach().reshape(out.shape[0], -1).float()
