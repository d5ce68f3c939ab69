"""Shared machinery written once and used by every explainer: layer taps, batch unpacking, probe sets, private
random streams, distributed helpers, owned optimisation steps, logger adapters and the base callback."""

from lightning_xai._core.batch import BatchFormatError, BatchUnpacker, default_input_fn, default_target_fn
from lightning_xai._core.callback import ExplainerCallback, explained_model
from lightning_xai._core.layers import LayerNotFoundError, LayerTap, last_linear_name, resolve_layer
from lightning_xai._core.modules import detached_copy, eval_mode, fresh_copy
from lightning_xai._core.optim import owned_step
from lightning_xai._core.probe import ProbeSet
from lightning_xai._core.rng import PrivateRNG

__all__ = [
    "BatchFormatError",
    "BatchUnpacker",
    "ExplainerCallback",
    "LayerNotFoundError",
    "LayerTap",
    "PrivateRNG",
    "ProbeSet",
    "default_input_fn",
    "default_target_fn",
    "detached_copy",
    "eval_mode",
    "explained_model",
    "fresh_copy",
    "last_linear_name",
    "owned_step",
    "resolve_layer",
]
