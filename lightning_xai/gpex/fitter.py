"""The GPEX co-training step, free of Lightning: one matching step of the kernel net and the batch's cache write.

:class:`SurrogateFitter` (a mixin of :class:`~lightning_xai.gpex.GPEX`) turns a batch of model inputs and their cache
slots into one Adam step of the kernel net on the matching loss and a write of the batch's rows, or, between matching
steps, a write only. Non-finite rows are left out and counted, repeated slots or examples are cut to their first
occurrence, older copies of the batch's examples are evicted, and under DDP a rank with nothing to contribute still
joins the step's collectives. :meth:`SurrogateFitter.refit` re-embeds the whole cache. Nothing here needs a Trainer:
``fit_step`` and ``refit`` work after :meth:`GPEX.attach`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_xai._core import PrivateRNG, eval_mode, owned_step
from lightning_xai.gpex.cache import fingerprint
from lightning_xai.gpex.slots import distinct, finite_rows
from lightning_xai.gpex.surrogate import GPEXSurrogate
from lightning_xai.metrics import MeanOfNamed

__all__ = ["SurrogateFitter"]

#: what the fused step returns when it changed nothing and the general path must take the batch
_FALL_BACK = object()
#: refit chunk when no training batch was seen (the refit otherwise re-embeds in training-batch-size chunks)
_REFIT_BATCH = 256


class SurrogateFitter:
    """The co-training step and the refit (mixed into :class:`~lightning_xai.gpex.GPEX`).

    Uses the callback's ``surrogate``, ``_optimizer``, ``_losses``, private ``rng``, ``mix_fraction`` and step
    counters; builds the surrogate on the first batch through the callback's ``_ensure_built`` and reads the
    explained module through ``_io`` and ``_g`` (:class:`~lightning_xai.gpex.explained.ExplainedModuleIO`).
    """

    surrogate: GPEXSurrogate | None
    rng: PrivateRNG
    mix_fraction: float
    steps: int
    skipped_steps: int
    skipped_rows: int
    refits: int
    _optimizer: torch.optim.Optimizer | None
    _losses: MeanOfNamed | None
    _dirty: bool
    _batch_size: int | None

    def fit_step(
        self, x: torch.Tensor, slots: torch.Tensor, index: torch.Tensor | None = None, match: bool = True
    ) -> torch.Tensor | None:
        """Co-train on one batch of model inputs ``x`` stored at cache ``slots``; returns the matching loss.

        ``match=False`` only refreshes the batch's cache rows. Rows whose input or explained output holds NaN/Inf are
        left out (counted in :attr:`skipped_rows`); an example already cached at another slot (by its dataset
        ``index``, else by an exact fingerprint of its input) is removed from there first, and a batch holding one
        example twice keeps its first occurrence. Usable without a Trainer after :meth:`attach`.
        """
        with torch.autocast(x.device.type, enabled=False):
            keys = index if index is not None else fingerprint(x)
            if match and self._in_tap is None and self.surrogate is not None:
                loss = self._fused_match_step(x, slots, index, keys)
                if loss is not _FALL_BACK:
                    return loss
            gp_in, v = self._io(x)
            surrogate = self._ensure_built(gp_in, v)
            slots, keys = slots.to(surrogate.cache.U.device), keys.to(surrogate.cache.U.device)
            ok = finite_rows(gp_in, v)
            if not bool(ok.all()):
                self._skip("its inputs or the explained module's outputs", rows=int((~ok).sum()))
                if not bool(ok.any()):
                    self._sit_out(surrogate, match)
                    return None
                x, gp_in, v, slots, keys = x[ok], gp_in[ok], v[ok], slots[ok], keys[ok]
                index = None if index is None else index[ok]
            keep = distinct(slots, keys)  # the gradient-carrying rows must be distinct slots, and examples once
            if keep is not None:
                x, gp_in, v, slots, keys = x[keep], gp_in[keep], v[keep], slots[keep], keys[keep]
                index = None if index is None else index[keep]
            surrogate.cache.evict(keys, keep=slots)
            self._dirty = True
            if not match:
                with eval_mode(surrogate):
                    u = surrogate.features(gp_in.float())
                surrogate.update_rows(slots, u, v, inputs=x, index=index, keys=keys)
                return None
            with self.rng.active(x.device):  # dropout in a user's kernel net draws from the private stream
                mixed = surrogate.mix(gp_in.float(), size=self._mixtures(gp_in.shape[0]))
                targets = self._g(mixed.to(gp_in.dtype))
                return self._match_and_store(x, gp_in, v, slots, index, keys, mixed, targets)

    def _mixtures(self, batch_size: int) -> int:
        """Mixed queries for a batch of ``batch_size`` examples."""
        return min(batch_size, max(1, round(self.mix_fraction * batch_size)))

    def _fused_match_step(
        self, x: torch.Tensor, slots: torch.Tensor, index: torch.Tensor | None, keys: torch.Tensor
    ) -> Any:
        """:meth:`fit_step` with ``match=True`` when the whole model is explained (its input is the GP's input): one
        forward of the model gives both the batch's targets and the mixture's. Returns ``_FALL_BACK`` (nothing
        changed) when a row is non-finite, for the general path's filtering."""
        surrogate = self.surrogate
        assert surrogate is not None
        slots, keys = slots.to(surrogate.cache.U.device), keys.to(surrogate.cache.U.device)
        if not bool(torch.isfinite(x).all()):
            return _FALL_BACK
        keep = distinct(slots, keys)  # the gradient-carrying rows must be distinct slots, and examples once
        if keep is not None:
            x, slots, keys = x[keep], slots[keep], keys[keep]
            index = None if index is None else index[keep]
        n = x.shape[0]
        with self.rng.active(x.device):  # dropout in a user's kernel net draws from the private stream
            state = surrogate._generator.get_state()
            mixed = surrogate.mix(x.float(), size=self._mixtures(n))
            both = self._g(torch.cat([x, mixed.to(x.dtype)]))
            v, targets = both[:n], both[n:]
            if not bool(torch.isfinite(v).all()):
                surrogate._generator.set_state(state)  # the general path mixes the finite rows afresh
                return _FALL_BACK
            surrogate.cache.evict(keys, keep=slots)
            self._dirty = True
            return self._match_and_store(x, x, v, slots, index, keys, mixed, targets)

    def _match_and_store(
        self,
        x: torch.Tensor,
        gp_in: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        index: torch.Tensor | None,
        keys: torch.Tensor,
        mixed: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """One kernel-net step on the matching loss, then the batch's rows written to the cache; returns the loss."""
        surrogate = self.surrogate
        assert surrogate is not None and self._optimizer is not None and self._losses is not None
        self.steps += 1
        out = surrogate.match(mixed, targets, slots, gp_in.float(), v)
        if not owned_step(out.loss, self._params, self._optimizer):
            self._skip("its gradients")
        loss = out.loss.detach()
        if torch.isfinite(loss):
            self._losses.to(loss.device).update({self.tag("match_loss"): loss}, weight=x.shape[0])
        surrogate.update_rows(slots, out.inducing_features, v, inputs=x, index=index, swap=out.swap, keys=keys)
        return loss

    @property
    def _params(self) -> list[nn.Parameter]:
        """The kernel net's parameters the optimiser steps."""
        assert self._optimizer is not None
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def _sit_out(self, surrogate: GPEXSurrogate, match: bool) -> None:
        """Take part in a step's collectives with nothing to contribute (sharded runs; no-op in one process)."""
        if not self._sharded:
            return
        none = torch.zeros(0, dtype=torch.long)
        surrogate.cache.evict(none)
        if match:
            self.steps += 1
            zero = sum((p * 0).sum() for p in self._params)  # zero gradients, averaged in with the other ranks'
            owned_step(zero, self._params, self._optimizer)
        empty = surrogate.cache.U.new_zeros(0, surrogate.heads, surrogate.dim)
        surrogate.update_rows(none, empty, empty[..., 0])

    def _skip(self, what: str, rows: int = 0) -> None:
        """Count a step (and ``rows`` training rows) left out because ``what`` held NaN/Inf; warn the first time."""
        self.skipped_steps += 1
        self.skipped_rows += rows
        if self.skipped_steps == 1:
            rank_zero_warn(
                f"GPEX: left {'rows of ' if rows else 'part of '}a training step out because {what} held NaN/Inf; "
                "such rows are kept out of the matching step and the cache (counted in gpex/skipped, not warned "
                "again)."
            )

    @torch.no_grad()
    def refit(self) -> None:
        """Re-embed every cached example with the current f and network (both in eval mode), then refresh G and c.

        Under DDP each rank re-embeds its own shard, and the refresh sums the shards (a collective).
        """
        surrogate = self.surrogate
        if surrogate is None:
            return
        cache = surrogate.cache
        if not cache.store_inputs:
            raise RuntimeError("GPEX.refit re-embeds stored inputs, but this GPEX was built with store_inputs=False")
        with torch.inference_mode(False), torch.autocast(cache.U.device.type, enabled=False), eval_mode(surrogate):
            # chunks of the training batch size: the refit's forwards then need no more memory than a training step
            for chunk in cache.filled.nonzero().squeeze(1).split(self._batch_size or _REFIT_BATCH):
                x = cache.inputs[chunk]
                gp_in, v = self._io(x)
                u = surrogate.features(gp_in.float())
                ok = finite_rows(u, v)  # a row that turned non-finite keeps its previous values
                cache.overwrite(chunk[ok], u[ok], v[ok])  # local: the refresh below rebuilds G and c (all ranks)
            surrogate.refresh()
        self.refits += 1
        self._dirty = False
