"""Lazy build and restore of the GPEX surrogate: from the shapes of the first batch, or from a checkpoint's state.

GPEX cannot build its surrogate at construction: the kernel net's input shape and the number of heads L are those of
the explained module, seen on the first training batch (or the first :meth:`GPEX.explain` after a checkpoint load).
:class:`SurrogateBuilder` (a mixin of :class:`~lightning_xai.gpex.GPEX`) records those shapes, builds the surrogate
and its owned optimiser, loads a deferred checkpoint state into them (re-sharded for the current world size), bounds
the cache, and gathers the state back in a world-size-independent order for saving.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_xai._core import PrivateRNG
from lightning_xai._core.distributed import broadcast_module
from lightning_xai._core.optim import fast_adam
from lightning_xai.gpex.kernel import default_kernel_net
from lightning_xai.gpex.sharding import gather_rows, shard_rows
from lightning_xai.gpex.slots import bound_per_rank
from lightning_xai.gpex.surrogate import GPEXSurrogate

__all__ = ["SurrogateBuilder"]

#: explained outputs with more scalars than this get a warning (one GP and ``dim`` kernel features each)
_MANY_HEADS = 256
#: a full cache over this many bytes per process gets a warning naming ``max_inducing``
_BIG_CACHE_BYTES = 4 * 2**30


class SurrogateBuilder:
    """Builds the surrogate and optimiser lazily and restores them (mixed into :class:`~lightning_xai.gpex.GPEX`).

    Uses the callback's settings (``layer``, ``kernel_net``, ``dim``, ``scale``, ``noise``, ``lr``,
    ``holdout_weight``, ``store_inputs``, ``max_inducing``), its private ``rng`` and its process layout; keeps the
    recorded shapes in ``_shapes`` and a loaded, not yet rebuilt state in ``_restored``.
    """

    surrogate: GPEXSurrogate | None
    _optimizer: torch.optim.Optimizer | None
    _shapes: dict[str, Any] | None
    _restored: dict[str, Any] | None
    _rows_per_rank: int | None
    _reset_on_build: bool
    _rank: int
    _world: int

    def _bound_per_rank(self, trainer: pl.Trainer | None) -> int:
        """Rows this process may cache: ``max_inducing`` split over the processes, else the examples its training
        sampler deals per epoch, else the stream default."""
        return bound_per_rank(self.max_inducing, self._world, None if trainer is None else trainer.train_dataloader)

    def _build(self, device: torch.device) -> GPEXSurrogate:
        """Build the surrogate and its optimiser from :attr:`_shapes`, then restore any loaded state."""
        s = self._shapes
        assert s is not None
        # a rebuild for restored weights must not advance the private stream (see ClaDec._build)
        init = self.rng.active(device) if self._restored is None else PrivateRNG(self.rng.seed).active(device)
        with init:
            if self.kernel_net is not None:
                net = self.kernel_net
            else:
                net = default_kernel_net(s["input_shape"], s["heads"], dim=s["dim"], scale=s["scale"])
        if s.get("noise") is None:
            s["noise"] = self.noise if self.noise is not None else float(getattr(net, "scale", s["scale"])) ** 2
        dim = int(getattr(net, "dim", s["dim"]))
        bound = self._rows_per_rank if self._rows_per_rank is not None else self._bound_per_rank(None)
        self._warn_if_big(bound, s)
        surrogate = GPEXSurrogate(
            net, heads=s["heads"], dim=dim, noise=s["noise"], store_inputs=self.store_inputs, seed=self.rng.seed,
            sharded=self._sharded, holdout_weight=self.holdout_weight, max_cache_size=bound,
        )
        self.surrogate = surrogate.to(device).train()
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("kernel_net has no trainable parameters")
        self._optimizer = fast_adam(params, self.lr, device=device)
        if self._restored is not None:
            self._restore(bound)
        elif self._sharded:
            broadcast_module(net)  # a user's kernel net may have been initialised differently on each rank
        return self.surrogate

    def _restore(self, bound: int) -> None:
        """Load the deferred checkpoint state into the just-built surrogate and optimiser (this rank's shard of the
        rows), then empty the cache for a new fit or bound it for this one."""
        assert self.surrogate is not None and self._optimizer is not None and self._restored is not None
        state, self._restored = self._restored, None
        self.surrogate.load_state_dict(shard_rows(state["surrogate"], self._rank, self._world, prefix="cache."))
        self._optimizer.load_state_dict(state["optimizer"])
        if self._reset_on_build:
            self.surrogate.cache.reset(bound)
            self._reset_on_build = False
        else:
            self.surrogate.cache.bound(bound)

    def _warn_if_big(self, bound: int, shapes: dict[str, Any]) -> None:
        """Warn when a full cache would take more than 4 GiB per process, naming ``max_inducing``."""
        heads, dim = shapes["heads"], self.dim
        row = 4 * heads * dim + 4 * heads + 17
        if self.store_inputs:
            row += 4 * math.prod(shapes["input_shape"]) if self._in_tap is None else 0
        if bound * row > _BIG_CACHE_BYTES:
            rank_zero_warn(
                f"GPEX: a full inducing cache of {bound:,} rows takes about {bound * row / 2**30:.1f} GiB per process "
                f"({row:,} bytes a row); pass max_inducing=... to bound it (or store_inputs=False, "
                "refit_each_epoch=False to drop the inputs)."
            )

    def _as_restorable_state(self) -> dict[str, Any]:
        """The surrogate and optimiser state with the cache rows in global-position order (a collective if sharded)."""
        assert self.surrogate is not None and self._optimizer is not None
        state = self.surrogate.state_dict()
        if self.surrogate.cache.sharded:
            state = gather_rows(state, self._world, prefix="cache.")
        return {"surrogate": state, "optimizer": self._optimizer.state_dict()}

    def _ensure_built(self, gp_in: torch.Tensor, output: torch.Tensor) -> GPEXSurrogate:
        """The surrogate, built on first use from the explained module's input ``gp_in`` and output (B, L)."""
        if self.surrogate is not None:
            return self.surrogate
        if self._shapes is None:
            self._shapes = self._observed_shapes(gp_in, output)
        return self._build(gp_in.device)

    def _observed_shapes(self, gp_in: torch.Tensor, output: torch.Tensor) -> dict[str, Any]:
        """What the surrogate is built from (saved in checkpoints): the explained layer, its input shape, the number
        of heads, the kernel's size and scale; checks that the input can be mixed."""
        if not gp_in.is_floating_point():
            raise ValueError(
                f"GPEX needs floating-point inputs to the explained module (mixing interpolates them), got "
                f"{gp_in.dtype}; choose layer= a submodule that takes float features (e.g. after an embedding)"
            )
        heads = int(output.shape[1])
        if heads > _MANY_HEADS:
            rank_zero_warn(
                f"GPEX: the explained output has {heads} scalars, one GP (and {self.dim} kernel features) each; "
                "consider a layer with fewer outputs."
            )
        return {
            "layer": self.layer or "",
            "input_shape": [int(s) for s in gp_in.shape[1:]],
            "heads": heads,
            "dim": self.dim,
            "scale": self.scale,
            "noise": None,
        }
