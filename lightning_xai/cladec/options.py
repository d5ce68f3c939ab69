"""ClaDec's own constructor options: their valid values and the one check of them.

The options shared by every explainer (layer, probe and metric sizes, cadence, name, seed) are checked by
:class:`lightning_xai._core.ExplainerCallback`; the ones only ClaDec has are checked here, at construction, so a bad
value fails before any training starts and names the valid choices.
"""

from __future__ import annotations

ACTIVATION_MODES = ("train", "eval")
OUTPUT_ACTIVATIONS = ("auto", "sigmoid", "identity")


def check_options(alpha: float, activation_mode: str, output_activation: str, width: int, lr: float) -> None:
    """Raise ``ValueError`` naming the bad value and the valid ones, for ClaDec's own constructor arguments."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1]")
    if activation_mode not in ACTIVATION_MODES:
        raise ValueError(f"activation_mode={activation_mode!r} is not one of {ACTIVATION_MODES}")
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation={output_activation!r} is not one of {OUTPUT_ACTIVATIONS}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r} must be a positive integer")
    if lr <= 0:
        raise ValueError(f"lr={lr!r} must be positive")
