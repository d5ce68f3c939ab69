"""Argument and data validation of :class:`~lightning_xai.dmmmen.model.DMMMENSurrogate`.

Kept out of the sampler so that the model module reads as the fit itself; every check raises ``ValueError`` naming
the bad value and what is allowed, before any sweep runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def positive_int(name: str, value: object) -> int:
    """``value`` when it is an int >= 1 (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def gamma_prior(name: str, value: object, fixable: bool = False) -> tuple[float, float] | float:
    """A gamma ``(shape, rate)`` pair of finite positive numbers as floats, or (``fixable``) one fixed positive
    float."""
    if fixable and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} fixed value must be a finite float > 0, got {value!r}")
        return float(value)
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in value)
    if not ok:
        what = "(shape, rate)" + (" or a fixed float" if fixable else "")
        raise ValueError(f"{name} must be {what} with finite values > 0, got {value!r}")
    return float(value[0]), float(value[1])


def fit_data(x: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` (n, p) and ``y`` (n,) detached on ``device`` in ``dtype``, checked to be finite with n >= 2, p >= 1."""
    x = torch.as_tensor(x).detach().to(device=device, dtype=dtype)
    y = torch.as_tensor(y).detach().to(device=device, dtype=dtype)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"x must be a 2-D tensor (n >= 2, p >= 1), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("x and y must be finite (no NaN or inf); clip probabilities with logit_target")
    return x, y


def fit_options(
    sweeps: object, burn_in: object, time_budget: object, progress: Callable[[int, int], None] | bool
) -> tuple[int, int]:
    """``(sweeps, burn-in)`` of a fit (burn-in default ``sweeps // 2``), after checking the other options too."""
    sweeps = positive_int("sweeps", sweeps)
    burn = sweeps // 2 if burn_in is None else burn_in
    if not isinstance(burn, int) or isinstance(burn, bool) or not 0 <= burn <= sweeps:
        raise ValueError(f"burn_in must be an int in [0, sweeps={sweeps}], got {burn_in!r}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds or None, got {time_budget!r}")
    if not (isinstance(progress, bool) or callable(progress)):
        raise ValueError(f"progress must be a bool or a callable (done, total), got {progress!r}")
    return sweeps, burn
