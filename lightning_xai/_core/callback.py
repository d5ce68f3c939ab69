"""The lifecycle every explainer callback shares.

An explainer co-trains beside the user's LightningModule without touching it:

* ``setup`` resolves the explained model and validates the configuration (bad layer names fail here);
* ``on_train_batch_end`` hands each training batch to :meth:`ExplainerCallback.train_batch` (cadence
  ``every_n_steps`` is the subclass's business, counted in :attr:`batches_seen`, which is the same on every rank);
* validation batches feed two fixed :class:`~lightning_xai._core.probe.ProbeSet` s (the probe set drawn as images
  and the metric set behind report-time scalars) and :meth:`validation_batch`;
* ``on_validation_epoch_end`` (every ``every_n_epochs`` validation runs, counted in :attr:`validations` without
  the sanity check) calls :meth:`report` with autograd re-enabled, since Lightning validates under
  ``torch.inference_mode``;
* ``state_dict``/``load_state_dict`` carry the probe set, the private RNG stream, the constructor configuration and
  the subclass's state.

Identity (see :mod:`lightning_xai._core.identity`): the constructor arguments are captured automatically (no
subclass declares anything). Those that change what is fitted form the ``state_key``, so several instances of one
method that differ in any of them (``[ClaDec(alpha=0.0), ClaDec(alpha=0.5)]``) attach together and log under
distinct prefixes (``cladec-alpha=0.0/...``, ``cladec-alpha=0.5/...``; ``cladec/...`` when alone). On
``trainer.fit(ckpt_path=...)`` a saved state whose identity differs from the callback's fails at load, naming the
differing arguments; safe arguments (:data:`~lightning_xai._core.identity.SAFE_TO_CHANGE`: learning rate, cadence,
probe and metric set sizes ...) take the new value with an info line. States are matched by key, never by position,
so the order of the callbacks does not matter.

Subclasses implement the hooks named above and keep their own modules, metrics and optimisers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_xai._core.batch import BatchFn, BatchUnpacker
from lightning_xai._core.identity import (
    ABSENT,
    SAFE_TO_CHANGE,
    capture_arguments,
    defaults_of,
    describe,
    differences,
    distinguishing_suffix,
    identity_of,
    is_described_only,
)
from lightning_xai._core.logging import write_chart_layout
from lightning_xai._core.probe import ProbeSet
from lightning_xai._core.rng import PrivateRNG


def explained_model(pl_module: pl.LightningModule) -> nn.Module:
    """The network to explain: the LightningModule itself, or the model a post-hoc wrapper holds."""
    inner = getattr(pl_module, "explained_model", None)
    return pl_module if inner is None else inner


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class ExplainerCallback(Callback):
    """Base class for the explainer callbacks.

    Args:
        layer: dotted name of the layer to explain (``None``: the method's default).
        input_fn: callable ``batch -> input tensor``; the default reads ``(x, y, ...)`` tuples and common dict keys.
        target_fn: callable ``batch -> target tensor | None``.
        probe_size: number of validation examples drawn in the image panels (fixed across epochs).
        metric_size: validation examples (per process) kept as a fixed metric set for report-time scalars; 0 for
            explainers that score every validation batch instead.
        every_n_epochs: report (metrics and images) every this many validation runs (the sanity check not counted;
            with ``check_val_every_n_epoch=2`` and ``every_n_epochs=2`` a report comes every 4th training epoch).
        every_n_steps: co-training cadence in training batches.
        name: tag prefix for logged scalars and images (default: the method's name; when the same method is
            attached several times without names, ``<method>-<the arguments that tell them apart>``, e.g.
            ``cladec-features.3`` or ``dmmmen-target_class=1``). Part of the callback's identity.
        seed: seed of the callback's private random stream (initialisation, dropout in its own modules).
    """

    method: ClassVar[str] = "explainer"
    #: constructor arguments a resumed run may change (the new value is applied and announced); every other
    #: argument, callables excepted, is part of the identity (the ``state_key``).
    safe_to_change: ClassVar[frozenset[str]] = SAFE_TO_CHANGE

    def __new__(cls, *args: Any, **kwargs: Any) -> ExplainerCallback:
        # capture the constructor arguments before __init__ runs, so that no subclass has to declare them
        instance = super().__new__(cls)
        instance._config = capture_arguments(cls, instance, args, kwargs)
        return instance

    def __init__(
        self,
        *,
        layer: str | None = None,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        probe_size: int = 8,
        metric_size: int = 0,
        every_n_epochs: int = 1,
        every_n_steps: int = 1,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        _check_positive(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps)
        self.layer = layer
        self.batches = BatchUnpacker(input_fn, target_fn)
        self.probe = ProbeSet(probe_size, f"{self.method} probe set")
        self.examples = ProbeSet(metric_size, f"{self.method} metric set")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.name = name
        self.rng = PrivateRNG(seed)
        self.prefix = name or self.method
        self.batches_seen = 0
        self.validations = 0  # validation runs started, sanity checks not counted: the every_n_epochs clock
        self.model: nn.Module | None = None
        self._val_position = 0  # examples of the current validation pass seen on this rank
        self._padding: tuple[int, int, int] | None = None  # (rank, world, dataset length) of a padding sampler
        self._checkpoint_epoch: int | None = None

    # ------------------------------------------------------------------ identity
    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (defaults filled in, callables by qualified name) — saved in checkpoints."""
        return dict(getattr(self, "_config", {}))

    @property
    def identity(self) -> dict[str, Any]:
        """The arguments that define what this callback fits and explains (the ``state_key``)."""
        return identity_of(self.config, self.safe_to_change)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.identity)

    def tag(self, metric: str, prefix: str | None = None) -> str:
        """The logged name of ``metric``: ``<prefix>/<metric>``."""
        return f"{prefix or self.prefix}/{metric}"

    def _unique_prefix(self, trainer: pl.Trainer) -> str:
        if self.name:
            return self.name
        twins = [cb for cb in trainer.callbacks if type(cb) is type(self) and not cb.name]
        return self.method + distinguishing_suffix(self.identity, [cb.identity for cb in twins])

    # ------------------------------------------------------------------ subclass hooks
    def configure(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Validate the configuration against the model (resolve layers, attach taps). Called from ``setup``."""

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Co-train on one training batch (after the user's optimizer step)."""

    def validation_batch(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Update validation metrics with one batch (runs under inference mode)."""

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and log metrics (a collective: every rank calls it) and draw images (rank zero)."""

    def reset_metrics(self) -> None:
        """Forget this epoch's metric states."""

    def explainer_state(self) -> dict[str, Any]:
        """The subclass's part of the checkpoint."""
        return {}

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`explainer_state` returned."""

    def release(self) -> None:
        """Remove hooks from the user's model (called from ``teardown``)."""

    def chart_layout(self) -> dict[str, list[str]]:
        """Paired curves for TensorBoard's CUSTOM SCALARS tab: ``{chart title: [tag regexes]}`` (none by default)."""
        return {}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.model = explained_model(pl_module)
        self.prefix = self._unique_prefix(trainer)
        self.configure(trainer, self.model)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        explainers = [cb for cb in trainer.callbacks if isinstance(cb, ExplainerCallback)]
        if explainers and explainers[0] is self:  # one layout for the whole run, written by the first explainer
            write_chart_layout(trainer, {cb.prefix: cb.chart_layout() for cb in explainers})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches_seen += 1
        self.train_batch(trainer, pl_module, batch)

    def _reporting(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and self.validations % self.every_n_epochs == 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_start rather than on_validation_epoch_start, which subclasses override
        if not trainer.sanity_checking:
            self.validations += 1
        self._val_position = 0
        self._padding = _padding_of(trainer)

    def _padding_rows(self, batch_size: int) -> torch.Tensor | None:
        """``(B,)`` bool for the next ``batch_size`` rows of this rank: True where a ``DistributedSampler`` repeats
        an example to even out the ranks (position ``rank + i * world`` past the data set's end)."""
        if self._padding is None:
            return None
        rank, world, length = self._padding
        positions = torch.arange(self._val_position, self._val_position + batch_size)
        return positions * world + rank >= length

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0:
            return
        x, y = self.batches.input(batch), self.batches.target(batch)
        padding, start = self._padding_rows(x.shape[0]), self._val_position
        self._val_position += x.shape[0]
        self.probe.offer(x, y, start=start, padding=padding)
        self.examples.offer(x, y, start=start, padding=padding)
        if self._reporting(trainer):
            self.validation_batch(trainer, x, y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reporting(trainer):
            with torch.inference_mode(False), torch.enable_grad():
                self.report(trainer, pl_module)
        self.reset_metrics()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "batches_seen": self.batches_seen,
            "validations": self.validations,
            "probe": self.probe.state_dict(),
            "examples": self.examples.state_dict(),
            "rng": self.rng.state_dict(),
            **self.explainer_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        changed = {} if saved is None else differences(saved, self.config)
        wrong, _ = self._identity_changes(saved or {})
        if saved is not None and wrong:
            raise ValueError(self._mismatch_message(wrong))
        if "lr" in changed or "weight_decay" in changed:
            state_dict = _with_optimizer_settings(state_dict, {k: getattr(self, k) for k in ("lr", "weight_decay")
                                                               if k in changed and hasattr(self, k)})
        self.batches_seen = int(state_dict["batches_seen"])
        self.validations = int(state_dict.get("validations", self._checkpoint_epoch or 0))
        probe_size, metric_size = self.probe.size, self.examples.size
        self.probe.load_state_dict(state_dict["probe"])
        self.examples.load_state_dict(state_dict["examples"])
        self.probe.resize(probe_size)  # the sizes are safe to change: the constructor's values win
        self.examples.resize(metric_size)
        self.rng.load_state_dict(state_dict["rng"])
        self.load_explainer_state(state_dict)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Match this callback to its saved state before Lightning restores it (Lightning skips a ``state_key`` it
        does not find, without a word): a state saved by a callback of the same type whose identity differs fails
        here, naming the differing arguments; changed safe arguments are announced (and applied by
        :meth:`load_state_dict`); a checkpoint without a saved configuration (older versions) loads with a warning."""
        self._checkpoint_epoch = checkpoint.get("epoch")
        states: dict = checkpoint.get("callbacks") or {}
        mine = states.get(self.state_key)
        if mine is None:
            mine = self._adopt_or_fail(trainer, states)
            if mine is None:
                return
        saved = mine.get("config")
        if saved is None:
            rank_zero_warn(f"{self._label()}: the checkpoint does not record the configuration of this callback's "
                           "state (saved by an older version); it is restored as if it matched the arguments given.")
            return
        changed = differences(saved, self.config)
        safe = {k: v for k, v in changed.items() if k in self.safe_to_change}
        loose = {k: v for k, v in changed.items() if k not in safe and is_described_only(k, v[0])}
        _, unknown = self._identity_changes(saved)
        if unknown:
            rank_zero_warn(f"{self._label()}: the checkpoint was saved by a version with other arguments "
                           f"({describe(unknown)}); restored as if they matched.")
        if safe:
            rank_zero_info(f"{self._label()}: resuming with changed settings, the new values apply: {describe(safe)}.")
        if loose:
            rank_zero_warn(f"{self._label()}: {describe(loose)} (functions are compared by qualified name only; "
                           "make sure they still read the batches the same way).")

    def _adopt_or_fail(self, trainer: pl.Trainer, states: dict) -> dict | None:
        """The checkpoint holds no state under this callback's key: find the same-type states no attached callback
        claims. An older checkpoint's single state without a configuration is adopted; one with a configuration
        means the arguments differ, which fails naming them; none at all means this callback starts fresh."""
        twins = [cb for cb in trainer.callbacks if type(cb) is type(self)]
        claimed = {cb.state_key for cb in twins}
        prefix = f"{type(self).__qualname__}{{"
        unclaimed = {k: s for k, s in states.items()
                     if isinstance(k, str) and k.startswith(prefix) and k not in claimed}
        if not unclaimed:
            rank_zero_warn(f"{self._label()}: the checkpoint holds no state for this callback; it starts fresh.")
            return None
        unmatched = [cb for cb in twins if cb.state_key not in states]
        configs = {k: s.get("config") if isinstance(s, dict) else None for k, s in unclaimed.items()}
        changes = {k: self._identity_changes(c)[0] for k, c in configs.items() if c is not None}
        compatible = [k for k in unclaimed if not changes.get(k)]  # no recorded config, or only unknown arguments
        if len(compatible) == 1 and len(unmatched) == 1:
            states[self.state_key] = unclaimed[compatible[0]]  # Lightning now finds it under this callback's key
            return states[self.state_key]
        lines = [self._mismatch_message(wrong) for wrong in changes.values() if wrong]
        if len(compatible) > 1 or not lines:
            lines.append(f"{self._label()}: the checkpoint holds {len(unclaimed)} unclaimed {type(self).__name__} "
                         f"states that could be this callback's ({len(unmatched)} callbacks of this type found none); "
                         "pass name= to each to tell them apart")
        raise ValueError("\n".join(lines))

    def _identity_changes(self, saved: dict[str, Any]) -> tuple[dict, dict]:
        """The identity arguments of a saved configuration that differ from this callback's: ``(differing, unknown)``,
        unknown being those one side does not have (saved by a version with other arguments)."""
        changed = {k: (a, b) for k, (a, b) in differences(saved, self.config).items()
                   if k not in self.safe_to_change and not is_described_only(k, a) and not is_described_only(k, b)}
        unknown = {k: v for k, v in changed.items() if ABSENT in v}
        return {k: v for k, v in changed.items() if k not in unknown}, unknown

    def _label(self) -> str:
        """``DMMMEN(target_class=3)``: the class and its identity arguments that differ from the defaults."""
        defaults = defaults_of(type(self))
        args = ", ".join(f"{k}={v!r}" for k, v in self.identity.items() if k not in defaults or defaults[k] != v)
        return f"{type(self).__name__}({args})"

    def _mismatch_message(self, wrong: dict[str, tuple[Any, Any]]) -> str:
        return (f"{self._label()}: the checkpoint's {type(self).__name__} state was fitted with other arguments "
                f"({describe(wrong)}). Resume with the saved values, or start a new run for the new ones (these "
                f"arguments define what is fitted; only {sorted(self.safe_to_change)} may change on resume).")


def _padding_of(trainer: pl.Trainer) -> tuple[int, int, int] | None:
    """``(rank, world, data set length)`` when the first validation loader's sampler pads (a ``DistributedSampler``
    without ``drop_last`` over a data set that does not split evenly), else None."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    sampler = getattr(loader, "sampler", None)
    world, rank = getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)
    dataset = getattr(sampler, "dataset", None)
    if world is None or rank is None or dataset is None or getattr(sampler, "drop_last", False):
        return None
    try:
        length = len(dataset)
    except TypeError:
        return None
    return (int(rank), int(world), length) if length % int(world) else None


def _with_optimizer_settings(state: dict[str, Any], settings: dict[str, float]) -> dict[str, Any]:
    """A copy of ``state`` whose optimiser states (dicts with ``param_groups``) carry ``settings`` (e.g. a new
    learning rate), so that an optimiser restored from it uses the constructor's values."""
    def patch(value: Any) -> Any:
        if isinstance(value, dict):
            if isinstance(value.get("param_groups"), list):
                groups = [{**g, **{k: v for k, v in settings.items() if k in g}} for g in value["param_groups"]]
                return {**value, "param_groups": groups}
            return {k: patch(v) for k, v in value.items()}
        return value

    return patch(state)
