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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import IterableDataset
from torchmetrics import Metric

from lightning_xai._core import ExplainerCallback, LayerTap, PrivateRNG, eval_mode, owned_step
from lightning_xai._core.batch import BatchFn
from lightning_xai._core.distributed import all_reduce_, broadcast_module
from lightning_xai._core.logging import figure_to_image, image_loggers, log_image, log_scalars
from lightning_xai._core.optim import fast_adam
from lightning_xai._core.outputs import OutputFn, select_output
from lightning_xai.gpex.cache import fingerprint
from lightning_xai.gpex.kernel import default_kernel_net
from lightning_xai.gpex.sharding import gather_rows, shard_rows, sharded_neighbours
from lightning_xai.gpex.surrogate import GPEXSurrogate
from lightning_xai.metrics import MeanOfNamed
from lightning_xai.viz import new_figure, stack_rows, tile_row, to_rgb

__all__ = ["GPEX", "GPEXExplanation", "SurrogateFidelity"]

IndexFn = Callable[[Any], Any]
_FALL_BACK = object()
_REFIT_BATCH = 256
_MANY_HEADS = 256
#: default bound of the cache (rows over all processes) when the training set has no length (a stream)
STREAM_MAX_INDUCING = 65_536
_BIG_CACHE_BYTES = 4 * 2**30


def _finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows that are finite in every tensor (all share the leading batch dimension)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.reshape(t.shape[0], -1)).all(1).to(ok.device)
    return ok


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


