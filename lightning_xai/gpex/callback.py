"""The GPEX callback: co-train a Gaussian-process surrogate of the network while the network trains.

GPEX (Akbarnejad, Bigras & Ray, arXiv:2112.09820) explains a network g with L scalar outputs by L Gaussian processes
whose kernels ``k_ℓ(x, x') = f_ℓ(x)ᵀ f_ℓ(x')`` come from a separate kernel-mapping network f, with every training
example an inducing point whose target is g's own output there. f is trained so that the GP posterior means match
g; an explanation of a prediction is then the set of training examples most similar to the query under the matched
kernel of the predicted class (:mod:`lightning_xai.gpex.surrogate` has the algebra).

The paper fits f to a frozen, converged network. This callback co-trains it beside the user's training: after each
of the user's optimizer steps (every ``every_n_steps``-th batch) it

1. computes the explained module's outputs on the batch (a truncated eval-mode forward without gradients, so the
   network's parameters, gradients, BatchNorm statistics and random stream are never touched),
2. mixes the batch (``α·x + (1 − α)·x[perm] + 0.1·ε``, α ~ U[−1, 2], from a private generator) and computes the
   module's outputs on the mixture (the matching targets); when the whole model is explained, steps 1 and 2 share
   one forward of the batch and its mixture,
3. takes one Adam step on f with the uncertainty-weighted matching loss, gradients flowing through the mixed queries
   and the batch's own inducing rows,
4. writes the batch's rows (features, current outputs, inputs) into the inducing cache.

Because g changes while it trains, the cache's targets V are refreshed together with the features U (the paper keeps
V fixed). Slots are positions in the epoch's training stream modulo the cache's bound ``max_inducing`` (reset each
epoch; the stream covers the training set once per epoch), so no dataset index is needed; when ``index_fn`` supplies
one it is stored beside each row and explanations name examples by it. The bound defaults to the training set's
length per process, so a finite data set fills the cache once per epoch; a stream without epoch ends (an
``IterableDataset`` with ``max_steps``) cycles through a ring of 65,536 slots (the most recent examples). Each row
also keeps its example's identity (the dataset index, else an exact fingerprint of the input), and an example's older
row is removed when it is written again, so no example is cached twice (mid-epoch, a reshuffled epoch's rows would
otherwise sit beside the previous epoch's). A new ``trainer.fit`` (not resumed from a checkpoint) starts an empty
cache, keeping the kernel net it learnt. Before each validation the whole cache is re-embedded with the current f and
g from the stored inputs (``refit_each_epoch``), so the reported fidelity is that of a surrogate conditioned on the
current network's outputs at every training example.

At each report it logs ``gpex/agreement`` (argmax of GP mean = argmax of the network), ``gpex/pearson`` (mean over
heads of the per-head correlation between GP mean and network output), ``gpex/pearson_min`` (worst head),
``gpex/r2`` (mean over heads of 1 − SSE/SST), ``gpex/variance`` (mean posterior variance) and ``gpex/match_loss``
(mean training loss since the last report), and one image ``gpex/neighbours``: a row per probe example, the example
then its ``neighbours`` most similar training examples under the kernel of the head the network predicts, each
with its similarity score (the paper's explanation figure).

**Many processes (DDP).** The cache is sharded, not gathered: each rank keeps the rows of the examples its sampler
gives it (≈ M/world), G and c are all-reduced sums of every rank's D×D updates, and the kernel net's gradients are
averaged, so f, G and c are equal on every rank after every step. Neighbour search merges each rank's top k
(:mod:`lightning_xai.gpex.sharding`); a checkpoint stores the cache in a world-size-independent order, so a run saved on
2 devices resumes on 1 and vice versa. Per rank the cache costs ``(M/world)·(4·L·D + 4·L + input bytes + 9)`` bytes;
a step sends ``8·L·(D(D+1)/2 + D) + 16`` bytes for G and c (twice: the removal of older copies, then the write) plus the
batch's keys and the kernel net's gradients (the README has the figures at ImageNet scale).

**Bad rows.** A training example whose input or network output holds NaN/Inf is left out of the step and the cache
(warned once, counted in ``gpex/skipped``). A network output that is constant over the validation set leaves the
per-head correlation undefined: ``gpex/pearson``, ``gpex/pearson_min`` and ``gpex/r2`` are then not logged, with a
warning, rather than logged as NaN beside a trivially perfect ``gpex/agreement``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_xai._core import ExplainerCallback, LayerTap
from lightning_xai._core.batch import BatchFn
from lightning_xai._core.outputs import OutputFn
from lightning_xai.gpex.build import SurrogateBuilder
from lightning_xai.gpex.explained import ExplainedModuleIO
from lightning_xai.gpex.explanation import Explaining, GPEXExplanation
from lightning_xai.gpex.fidelity import SurrogateFidelity
from lightning_xai.gpex.figure import neighbour_figure
from lightning_xai.gpex.fitter import SurrogateFitter
from lightning_xai.gpex.options import check_options
from lightning_xai.gpex.reporting import FidelityReporting
from lightning_xai.gpex.slots import STREAM_MAX_INDUCING, dataset_index, stream_slots
from lightning_xai.gpex.surrogate import GPEXSurrogate
from lightning_xai.metrics import MeanOfNamed

# GPEXExplanation, SurrogateFidelity, neighbour_figure and STREAM_MAX_INDUCING are re-exported from their modules
__all__ = ["GPEX", "GPEXExplanation", "STREAM_MAX_INDUCING", "SurrogateFidelity", "neighbour_figure"]

IndexFn = Callable[[Any], Any]


class GPEX(SurrogateBuilder, SurrogateFitter, ExplainedModuleIO, Explaining, FidelityReporting, ExplainerCallback):
    """Co-train a GPEX surrogate (one finite-rank GP per output head) of any LightningModule, or of one submodule.

    Args:
        layer: ``None`` explains the whole model (its input → its output, e.g. logits); a dotted name explains that
            submodule (its input → its output), which must take one tensor and return one tensor. Outputs are
            flattened: every scalar is a head with its own GP.
        kernel_net: the kernel-mapping network f, mapping ``(B, *input_shape)`` to ``(B, L, D)``. ``None`` builds
            :func:`~lightning_xai.gpex.kernel.default_kernel_net` (a small CNN for images of at least 16×16 pixels, an
            MLP otherwise) from the shapes seen on the first training batch, with its initial weights drawn from the
            private stream.
        dim: features per head D (the paper's 20).
        scale: norm of each head's features in the default kernel net.
        noise: GP likelihood noise σ². ``None`` means ``scale²`` (``σ²/scale² = 1``). Only that ratio moves the
            posterior mean; it acts as a ridge strength against the eigenvalues of ``UᵀU``, which grow with the
            number of training examples M. The paper's setting is ``scale=0.1, noise=1.0, lr=1e-4`` (ratio 100, fine at
            M ≈ 50k); at M ≈ 1.4k (digits) it shrinks most directions to ~1% and misses the acceptance bar
            (agreement .96–.99, Pearson ≈ .93 measured), while ratio 1 reaches ≈ .99/.99 and shrinks even less as M
            grows (research notes, gpex.md §7).
        holdout_weight: weight of the leave-batch-out term added to the paper's matching loss (``0``: the paper's loss
            alone; see :class:`~lightning_xai.gpex.surrogate.GPEXSurrogate`).
        mix_fraction: mixed queries per matching step, as a fraction of the batch (at least one). The paper mixes the
            whole batch (``1.0``); with the leave-batch-out term querying every clean example, half as many mixtures
            fit as well on digits (agreement and Pearson within seed noise) and save a quarter of the forwards.
        lr: Adam learning rate of the kernel net (1e-3 pairs with ratio 1; the paper uses 1e-4).
        every_n_steps: one matching step (kernel-net update) on every this-many-th training batch. The batches in
            between still refresh their cache rows with one forward of f and of the explained module each, so the
            cache always holds the current epoch's stream.
        refit_each_epoch: re-embed the whole cache (features and targets, from the stored inputs, f and the network in
            eval mode) before each validation, or at the end of a training epoch without validation.
        store_inputs: keep each training example's input in the cache (for the refit and the image panels). At
            ImageNet scale the inputs dwarf the rest of the cache; ``store_inputs=False`` (with
            ``refit_each_epoch=False``) keeps only features, targets and indices, and the panels list neighbours
            by name and score instead of drawing them.
        neighbours: neighbours per probe example in the ``gpex/neighbours`` panel.
        probe_size: validation examples drawn in the panel, the same every epoch.
        every_n_epochs: report every this many validation epochs.
        input_fn: callable ``batch -> input``; default handles ``(x, y, ...)`` and dict batches.
        target_fn: callable ``batch -> target`` (only shown in panel titles).
        index_fn: callable ``batch -> dataset indices`` (B,) of the examples; explanations then name neighbours by
            dataset index instead of stream position.
        name: tag prefix (default ``gpex``; ``gpex-<layer>`` when several GPEX callbacks are attached).
        seed: seed of the private streams (kernel-net initialisation, mixing, dropout in the kernel net).
        max_inducing: keyword-only; the most training examples the cache holds (over all processes; each of W keeps
            at most ⌈max_inducing/W⌉). ``None``: the training set's length (per process, as its sampler deals it)
            when the training loader has one, else :data:`STREAM_MAX_INDUCING` (65,536). Slots are stream positions
            modulo the bound, so once the bound is reached the cache is a ring of the most recent examples.
        output_fn: keyword-only; callable ``model output -> tensor (B, K)`` picking the output to explain when the
            model (or the explained ``layer``) returns a dict, tuple or output object, e.g.
            ``lambda out: out["logits"]``. ``None`` accepts a tensor only; anything else fails on the first training
            batch, naming what the model returned.

    Memory: the cache keeps, per training example (at most ``max_inducing``), L·D float32 feature values, L float32
    targets, two int64 names and the example's input in its own dtype (for the refit and the panels), on the device
    the training runs on; all of it is in the checkpoint (``benchmarks/memory.py`` prints the bytes). Under DDP each
    rank keeps only its share of the examples (see the module docstring); :meth:`explain` is then a collective (every
    rank calls it, each with its own queries), and so is saving a checkpoint, as always in Lightning.

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[GPEX()])
        trainer.fit(model, datamodule)
        e = trainer.callbacks[0].explain(x)      # e.mean ≈ model(x); e.neighbours: most similar training examples
    """

    method = "gpex"

    def __init__(
        self,
        layer: str | None = None,
        kernel_net: nn.Module | None = None,
        dim: int = 20,
        scale: float = 1.0,
        noise: float | None = None,
        lr: float = 1e-3,
        holdout_weight: float = 1.0,
        mix_fraction: float = 0.5,
        every_n_steps: int = 1,
        refit_each_epoch: bool = True,
        store_inputs: bool = True,
        neighbours: int = 8,
        probe_size: int = 4,
        every_n_epochs: int = 1,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        index_fn: IndexFn | None = None,
        name: str | None = None,
        seed: int = 0,
        *,
        max_inducing: int | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        super().__init__(
            layer=layer,
            input_fn=input_fn,
            target_fn=target_fn,
            probe_size=probe_size,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            name=name,
            seed=seed,
        )
        check_options(
            layer=layer, kernel_net=kernel_net, dim=dim, neighbours=neighbours, scale=scale, lr=lr, noise=noise,
            refit_each_epoch=refit_each_epoch, store_inputs=store_inputs, index_fn=index_fn, max_inducing=max_inducing,
            output_fn=output_fn, holdout_weight=holdout_weight, mix_fraction=mix_fraction,
        )
        self.max_inducing = max_inducing
        self.output_fn = output_fn
        self.kernel_net = kernel_net
        self.dim, self.scale = dim, float(scale)
        self.noise = None if noise is None else float(noise)
        self.lr = float(lr)
        self.holdout_weight = float(holdout_weight)
        self.mix_fraction = float(mix_fraction)
        self.refit_each_epoch = refit_each_epoch
        self.store_inputs = store_inputs
        self.neighbours = neighbours
        self.index_fn = index_fn
        self._init_state()

    def _init_state(self) -> None:
        """The run-time state: no surrogate yet, counters at zero, one process, no stream position."""
        self.surrogate: GPEXSurrogate | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._shapes: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self._in_tap: LayerTap | None = None
        self._out_tap: LayerTap | None = None
        self._module: nn.Module | None = None
        self._fidelity: SurrogateFidelity | None = None
        self._losses: MeanOfNamed | None = None
        self.steps = 0  # matching steps taken (kernel-net updates attempted)
        self.skipped_steps = 0
        self.refits = 0
        self._position = 0  # position of the next example in this epoch's training stream
        self._position_epoch = -1
        self._dirty = False  # the cache changed since the last refit
        self._rank, self._world = 0, 1
        self._rows_per_rank: int | None = None  # the cache bound of this process (from max_inducing or the data)
        self._new_fit = False  # set by setup(fit), cleared by a checkpoint restore: on_train_start empties the cache
        self._reset_on_build = False  # a new fit whose surrogate is still to be rebuilt from a loaded state
        self._reserve_batches: int | None = None  # batches of this fit's epochs: the cache storage to allocate
        self._batch_size: int | None = None  # the largest training batch seen (the refit's chunk size)
        self.skipped_rows = 0  # training rows left out because of NaN/Inf, since the last report
        self._steps_at_epoch_start = 0
        self._batches_at_epoch_start = 0
        self._cadence_warned = False
        self._degenerate_warned: set[str] = set()

    # ------------------------------------------------------------------ set-up
    def configure(self, trainer: pl.Trainer | None, model: nn.Module) -> None:
        self._rank, self._world = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        if self.surrogate is not None and self.surrogate.cache.sharded != self._sharded:
            self._restored, self.surrogate = self._as_restorable_state(), None  # re-shard for the new world size
        self.release()
        name = self.layer or ""
        self._out_tap = LayerTap(model, name, "output")  # resolves the name: a misspelt layer fails here
        self._in_tap = LayerTap(model, name, "input") if name else None
        self._module = self._out_tap.module
        if self._shapes is not None and self._shapes["layer"] != name:
            raise ValueError(
                f"the checkpoint's GPEX state explains layer {self._shapes['layer'] or None!r}, but this callback is "
                f"configured for layer={self.layer!r}"
            )
        if self._losses is None:
            self._losses = MeanOfNamed([self.tag("match_loss")])
        what = "the whole model" if not name else f"{type(self._module).__name__} {name!r}"
        rank_zero_info(f"GPEX: explaining {what}, its input -> its output (one GP per output scalar).")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # a new fit starts a new stream (a checkpoint, restored after setup, brings back its mid-epoch position)
        self._position, self._position_epoch = 0, -1
        self._new_fit = stage == "fit"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bound the cache for this fit's data; a fit not resumed from a checkpoint starts with an empty cache (rows
        of an earlier fit may name examples that are not in this one)."""
        self._rows_per_rank = self._bound_per_rank(trainer)
        batches = trainer.num_training_batches
        self._reserve_batches = int(batches) if math.isfinite(batches) and batches > 0 else None
        fresh, self._new_fit = self._new_fit, False
        self._steps_at_epoch_start, self._batches_at_epoch_start = self.steps, self.batches_seen
        if self.surrogate is not None:
            if fresh:
                self.surrogate.cache.reset(self._rows_per_rank)
                self._dirty = False
            else:
                self.surrogate.cache.bound(self._rows_per_rank)
        elif fresh and self._restored is not None:
            self._reset_on_build = True

    def release(self) -> None:
        for tap in (self._in_tap, self._out_tap):
            if tap is not None:
                tap.detach()

    @property
    def _sharded(self) -> bool:
        return self._world > 1

    def attach(self, model: nn.Module) -> GPEX:
        """Point the callback at ``model`` without a Trainer (e.g. after loading a checkpoint's callback state)."""
        self.model = model
        self.configure(None, model)
        return self

    # ------------------------------------------------------------------ the training stream
    def _due(self, batch_number: int) -> bool:
        return batch_number % self.every_n_steps == 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self._position_epoch:  # a mid-epoch resume keeps its restored position
            self._position, self._position_epoch = 0, trainer.current_epoch
        self._steps_at_epoch_start, self._batches_at_epoch_start = self.steps, self.batches_seen

    def _slots(self, batch: Any, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cache slots of a batch (its positions in this rank's epoch stream, modulo the cache bound) and its dataset
        indices if known."""
        start = self._position
        self._position += size
        slots = stream_slots(start, size, self._rows_per_rank, device)
        if self.index_fn is None:
            return slots, None
        return slots, dataset_index(self.index_fn, batch, size, device)

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        x = self.batches.input(batch).detach()
        self._batch_size = max(self._batch_size or 0, x.shape[0])
        slots, index = self._slots(batch, x.shape[0], x.device)
        self.fit_step(x, slots, index, match=self._due(self.batches_seen))
        if self._reserve_batches is not None and self.surrogate is not None:  # the epoch's rows, allocated once
            self.surrogate.cache.reserve(self._reserve_batches * x.shape[0])
            self._reserve_batches = None

    # ------------------------------------------------------------------ refits and cadence
    def _maybe_refit(self, trainer: pl.Trainer) -> None:
        if self.refit_each_epoch and self._dirty and not trainer.sanity_checking and self.surrogate is not None:
            self.refit()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the metrics: Lightning runs on_validation_epoch_end before on_train_epoch_end
        self._maybe_refit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_refit(trainer)  # epochs without validation (a refit already done leaves nothing to do)
        self._check_cadence(trainer)

    def _check_cadence(self, trainer: pl.Trainer) -> None:
        """Warn once when a training epoch passed without a matching step (fewer batches than ``every_n_steps``)."""
        batches = self.batches_seen - self._batches_at_epoch_start
        if self._cadence_warned or batches == 0 or self.steps > self._steps_at_epoch_start:
            return
        self._cadence_warned = True
        rank_zero_warn(
            f"GPEX did not co-train during epoch {trainer.current_epoch}: it saw {batches} training batches and takes "
            f"a matching step on every every_n_steps={self.every_n_steps}-th batch only, so its kernel net did not "
            f"learn this epoch; pass GPEX(every_n_steps=...) of at most {batches} (warned once)."
        )

    # ------------------------------------------------------------------ checkpoints
    def explainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "shapes": None if self._shapes is None else dict(self._shapes),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "skipped_rows": self.skipped_rows,
            "batch_size": self._batch_size,
            "refits": self.refits,
            "position": self._position,
            "position_epoch": self._position_epoch,
            "dirty": self._dirty,
        }
        if self.surrogate is not None:
            state.update(self._as_restorable_state())  # under DDP: gathers every rank's rows (a collective)
        elif self._restored is not None:  # loaded but not rebuilt yet: pass the state through unchanged
            state.update(self._restored)
        return state

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        self._shapes = None if state["shapes"] is None else dict(state["shapes"])
        self.steps, self.skipped_steps = int(state["steps"]), int(state["skipped_steps"])
        self.skipped_rows = int(state.get("skipped_rows", 0))
        self._batch_size = state.get("batch_size")
        self._new_fit = False  # restored from a checkpoint: the cache carries on
        self.refits = int(state["refits"])
        self._position, self._position_epoch = int(state["position"]), int(state["position_epoch"])
        self._dirty = bool(state["dirty"])
        self.surrogate, self._optimizer = None, None
        self._restored = {k: state[k] for k in ("surrogate", "optimizer")} if "surrogate" in state else None
        if self._shapes is not None and self._shapes["layer"] != (self.layer or ""):
            raise ValueError(
                f"the checkpoint's GPEX state explains layer {self._shapes['layer'] or None!r}, but this callback is "
                f"configured for layer={self.layer!r}"
            )
