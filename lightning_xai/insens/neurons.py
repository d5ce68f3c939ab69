"""Insens' view of a ReLU network's neurons; the machinery lives in :mod:`lightning_xai._core.relu_regions`, shared
with Linearization (re-exported here, where it used to be)."""

from lightning_xai._core.relu_regions import (  # noqa: F401
    NEURON_UNITS,
    capture_preactivations,
    directional_derivatives,
    forward_at,
    layer_output,
    neuron_layers,
    neuron_recorder,
    region_radius,
    row_norms_squared,
    switch_distance,
)