class SurrogateFidelity(Metric):
    """How well a surrogate's means follow a network's outputs, from sums that add up across batches and ranks.

    Per head it keeps ``n, Σp, Σt, Σp², Σt², Σpt`` and the squared error ``Σ(p − t)²`` (p: surrogate mean, t:
    network output), plus argmax agreements and the summed posterior variance, all float64 with ``sum`` reduction,
    so under DDP the synchronised states are exactly those of one process that saw every batch.

    Args:
        heads: Number of output heads L.

    ``compute()`` returns ``agreement`` (fraction of examples whose argmax agrees), ``pearson`` (mean over heads of
    the per-head correlation), ``pearson_min`` (worst head), ``r2`` (mean over heads of ``1 − SSE/SST``) and
    ``variance`` (mean posterior variance over examples and heads). Heads whose network output is constant are left
    out of ``pearson`` and ``r2`` (their correlation is undefined).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads = int(heads)
        for name in ("n", "agree", "var_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sum_p", "sum_t", "sum_pp", "sum_tt", "sum_pt", "sse"):
            self.add_state(name, torch.zeros(self.heads, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        """Add a batch: ``mean`` and ``target`` (B, L), ``variance`` (B, L) or None."""
        p, t = mean.detach().to(torch.float64), target.detach().to(self.sum_p.device, torch.float64)
        p = p.to(self.sum_p.device)
        if p.shape != t.shape or p.dim() != 2 or p.shape[1] != self.heads:
            shapes = f"{tuple(p.shape)} and {tuple(t.shape)}"
            raise ValueError(f"expected mean and target of shape (B, {self.heads}), got {shapes}")
        self.n += p.shape[0]
        self.agree += (p.argmax(-1) == t.argmax(-1)).sum()
        if variance is not None:
            self.var_sum += variance.detach().to(self.var_sum.device, torch.float64).mean(-1).sum()
        self.sum_p += p.sum(0)
        self.sum_t += t.sum(0)
        self.sum_pp += (p * p).sum(0)
        self.sum_tt += (t * t).sum(0)
        self.sum_pt += (p * t).sum(0)
        self.sse += ((p - t) ** 2).sum(0)

    def _varying(self) -> torch.Tensor:
        """(L,) bool: heads whose network output varies over the examples seen (else Pearson is undefined). A spread
        below 1e-5 of the outputs' magnitude (std/rms) is float32 rounding noise, not variation: R² against it would
        be a huge negative number that means nothing."""
        n = self.n.clamp_min(1)
        sst = (self.sum_tt - self.sum_t**2 / n).clamp_min(0)
        return sst > 1e-10 * self.sum_tt.clamp_min(1e-300)

    def constant_heads(self) -> int:
        """Number of heads whose network output was constant over the examples seen (left out of Pearson and R²)."""
        return int((~self._varying()).sum()) if bool(self.n > 0) else 0

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp_min(1)
        cov = self.sum_pt - self.sum_p * self.sum_t / n
        var_p = (self.sum_pp - self.sum_p**2 / n).clamp_min(0)
        sst = (self.sum_tt - self.sum_t**2 / n).clamp_min(0)
        valid = self._varying()
        rho = cov / (var_p * sst).sqrt().clamp_min(1e-300)
        r2 = 1 - self.sse / sst.clamp_min(1e-300)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        return {
            "agreement": self.agree / n,
            "pearson": rho[valid].mean() if bool(valid.any()) else nan,
            "pearson_min": rho[valid].min() if bool(valid.any()) else nan,
            "r2": r2[valid].mean() if bool(valid.any()) else nan,
            "variance": self.var_sum / n,
        }


class GPEX(ExplainerCallback):
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
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer={layer!r} must be a dotted module name (str) or None")
        if kernel_net is not None and not isinstance(kernel_net, nn.Module):
            raise ValueError(f"kernel_net={type(kernel_net).__name__} must be an nn.Module or None")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive integer")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"neighbours={neighbours!r} must be a positive integer")
        for arg, value in (("scale", scale), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{arg}={value!r} must be a positive number")
        if noise is not None and (
            isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise <= 0
        ):
            raise ValueError(f"noise={noise!r} must be a positive number or None (None: scale**2)")
        for arg, value in (("refit_each_epoch", refit_each_epoch), ("store_inputs", store_inputs)):
            if not isinstance(value, bool):
                raise ValueError(f"{arg}={value!r} must be True or False")
        if refit_each_epoch and not store_inputs:
            raise ValueError(
                "refit_each_epoch=True re-embeds the cache from its stored inputs, but store_inputs=False: pass "
                "refit_each_epoch=False (or store_inputs=True)"
            )
        if index_fn is not None and not callable(index_fn):
            raise ValueError(f"index_fn={index_fn!r} must be a callable batch -> dataset indices, or None")
        if max_inducing is not None and (
            isinstance(max_inducing, bool) or not isinstance(max_inducing, int) or max_inducing < 1
        ):
            raise ValueError(f"max_inducing={max_inducing!r} must be a positive integer or None (None: the training "
                             f"set's length, {STREAM_MAX_INDUCING} for streams)")
        if output_fn is not None and not callable(output_fn):
            raise ValueError(f"output_fn={output_fn!r} must be a callable model output -> tensor (B, K), or None")
        self.max_inducing = max_inducing
        self.output_fn = output_fn
        self.kernel_net = kernel_net
        self.dim, self.scale = dim, float(scale)
        self.noise = None if noise is None else float(noise)
        self.lr = float(lr)
        if isinstance(holdout_weight, bool) or not isinstance(holdout_weight, (int, float)) or not holdout_weight >= 0:
            raise ValueError(f"holdout_weight={holdout_weight!r} must be a number >= 0")
        self.holdout_weight = float(holdout_weight)
        if isinstance(mix_fraction, bool) or not isinstance(mix_fraction, (int, float)) or not 0 < mix_fraction <= 1:
            raise ValueError(f"mix_fraction={mix_fraction!r} must be a number in (0, 1]")
        self.mix_fraction = float(mix_fraction)
        self.refit_each_epoch = refit_each_epoch
        self.store_inputs = store_inputs
        self.neighbours = neighbours
        self.index_fn = index_fn
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

    def _bound_per_rank(self, trainer: pl.Trainer | None) -> int:
        """Rows this process may cache: ``max_inducing`` split over the processes, else the examples its training
        sampler deals per epoch, else the stream default."""
        world = max(1, self._world)
        if self.max_inducing is not None:
            return -(-self.max_inducing // world)
        examples = None if trainer is None else _examples_per_rank(trainer.train_dataloader, world)
        return examples if examples else -(-STREAM_MAX_INDUCING // world)

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
            state, self._restored = self._restored, None
            self.surrogate.load_state_dict(shard_rows(state["surrogate"], self._rank, self._world, prefix="cache."))
            self._optimizer.load_state_dict(state["optimizer"])
            if self._reset_on_build:
                self.surrogate.cache.reset(bound)
                self._reset_on_build = False
            else:
                self.surrogate.cache.bound(bound)
        elif self._sharded:
            broadcast_module(net)  # a user's kernel net may have been initialised differently on each rank
        return self.surrogate

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
        if self.surrogate is not None:
            return self.surrogate
        if self._shapes is None:
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
            self._shapes = {
                "layer": self.layer or "",
                "input_shape": [int(s) for s in gp_in.shape[1:]],
                "heads": heads,
                "dim": self.dim,
                "scale": self.scale,
                "noise": None,
            }
        return self._build(gp_in.device)

    # ------------------------------------------------------------------ the explained module
    def _io(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The explained module's input and flattened float output ``(B, L)`` on ``x`` (truncated eval forward)."""
        assert self.model is not None and self._out_tap is not None
        with torch.no_grad(), eval_mode(self.model):
            if self._in_tap is None:
                out = self.model(x)
                gp_in = x
            else:
                with self._in_tap.recording():
                    out = _module_output(self.model, self._out_tap, x)
                gp_in = self._in_tap.value
                if gp_in is None:
                    raise RuntimeError(f"GPEX: {self._in_tap.describe()} received no tensor input")
        return gp_in.detach(), self._explained(out)

    def _g(self, z: torch.Tensor) -> torch.Tensor:
        """The explained module's flattened output on its own inputs ``z`` (eval mode, no gradient)."""
        assert self.model is not None and self._out_tap is not None and self._module is not None
        with torch.no_grad(), eval_mode(self.model):
            out = self._module(z)
        return self._explained(out)

    def _explained(self, out: Any) -> torch.Tensor:
        """The explained output as float32 ``(B, L)``: ``output_fn`` applied (a dict or tuple without it fails, naming
        what the model returned), flattened, cast at the boundary (the GP algebra runs in float32/float64 whatever the
        training precision)."""
        out = select_output(out, self.output_fn, who="GPEX")
        return out.detach().reshape(out.shape[0], -1).float()

    # ------------------------------------------------------------------ co-training
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
        slots = torch.arange(start, start + size, device=device)
        bound = self._rows_per_rank
        if bound is not None:
            slots = slots % bound
        if self.index_fn is None:
            return slots, None
        index = torch.as_tensor(self.index_fn(batch)).reshape(-1).to(device=device, dtype=torch.long)
        if index.numel() != size or (size and int(index.min()) < 0):
            raise ValueError(f"index_fn must return {size} non-negative dataset indices, got {tuple(index.shape)}")
        return slots, index

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        x = self.batches.input(batch).detach()
        self._batch_size = max(self._batch_size or 0, x.shape[0])
        slots, index = self._slots(batch, x.shape[0], x.device)
        self.fit_step(x, slots, index, match=self._due(self.batches_seen))
        if self._reserve_batches is not None and self.surrogate is not None:  # the epoch's rows, allocated once
            self.surrogate.cache.reserve(self._reserve_batches * x.shape[0])
            self._reserve_batches = None

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
            ok = _finite_rows(gp_in, v)
            if not bool(ok.all()):
                self._skip("its inputs or the explained module's outputs", rows=int((~ok).sum()))
                if not bool(ok.any()):
                    self._sit_out(surrogate, match)
                    return None
                x, gp_in, v, slots, keys = x[ok], gp_in[ok], v[ok], slots[ok], keys[ok]
                index = None if index is None else index[ok]
            keep = _distinct(slots, keys)  # the gradient-carrying rows must be distinct slots, and examples once
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
        keep = _distinct(slots, keys)  # the gradient-carrying rows must be distinct slots, and examples once
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
                ok = _finite_rows(u, v)  # a row that turned non-finite keeps its previous values
                cache.overwrite(chunk[ok], u[ok], v[ok])  # local: the refresh below rebuilds G and c (all ranks)
            surrogate.refresh()
        self.refits += 1
        self._dirty = False

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

    # ------------------------------------------------------------------ validation and reports
    def validation_batch(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if self.surrogate is None and self._restored is None:
            return
        e = self._explain(x, k=None)
        if self._fidelity is None:
            with torch.inference_mode(False):
                self._fidelity = SurrogateFidelity(e.output.shape[1])
        self._fidelity.to(x.device).update(e.mean, e.output, e.variance)

    def _fidelity_scalars(self, fidelity: SurrogateFidelity) -> dict[str, torch.Tensor]:
        """The fidelity scalars to log. Heads whose network output was constant over the validation set have no
        correlation; when every head is constant, Pearson and R² are left out (with a warning), since a NaN beside
        a trivially perfect agreement reads as a working surrogate (and breaks ``monitor=`` callbacks)."""
        values = fidelity.compute()  # a collective under DDP: every rank computes
        constant, heads = fidelity.constant_heads(), fidelity.heads
        if constant == heads:
            self._warn_degenerate(
                "all", f"GPEX: the explained output is constant over the validation examples (all {heads} heads), so "
                "the surrogate's Pearson correlation and R² are undefined: gpex/pearson, gpex/pearson_min and gpex/r2 "
                "are not logged, and gpex/agreement = 1 only says that the surrogate predicts the same constant class "
                "(warned once)."
            )
            values = {k: v for k, v in values.items() if k not in ("pearson", "pearson_min", "r2")}
        elif constant:
            self._warn_degenerate(
                "some", f"GPEX: {constant} of {heads} explained output heads are constant over the validation "
                "examples; gpex/pearson, gpex/pearson_min and gpex/r2 are over the other heads (warned once)."
            )
        return {self.tag(k): v for k, v in values.items()}

    def _warn_degenerate(self, kind: str, message: str) -> None:
        if kind not in self._degenerate_warned:
            self._degenerate_warned.add(kind)
            rank_zero_warn(message)

    def _skipped_since_report(self) -> torch.Tensor:
        """Training rows left out for NaN/Inf since the last report, summed over processes (a collective)."""
        count = torch.tensor(float(self.skipped_rows), dtype=torch.float64)
        if self._sharded and self.surrogate is not None:
            count = all_reduce_(count.to(self.surrogate.cache.G.device))
        self.skipped_rows = 0
        return count

    def reset_metrics(self) -> None:
        # outside inference mode: reset states are updated in place by training steps (match_loss)
        with torch.inference_mode(False):
            for metric in (self._fidelity, self._losses):
                if metric is not None:
                    metric.reset()

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values: dict[str, torch.Tensor] = {}
        if self._fidelity is not None and self._fidelity.update_count > 0:
            values.update(self._fidelity_scalars(self._fidelity))
        if self._losses is not None and self._losses.update_count > 0:
            values.update(self._losses.compute())
        values[self.tag("skipped")] = self._skipped_since_report()
        log_scalars(pl_module, values)
        # the same decision on every rank (the panel's search is a collective); drawing costs more than an epoch of
        # steps on small models, so it is skipped when no logger could store it
        wanted = bool(trainer.loggers) if self._sharded else bool(image_loggers(trainer))
        if self.probe.size and self.surrogate is not None and wanted:
            self.draw_neighbours(trainer)

    def draw_neighbours(self, trainer: pl.Trainer) -> None:
        """Log the ``neighbours`` panel of the probe examples (rank zero draws; every rank searches its shard)."""
        assert self.surrogate is not None
        if self.probe.inputs is None:  # this rank saw no validation example: it still answers the others' queries
            features = self.surrogate.cache.U.new_zeros(0, self.surrogate.heads, self.surrogate.dim)
            self._neighbours(features, torch.zeros(0, dtype=torch.long), self.neighbours)
            return
        x = self.probe.inputs.to(self.surrogate.cache.U.device)
        e = self.explain(x, k=self.neighbours)
        if not trainer.is_global_zero:
            return
        labels = self.probe.targets
        figure = neighbour_figure(
            x.cpu(),
            None if e.examples is None else e.examples.cpu(),
            e.neighbours.cpu(),
            e.scores.cpu(),
            e.head.cpu(),
            e.mean.argmax(-1).cpu(),
            None if labels is None else labels.cpu(),
        )
        log_image(trainer, self.tag("neighbours"), figure_to_image(figure))

    # ------------------------------------------------------------------ explanations
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


class _StopForward(Exception):
    """Ends a forward pass right after the explained layer (raised from a hook)."""


def _module_output(model: nn.Module, tap: LayerTap, x: torch.Tensor) -> Any:
    """What the tapped layer returns (as it is: a tensor, tuple or dict) when ``model`` runs on ``x``; the layers
    after it do not run."""
    captured: list[Any] = []

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    handle = tap.module.register_forward_hook(stop)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"GPEX: layer {tap.name!r} never ran during {type(model).__name__}.forward: choose a "
                           "layer on the forward path (see model.named_modules()).")
    return captured[0]


