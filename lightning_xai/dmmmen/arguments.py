"""Validation of the DMMMEN callback's constructor arguments, kept apart so ``__init__`` only stores them.

A bad argument fails at construction, naming the value and what is allowed, rather than after an epoch of training.
"""

from __future__ import annotations

from lightning_xai._core.outputs import OutputFn


def check_arguments(
    target_class: object, time_budget: float | None, output_fn: OutputFn | None, positive: dict[str, object]
) -> None:
    """Raise ``ValueError`` unless every value in ``positive`` (argument name -> value) is a positive integer,
    ``target_class`` a non-negative class index, ``time_budget`` positive or ``None`` and ``output_fn`` a callable or
    ``None``."""
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer")
    if not isinstance(target_class, int) or isinstance(target_class, bool) or target_class < 0:
        raise ValueError(f"target_class={target_class!r} must be a non-negative class index")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget={time_budget!r} must be positive or None")
    if output_fn is not None and not callable(output_fn):
        raise ValueError(f"output_fn={output_fn!r} must be a callable (model output -> logits (B, K)) or None")
