"""What makes an explainer callback *this* explainer: its constructor arguments, captured automatically.

Every :class:`~lightning_xai._core.callback.ExplainerCallback` records the arguments it was constructed with (bound
to the signature of its ``__init__``, defaults filled in), so subclasses declare nothing. The arguments fall into
three kinds:

* **identity** — everything that changes what is fitted or explained (``layer``, ``alpha``, ``target_class``,
  ``dim``, ``mode``, ``seed``, ``name`` ...). They make up the Lightning ``state_key``, so several instances of one
  method that differ in any of them can be attached together, and a checkpoint's state is only ever restored into
  a callback with the same identity.
* **safe to change** — knobs that leave the fitted state valid (:data:`SAFE_TO_CHANGE`: learning rate, weight
  decay, cadence, probe and metric set sizes, curve steps, progress output ...). A resumed run applies the new value
  and says so.
* **described only** — callables (``input_fn``, ``target_fn``, ``index_fn`` ...). A function has no stable value to
  compare: it is recorded by its qualified name (``module.qualname``), left out of the state key, and a changed
  name on resume is a warning, not an error (moving a function to another module must not block a resume).

Values are kept in a stable, comparable form (:func:`stable`): numbers, strings, ``None``, lists of those; an
``nn.Module`` argument (e.g. GPEX's ``kernel_net``) by its class's qualified name; anything else by its type name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

#: Arguments that may change between a checkpoint and the run resuming from it; the new value is applied.
SAFE_TO_CHANGE: frozenset[str] = frozenset(
    {
        "lr",
        "weight_decay",
        "every_n_epochs",
        "every_n_steps",
        "probe_size",
        "metric_size",
        "steps",
        "progress",
        "time_budget",
        "neighbours",
    }
)

_SIGNATURES: dict[type, inspect.Signature] = {}


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def stable(value: Any) -> Any:
    """``value`` in a form that compares equal across processes and runs (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): stable(v) for k, v in value.items()}
    if isinstance(value, nn.Module):
        return f"<module {_qualified(type(value))}>"
    if callable(value):
        return f"<callable {_qualified(value)}>"
    return f"<{_qualified(type(value))}>"


def is_described_only(name: str, value: Any) -> bool:
    """Whether argument ``name`` is recorded for information only (a callable, or a ``*_fn`` argument)."""
    return name.endswith("_fn") or (isinstance(value, str) and value.startswith("<callable "))


def capture_arguments(cls: type, instance: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of ``cls(*args, **kwargs)`` by parameter name, defaults filled in, values :func:`stable`.

    Called before ``__init__`` runs; arguments that do not bind (``__init__`` will raise its own error) give ``{}``.
    """
    signature = _SIGNATURES.get(cls)
    if signature is None:
        signature = _SIGNATURES[cls] = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(instance, *args, **kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    captured: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if i == 0:  # self
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            captured.update({k: stable(v) for k, v in value.items()})
        else:
            captured[name] = stable(value)
    return captured


def defaults_of(cls: type) -> dict[str, Any]:
    """The captured arguments of ``cls()`` (every explainer constructs with no arguments), for short labels."""
    return capture_arguments(cls, None, (), {})


def identity_of(config: Mapping[str, Any], safe: frozenset[str] = SAFE_TO_CHANGE) -> dict[str, Any]:
    """The identity arguments of a captured configuration (neither safe to change nor described only)."""
    return {k: v for k, v in config.items() if k not in safe and not is_described_only(k, v)}


#: the value :func:`differences` gives an argument one side does not have
ABSENT = "<absent>"


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{argument: (saved value, current value)}`` for every argument whose values differ (missing: ``ABSENT``)."""
    names = list(now) + [k for k in saved if k not in now]
    return {k: (saved.get(k, ABSENT), now.get(k, ABSENT)) for k in names if saved.get(k, ABSENT) != now.get(k, ABSENT)}


def describe(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    """``"alpha: saved 0.0, now 0.5; lr: saved 0.001, now 0.0001"``."""
    return "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diffs.items())


def distinguishing_suffix(config: Mapping[str, Any], twins: list[Mapping[str, Any]]) -> str:
    """A readable tag suffix for one of several same-method callbacks (``twins``, this one included).

    The suffix names the fewest identity arguments that tell the twins apart, chosen the same way for all of them
    (``layer`` first, then in signature order; an argument is added only if it separates twins still alike):
    ``layer`` as its bare value (``default`` for None), the others as ``arg=value``, each after a ``-``. E.g.
    ``-features.3``, ``-alpha=0.5``, ``-target_class=1``, ``-features.3-alpha=0.5``. Empty for a single callback.
    """
    if len(twins) <= 1:
        return ""
    ids = [identity_of(t) for t in twins]
    mine = identity_of(config)
    keys = sorted(mine, key=lambda k: k != "layer")  # stable sort: layer first, then signature order
    chosen: list[str] = []
    for key in keys:
        groups: dict[tuple, set] = {}
        for i in ids:
            groups.setdefault(tuple(repr(i.get(k)) for k in chosen), set()).add(repr(i.get(key)))
        if any(len(values) > 1 for values in groups.values()):
            chosen.append(key)
    parts = []
    for key in chosen:
        value = mine[key]
        parts.append(("default" if value is None else str(value)) if key == "layer" else f"{key}={value}")
    return "".join(f"-{p}" for p in parts)