def _examples_per_rank(loaders: Any, world: int) -> int | None:
    """Examples one process's training loader deals per epoch, when it can tell; ``None`` for a stream."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    for sized, share in ((sampler, 1), (dataset, world)):  # a DistributedSampler's length is already per process
        try:
            n = len(sized)
        except TypeError:
            continue
        return -(-n // share) if n > 0 else None
    return None


def _distinct(slots: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """Positions of the rows to keep, in batch order, so that slots and keys are both distinct (first occurrences
    win); ``None`` when they already are."""
    first = _first_occurrences(keys)
    if first is None:
        return _first_occurrences(slots)
    again = _first_occurrences(slots[first])
    return first if again is None else first[again]


def _first_occurrences(slots: torch.Tensor) -> torch.Tensor | None:
    """Positions of the first occurrence of each distinct slot, in batch order; ``None`` when all are distinct."""
    uniq, inverse = torch.unique(slots, return_inverse=True)
    if uniq.numel() == slots.numel():
        return None
    positions = torch.arange(slots.numel(), device=slots.device)
    first = torch.full((uniq.numel(),), slots.numel(), dtype=torch.long, device=slots.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first.sort().values


def neighbour_figure(
    probes: torch.Tensor,
    neighbour_inputs: torch.Tensor | None,
    slots: torch.Tensor,
    scores: torch.Tensor,
    heads: torch.Tensor,
    gp_heads: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """A figure with one row per probe: the probe, then its neighbours with their kernel similarity scores.

    Args:
        probes: (P, ...) probe inputs.
        neighbour_inputs: (P, k, ...) the neighbours' stored inputs, or None when inputs are not stored.
        slots: (P, k) their names (−1: none).
        scores: (P, k) their similarities.
        heads: (P,) the network's predicted head (the kernel used for ranking).
        gp_heads: (P,) the GP's predicted head.
        labels: (P,) true labels, if known.

    Images (``(C, H, W)`` examples) are drawn on one shared intensity range with the scores over each tile; other
    inputs, or neighbours whose inputs are not stored, get a table of names and scores.
    """
    p, k = slots.shape
    captions = []
    for i in range(p):
        label = "" if labels is None else f" y={int(labels[i])}"
        captions.append(f"net {int(heads[i])} GP {int(gp_heads[i])}{label}")
    if neighbour_inputs is not None and probes.dim() == 4 and probes.is_floating_point():
        both = torch.cat([probes.float(), neighbour_inputs.flatten(0, 1).float()])
        low, high = float(both.min()), float(both.max())
        tiles = [to_rgb(probes, low, high)]
        for j in range(k):
            tile = to_rgb(neighbour_inputs[:, j], low, high).clone()
            tile[slots[:, j] < 0] = 0.5
            tiles.append(tile)
        rows = tile_row(tiles)  # (P, 3, h, w)
        panel = stack_rows(rows)
        height, width = panel.shape[-2:]
        tile_w = (rows.shape[-1] - 2 * k) / (k + 1)
        figure = new_figure(width / 80, height / 80)
        ax = figure.add_axes((0, 0, 1, 1))
        ax.imshow(panel.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        box = {"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0}
        for i in range(p):
            top = i * (rows.shape[-2] + 2) + 1
            ax.text(1, top, captions[i], color="yellow", fontsize=6, va="top", ha="left", bbox=box)
            for j in range(k):
                if int(slots[i, j]) < 0:
                    continue
                left = (j + 1) * (tile_w + 2) + 1
                ax.text(
                    left, top, f"{float(scores[i, j]):.3g}", color="white", fontsize=6, va="top", ha="left", bbox=box
                )
        return figure
    lines = []
    for i in range(p):
        found = " ".join(f"#{int(s)}({float(c):.3g})" for s, c in zip(slots[i], scores[i]) if int(s) >= 0)
        lines.append(f"probe {i} [{captions[i]}]: {found}")
    figure = new_figure(max(6.0, 0.09 * max(len(line) for line in lines)), 0.3 * p + 0.6)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.text(0.01, 0.98, "nearest training examples: #slot(similarity)", fontsize=8, va="top", family="monospace")
    for i, line in enumerate(lines):
        ax.text(0.01, 0.98 - (i + 1) / (p + 1.5), line, fontsize=7, va="top", family="monospace")
    return figure
