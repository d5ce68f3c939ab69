"""Example identities for the GPEX cache: an exact, order-independent fingerprint of each input row.

The inducing cache keeps one row per training example. When no dataset index is known, an example is identified by
:func:`fingerprint` of its input: equal inputs get equal keys, in any batch, on any device and in any process, so an
example seen again (a repeated stream, a reshuffled epoch) replaces its older row instead of sitting beside it. Kept
apart from the cache because it is a hash of inputs, with nothing of the GP in it.
"""

from __future__ import annotations

import torch

__all__ = ["fingerprint"]

_KEY_CHUNK = 1 << 20
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_KEY_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}
_MIX = 0xBF58476D1CE4E5B9 - 2**64  # SplitMix64's multiplier, as a signed int64


def _key_weights(n: int, device: torch.device) -> torch.Tensor:
    """n fixed odd int64 weights (the same in every process and run) for :func:`fingerprint`."""
    cache_key = (n, str(device))
    if cache_key not in _KEY_WEIGHTS:
        g = torch.Generator().manual_seed(0x6E5E)
        w = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.long) * 2 + 1
        if len(_KEY_WEIGHTS) >= 8:  # a few input shapes at a time (one per cache)
            _KEY_WEIGHTS.clear()
        _KEY_WEIGHTS[cache_key] = w.to(device)
    return _KEY_WEIGHTS[cache_key]


def _mix(b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each element's bits scrambled (a SplitMix64-style finaliser keyed by its position's weight), so that a sum of
    them does not depend on a few low bits only (an input of multiples of 1/16 has 48 zero low bits in float64).
    Shifts are arithmetic (torch's ``>>``), which costs the finaliser one bit of its 64: harmless for a hash."""
    b = b ^ (b >> 32)
    b = b * weights
    b = b ^ (b >> 29)
    b = b * _MIX
    return b ^ (b >> 32)


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(B,) int64 identity of each row of ``x`` from its exact bits: equal rows get equal keys.

    The sum over the row (mod 2⁶⁴) of each element's bit pattern scrambled with a fixed per-position key (integer
    arithmetic, so the result does not depend on the batch the row came in, the device or the order of the sum); two
    different rows share a key with probability about 2⁻⁶⁴. A few integer operations per input element, in chunks of
    bounded memory. Rows with identical inputs are one example to GPEX (they would be identical inducing points).
    """
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.is_floating_point() or flat.is_complex():  # the bit patterns, as integers of the same width
        flat = flat.contiguous().view(_INT_OF_SIZE.get(flat.element_size(), torch.uint8))
    weights = _key_weights(flat.shape[1], flat.device)
    keys = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    step = max(1, _KEY_CHUNK // max(1, flat.shape[0]))
    for start in range(0, flat.shape[1], step):
        keys += _mix(flat[:, start : start + step].long(), weights[start : start + step]).sum(1)
    return keys
