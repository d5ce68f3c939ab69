"""Model outputs: pick the tensor an explainer explains out of whatever the network returns.

Most classifiers return a ``(B, K)`` tensor of logits, but many real models return a dict (``{"logits": ...,
"embedding": ...}``), a tuple or an output object (``.logits``). Guessing (the first tensor found) silently explains the
wrong thing, so anything but a bare tensor needs ``output_fn``, a callable ``model output -> tensor``, and without it
the error names what the model returned and how to choose. Every callback that reads the model's output goes through
:func:`select_output`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

OutputFn = Callable[[Any], torch.Tensor]


class OutputFormatError(TypeError):
    """Raised when a model's output is not a tensor and no ``output_fn`` says which part of it to explain."""


def describe_output(output: Any) -> str:
    """A short description of a model output: ``"a dict with keys ['embedding', 'logits']"``, ``"a tuple of 2 ..."``."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {sorted(map(str, output))}"
    if isinstance(output, (tuple, list)):
        parts = ", ".join(describe_output(item) for item in output[:4])
        return f"a {type(output).__name__} of {len(output)} items ({parts}{', ...' if len(output) > 4 else ''})"
    fields = [k for k, v in vars(output).items() if isinstance(v, torch.Tensor)] if hasattr(output, "__dict__") else []
    return f"a {type(output).__name__}" + (f" with tensor fields {sorted(fields)}" if fields else "")


def _hint(output: Any) -> str:
    if isinstance(output, Mapping) and output:
        key = "logits" if "logits" in output else sorted(map(str, output))[0]
        return f"e.g. output_fn=lambda out: out[{key!r}]"
    if isinstance(output, (tuple, list)):
        return "e.g. output_fn=lambda out: out[0]"
    if hasattr(output, "logits"):
        return "e.g. output_fn=lambda out: out.logits"
    return "output_fn=<callable: model output -> tensor (B, K)>"


def select_output(output: Any, output_fn: OutputFn | None = None, *, who: str = "the explainer") -> torch.Tensor:
    """The tensor to explain: ``output_fn(output)``, or ``output`` itself when it is a tensor.

    Args:
        output: what the model returned.
        output_fn: callable ``model output -> tensor``; ``None`` accepts tensors only.
        who: the caller, named in error messages (e.g. ``"GPEX"``).

    Raises:
        OutputFormatError: when the output is not a tensor and no ``output_fn`` is given, or ``output_fn`` returns
            something else than a tensor; the message names what the model returned and the fix.
    """
    if output_fn is not None:
        selected = output_fn(output)
        if not isinstance(selected, torch.Tensor):
            raise OutputFormatError(
                f"{who}: output_fn returned {describe_output(selected)}, expected a tensor (the model returned "
                f"{describe_output(output)})"
            )
        return selected
    if isinstance(output, torch.Tensor):
        return output
    raise OutputFormatError(
        f"{who}: the model returned {describe_output(output)}, not a tensor, so it is ambiguous which output to "
        f"explain; pass output_fn to the callback ({_hint(output)})."
    )
