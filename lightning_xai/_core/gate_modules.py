"""The static, module-level view of a network's gates, for checks at set-up time.

The recorder in :mod:`~lightning_xai._core.gates` works per operator call and sees everything that runs; before any
data has been seen, a callback can only look at the modules a network is built from. This module names the module
families once (the ReLU family whose inputs are Insens' neurons, max-pools, smooth units, normalisations, softmax and
attention, recurrent layers) and classifies a network by them.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

Mode = Literal["exact", "gated-linear"]

NEURON_UNITS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6)  # switching at v = 0: Insens' neurons
PIECEWISE_LINEAR = NEURON_UNITS + (nn.Hardtanh,)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
SMOOTH = (nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish,
          nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Softsign)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
SOFTMAX = (nn.Softmax, nn.LogSoftmax, nn.MultiheadAttention)
RECURRENT = (nn.RNNBase,)
GATED_MODULES = SMOOTH + NORMS + SOFTMAX + tuple(m for m in [getattr(nn, "RMSNorm", None)] if m is not None)


def unwrap_compiled(name: str) -> str:
    """A module name without ``torch.compile``'s ``_orig_mod`` segments (``features._orig_mod.2`` → ``features.2``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def refuse_recurrent(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming the recurrent layers (LSTM/GRU/RNN) of ``model``, if any.

    Their gates live inside fused kernels (``_VF.lstm``) that no operator-level recorder can hold fixed, so a
    linearization would silently treat them as affine.
    """
    found = [f"{unwrap_compiled(n)!r} ({type(m).__name__})"
             for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, RECURRENT)]
    if found:
        raise NotImplementedError(
            f"{', '.join(found)}: recurrent layers compute their gates inside a fused kernel that cannot be held "
            "fixed, so the network cannot be linearized; explain a non-recurrent part with layer=..., or use a "
            "surrogate method (GPEX, DMMMEN)."
        )


def classify(model: nn.Module) -> tuple[Mode, list[str]]:
    """The linearization mode a model's *modules* call for, and the names of the gated modules found.

    A static check for set-up time (functional calls in ``forward`` are only seen by running the recorder):
    ``"exact"`` when no smooth unit, normalisation, softmax or attention module is present, else ``"gated-linear"``.

    Raises:
        NotImplementedError: for recurrent layers (see :func:`refuse_recurrent`).
    """
    refuse_recurrent(model)
    gated = [unwrap_compiled(n) for n, m in model.named_modules() if isinstance(m, GATED_MODULES)]
    return ("gated-linear" if gated else "exact"), gated
