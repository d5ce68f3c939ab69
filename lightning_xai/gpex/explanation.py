"""What GPEX answers for a query: the GP prediction, the network's output, and the most similar training examples.

:class:`GPEXExplanation` is the return type of :meth:`GPEX.explain`; :class:`Explaining` (a mixin of
:class:`~lightning_xai.gpex.GPEX`) computes it from the explained module's input and output on the query, the
surrogate's posterior and a neighbour search over every process's shard of the cache
(:func:`~lightning_xai.gpex.sharding.sharded_neighbours`). The validation metrics and the neighbour panel use the same
path, so what is reported is what ``explain`` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_xai._core import eval_mode
from lightning_xai.gpex.sharding import sharded_neighbours
from lightning_xai.gpex.surrogate import GPEXSurrogate

__all__ = ["Explaining", "GPEXExplanation"]


@dataclass
class GPEXExplanation:
    """What :meth:`GPEX.explain` returns for a batch ``x`` of B inputs, with L output heads.

    Attributes:
        mean: (B, L) GP posterior means (float64); the surrogate's prediction of the network's outputs.
        variance: (B, L) GP posterior variances (float64).
        neighbours: (B, k) the most similar training examples, best first (−1 where fewer than k are cached): their
            dataset indices when ``index_fn`` supplies them, else their cache slots, i.e. their positions in the
            training stream of the epoch that cached them, modulo ``max_inducing`` (under DDP, in the stream
            interleaved over ranks as a ``DistributedSampler`` deals it).
        scores: (B, k) their raw kernel similarities ``f_h(x)ᵀ f_h(x̃)`` (float64) on head ``h = head``.
        head: (B,) the head the neighbours were ranked on: the argmax of the network's output (the paper's choice).
        output: (B, L) the explained module's output on ``x`` (float32), flattened to one scalar per head.
        examples: (B, k, ...) the neighbours' model inputs as cached (zeros where there is none), or ``None`` when
            ``k`` was not asked for.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    neighbours: torch.Tensor
    scores: torch.Tensor
    head: torch.Tensor
    output: torch.Tensor
    examples: torch.Tensor | None = None


class Explaining:
    """:meth:`explain` and the neighbour search behind it (mixed into :class:`~lightning_xai.gpex.GPEX`).

    Uses the callback's ``model``, ``surrogate``, recorded ``_shapes`` and deferred ``_restored`` state, its
    ``index_fn`` and its process layout; builds a surrogate from a loaded state on first use.
    """

    model: nn.Module | None
    surrogate: GPEXSurrogate | None
    index_fn: Callable[[Any], Any] | None
    _shapes: dict[str, Any] | None
    _rank: int
    _world: int

    def _neighbours(
        self, features: torch.Tensor, heads: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Names (dataset index, else global stream position), scores and inputs (if stored) of the k nearest."""
        assert self.surrogate is not None
        positions, scores, index, inputs = sharded_neighbours(
            self.surrogate, features, heads, k, self._rank, self._world
        )
        names = torch.where(index >= 0, index, positions) if self.index_fn is not None else positions
        return names, scores, inputs if self.surrogate.cache.inputs.numel() else None

    def explain(self, x: torch.Tensor, k: int = 10, model: nn.Module | None = None) -> GPEXExplanation:
        """GP prediction and nearest training examples for a batch of model inputs ``x``.

        Args:
            x: (B, ...) inputs of the whole model (also when a submodule is explained), on the model's device.
            k: number of neighbours.
            model: the network, when the callback has not been attached to one yet (after a checkpoint load).

        Returns:
            a :class:`GPEXExplanation`; neighbours are ranked by raw similarity under the kernel of the head the
            network predicts, over the whole cache (under DDP: every rank's shard, so every rank must call this).
        """
        if model is not None and model is not self.model:
            self.attach(model)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be a positive integer")
        return self._explain(x, k)

    def _explain(self, x: torch.Tensor, k: int | None) -> GPEXExplanation:
        """:meth:`explain` without the argument checks; ``k=None`` skips the neighbour search (for metrics)."""
        if self.model is None or self._out_tap is None:
            raise RuntimeError("GPEX.explain needs a model: pass model=... or use the callback in trainer.fit first")
        if self.surrogate is None and self._shapes is None:
            raise RuntimeError("GPEX has not been trained yet: fit it (trainer.fit) or load a checkpoint's state")
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.clone() if x.is_inference() else x
            gp_in, output = self._io(x)
            surrogate = self._ensure_built(gp_in, output)
            with eval_mode(surrogate):
                u = surrogate.features(gp_in.float())
                prediction = surrogate.posterior(u)
                head = output.argmax(-1)
                if k is None:
                    names = scores = torch.empty(x.shape[0], 0)
                    examples = None
                else:
                    names, scores, examples = self._neighbours(u, head, k)
        return GPEXExplanation(prediction.mean, prediction.variance, names, scores, head, output, examples)
