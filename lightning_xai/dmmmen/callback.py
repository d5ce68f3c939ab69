"""The DMMMEN callback: a Dirichlet mixture of elastic-net regressions fitted to the network as a global surrogate.

DMM-MEN (Guo et al., NeurIPS 2018, arXiv:1811.03422) explains one class of a classifier by regressing the logit of
that class's probability on the input features with a mixture of sparse linear models; each component is a
class-level pattern, and an input's explanation is its component's coefficients. Training examples are collected as
they stream past (a reservoir of at most ``max_examples`` inputs per process, with labels when the batches carry
them); every ``every_n_epochs`` validation epochs, and once more at the end of training, the surrogate is (re)fitted
on the **current** network's outputs for the stored inputs of the class, warm-started from the previous fit, within
``sweeps`` Gibbs sweeps or ``time_budget`` seconds, with a progress bar. Under DDP the reservoirs are gathered and
the fit runs on global rank zero, its state broadcast to the others.

At each report it logs, for the explained class, on held-out validation inputs of that class:
``dmmmen/rmsd_prob`` (RMSD between the sigmoid of the surrogate's prediction and the network's probability, the
paper's fidelity figure; mixture mean, no access to the network's output), ``dmmmen/rmsd_prob_assigned`` (each input
in the component its network output makes most likely: the local explanation's fidelity), ``dmmmen/r2`` (on logits),
``dmmmen/coverage90`` (90% predictive intervals), ``dmmmen/occupied``, ``dmmmen/skipped`` (rows left out for NaN/Inf,
see below) and the paper's three bootstrap tests (PCR of top-N features vs N random ones, see
:mod:`~lightning_xai.dmmmen.bootstrap`), plus the images ``dmmmen/components`` (coefficient maps of the occupied
components, heaviest first) and ``dmmmen/weights``.

Bad rows: a training input holding NaN/Inf never enters the reservoir, and a reservoir or metric-set row on which the
network's output is NaN/Inf is left out of that fit or report; ``dmmmen/skipped`` counts, at each report, the
training inputs kept out since the previous report plus the stored and metric-set rows left out of this report's fit
and scores (one warning per kind). A fit with fewer than two finite rows of the class is skipped with a warning and
the run goes on. When the network's output for the class is constant, R² is undefined: ``dmmmen/r2`` is not logged
(one warning) rather than a meaningless number.

Precision: the sampler works in float64 whatever the network's precision (``"64-true"``, ``"bf16-true"``, mixed);
inputs are cast to the network's dtype for its forwards and its logits back to float64.

Inputs: DMM-MEN regresses on input features. Integer inputs (token ids) are used as numeric features (cast to float64,
one warning): each coefficient then weighs a position's id value, which is only meaningful for ordinal integers
(counts, bins); the bootstrap tests edit them as ids (baseline id 0, the reference's ids, random ids in the observed
range).

Outputs: a model returning a dict, a tuple or an object needs ``output_fn`` (``model output -> logits (B, K)``); every
forward DMM-MEN runs goes through it. The first training batch checks the output once (one eval-mode forward of two
rows, no random stream touched), so a missing ``output_fn`` or a ``target_class`` out of range fails there, not after
an epoch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_xai._core.batch import BatchFn
from lightning_xai._core.callback import ExplainerCallback
from lightning_xai._core.logging import log_scalars
from lightning_xai._core.outputs import OutputFn
from lightning_xai.dmmmen.arguments import check_arguments
from lightning_xai.dmmmen.features import FeatureSelector, class_logit
from lightning_xai.dmmmen.model import DMMMENSurrogate
from lightning_xai.dmmmen.network import check_class_logits, network_logits
from lightning_xai.dmmmen.report import (
    bootstrap_scores,
    draw_components,
    fidelity_scores,
    logit_spread,
    r_squared,
    top_positive_features,
)
from lightning_xai.dmmmen.reservoir import Reservoir
from lightning_xai.dmmmen.rows import canonical_rows, gathered_rows, split_by_class

__all__ = ["DMMMEN", "canonical_rows"]  # canonical_rows: re-exported from its old home


class DMMMEN(ExplainerCallback):
    """Fit a DMM-MEN global surrogate of one class of the network during (and at the end of) training.

    Args:
        target_class: the class explained.
        n_features: input features kept (highest variance; all of them when the input has fewer).
        feature_indices: flat input indices to keep instead (e.g. pixels chosen by the user); overrides
            ``n_features``.
        n_components: truncation level J of the mixture.
        n_nets: number K of elastic-net priors.
        sweeps: Gibbs sweeps of the first fit; refits run ``refit_sweeps``.
        refit_sweeps: Gibbs sweeps of each warm-started refit.
        time_budget: seconds one fit may take at most (``None``: no limit).
        max_examples: training inputs kept per process (reservoir sampling, fixed memory, time linear in the stream).
        top_features: N of the bootstrap tests.
        metric_size: validation inputs per process behind the scalars.
        every_n_epochs: refit and report every this many validation epochs (and once at the end of training); a
            validation epoch that passes without a refit because of it is warned about once.
        progress: show a progress bar during fits.
        input_fn: callable ``batch -> input``.
        target_fn: callable ``batch -> labels``; without labels the network's predictions choose the class's inputs.
        output_fn: callable ``model output -> logits (B, K)``, for models that return a dict, a tuple or an object
            (``None``: the model returns the logits tensor itself).
        name: tag prefix (default ``dmmmen``).
        seed: seed of the sampler and of the reservoir.

    Identity: every argument that changes what is fitted (``target_class``, the feature choice, the mixture's size,
    the sweeps, the reservoir size, the seed) is part of the callback's :attr:`identity` and ``state_key``
    (``input_fn``, ``target_fn`` and ``output_fn`` are recorded by qualified name: a changed name on resume warns), so
    ``[DMMMEN(target_class=0), DMMMEN(target_class=1)]`` attach together (logging under ``dmmmen-target_class=0/``
    and ``dmmmen-target_class=1/``) and a checkpoint fitted for another class fails to load, naming the argument;
    ``time_budget``, ``progress``, ``metric_size`` and ``every_n_epochs`` may change on resume.
    """

    method = "dmmmen"

    def __init__(
        self,
        target_class: int = 0,
        *,
        n_features: int = 300,
        feature_indices: list[int] | None = None,
        n_components: int = 6,
        n_nets: int = 3,
        sweeps: int = 1000,
        refit_sweeps: int = 300,
        time_budget: float | None = 60.0,
        max_examples: int = 5000,
        top_features: int = 16,
        metric_size: int = 512,
        every_n_epochs: int = 5,
        progress: bool = True,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        output_fn: OutputFn | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(input_fn=input_fn, target_fn=target_fn, probe_size=0, metric_size=metric_size,
                         every_n_epochs=every_n_epochs, name=name, seed=seed)
        check_arguments(target_class, time_budget, output_fn, positive=dict(
            n_features=n_features, sweeps=sweeps, refit_sweeps=refit_sweeps, max_examples=max_examples,
            top_features=top_features, metric_size=metric_size))
        self.target_class = target_class
        self.n_features, self.sweeps, self.refit_sweeps = n_features, sweeps, refit_sweeps
        self.time_budget, self.max_examples, self.top_features = time_budget, max_examples, top_features
        self.progress = progress
        self.output_fn = output_fn
        self.n_components, self.n_nets, self.seed = n_components, n_nets, seed
        self.feature_indices = None if feature_indices is None else [int(i) for i in feature_indices]
        self._surrogate_args = (n_components, n_nets, seed)
        self._surrogate: DMMMENSurrogate | None = None  # built on first use: a torch.Generator cannot cross ddp_spawn
        self.selector = None if feature_indices is None else FeatureSelector(indices=list(feature_indices))
        self._reservoir = Reservoir(max_examples)  # the training inputs (and labels) kept for refits
        self.fits = 0
        self.skipped_rows = 0  # training inputs left out of the reservoir for holding NaN/Inf
        self._skipped_reported = 0  # skipped_rows at the previous report
        self._fit_skipped = 0  # reservoir rows the last fit left out (non-finite network output)
        self._reports = 0
        self._warned: set[str] = set()
        self._io_checked = False

    @property
    def surrogate(self) -> DMMMENSurrogate:
        """The DMM-MEN model (created on first use, in the process that trains)."""
        if self._surrogate is None:
            n_components, n_nets, seed = self._surrogate_args
            self._surrogate = DMMMENSurrogate(n_components, n_nets, seed=seed)
            pickled = self.__dict__.pop("_pickled_surrogate", None)
            if pickled is not None:
                self._surrogate.load_state_dict(pickled)
        return self._surrogate

    def __getstate__(self) -> dict[str, Any]:
        # a fitted surrogate travels as its state dict: its torch.Generator cannot cross ddp_spawn's pickling
        state = self.__dict__.copy()
        if state.get("_surrogate") is not None:
            state["_pickled_surrogate"] = state.pop("_surrogate").state_dict()
            state["_surrogate"] = None
        return state

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(f"DMMMEN: {message}")

    # ------------------------------------------------------------------ collecting
    @property
    def pool(self) -> torch.Tensor | None:
        """The training inputs kept in the reservoir (``None`` before the first batch)."""
        return self._reservoir.inputs

    @property
    def pool_labels(self) -> torch.Tensor | None:
        """Their labels (``None`` when the batches carry none)."""
        return self._reservoir.labels

    @property
    def _seen(self) -> int:
        """Training inputs offered to the reservoir so far (this process)."""
        return self._reservoir.seen

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        x, y = self.batches.input(batch).detach().cpu(), self.batches.target(batch)
        y = None if y is None else y.detach().cpu()
        if not self._io_checked and self.model is not None and x.shape[0]:  # once: (B, K) logits, class in range
            self._io_checked = True
            check_class_logits(self.model, x, self.output_fn, self.target_class)
        if not x.is_floating_point():
            self._warn_once("integer", f"the inputs are {x.dtype} (token ids?): DMM-MEN regresses on input features, "
                            "so they are used as numbers (cast to float64); each coefficient weighs the value at one "
                            "position, which is meaningful for ordinal values (counts, pixels), not for token ids.")
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.is_floating_point() else None
        if finite is not None and not bool(finite.all()):  # a NaN/Inf input would spoil every later fit
            self._warn_once("inputs", "skipped training inputs holding NaN/Inf (counted in skipped_rows and "
                            f"{self.tag('skipped')}).")
            self.skipped_rows += int((~finite).sum())
            x, y = x[finite], None if y is None else y[finite]
        if self._reservoir.offer(x, y, self.rng):
            self._warn_once("labels", "some training batches carry labels and some do not: the class's inputs are "
                            "chosen by the network's predictions.")

    # ------------------------------------------------------------------ fitting
    def _logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The network's logits (n, K) on ``x`` in float64, through ``output_fn``, inputs cast to its dtype."""
        assert self.model is not None
        return network_logits(self.model, x, self.output_fn, batch_size)

    def _class_rows(
        self, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Split ``x`` into the inputs of the explained class (by label, else by the network's prediction) with their
        target (float64 CPU), and the others; rows whose input or network output is NaN/Inf are left out and counted.
        """
        x_class, target, x_other, left_out = split_by_class(x, self._logits(x), labels, self.target_class)
        if left_out:
            self._warn_once("outputs", f"left out {left_out} row(s) on which the input or the network's output is "
                            f"NaN/Inf (counted in {self.tag('skipped')}).")
        return x_class, target, x_other, left_out

    def refit(self, trainer: pl.Trainer | None = None, device: torch.device | str = "cpu") -> None:
        """(Re)fit the surrogate on the current network's outputs for the stored inputs of the class."""
        pool, labels = gathered_rows(trainer, self.pool, self.pool_labels)
        rank_zero = trainer is None or trainer.is_global_zero
        if rank_zero and pool is not None:
            self._fit(pool.to(device), labels)
        if trainer is not None and trainer.world_size > 1:  # rank zero's fit, shared (each keeps its reservoir)
            self._load_fit(trainer.strategy.broadcast(self._fit_state(), src=0))

    def _fit(self, pool: torch.Tensor, labels: torch.Tensor | None) -> None:
        x_class, target, _, self._fit_skipped = self._class_rows(pool, labels)
        if x_class.shape[0] < 2:
            if self._fit_skipped:
                rank_zero_warn(f"DMMMEN: fewer than two stored inputs of class {self.target_class} have a finite "
                               f"network output ({self._fit_skipped} left out): this fit is skipped, training goes on.")
            return
        if self.selector is None:
            self.selector = FeatureSelector(min(self.n_features, x_class[0].numel()))
        if self.selector.input_shape is None:
            self.selector.fit(x_class.cpu())
        features = self.selector.transform(x_class.cpu()).double()
        sweeps = self.sweeps if self.fits == 0 else self.refit_sweeps
        self.surrogate.fit(features, target, sweeps=sweeps, warm_start=self.fits > 0,
                           time_budget=self.time_budget, progress=self.progress)
        self.fits += 1
        if self.surrogate.stopped_early:  # a result that depends on the machine's speed is said, not hidden
            rank_zero_warn(f"DMMMEN: fit {self.fits} stopped at its time budget ({self.time_budget} s) after "
                           f"{self.surrogate.sweeps_done} of {sweeps} sweeps, so its result depends on this machine's "
                           "speed; raise time_budget (or pass time_budget=None) for the full chain.")

    # ------------------------------------------------------------------ reports
    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reports += 1
        values = self._scores(trainer, pl_module)
        if values is None:  # no fit yet: only the count of left-out rows, when there are any
            rank_zero_info(f"DMMMEN: not enough examples of class {self.target_class} yet; nothing to report")
            skipped = self._skipped_now(trainer)
            values = {"skipped": skipped} if skipped else {}
        elif trainer.is_global_zero:
            self.draw(trainer)
        log_scalars(pl_module, {self.tag(k): v for k, v in values.items()})

    def _scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Refit, then score on every process's metric set (collectives: every rank calls it); ``None`` before the
        first fit. ``skipped`` adds the rows left out since the previous report."""
        self.refit(trainer, pl_module.device)
        examples = gathered_rows(trainer, self.examples.inputs, self.examples.targets)  # every process's metric set
        if self.fits == 0 or examples[0] is None:
            return None
        values = self.evaluate(pl_module.device, *examples)
        values["skipped"] += self._skipped_now(trainer)
        return values

    def _skipped_now(self, trainer: pl.Trainer) -> float:
        """Training inputs (all processes) kept out of the reservoir since the previous report, plus the stored
        inputs the last fit left out; resets the count (a collective under DDP)."""
        pending = torch.tensor(float(self.skipped_rows - self._skipped_reported))
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce(pending.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        self._skipped_reported = self.skipped_rows
        return float(pending) + self._fit_skipped

    def evaluate(
        self, device: torch.device | str = "cpu", x: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Held-out fidelity, interval coverage, occupancy and the bootstrap tests on validation inputs ``x`` (default:
        this process's metric set) with their ``labels``; ``skipped``: the rows of ``x`` left out for NaN/Inf."""
        if x is None:
            x, labels = self.examples.inputs, self.examples.targets
        assert x is not None and self.selector is not None
        x = x.to(device)
        labels = None if labels is None else labels.to(device)
        x_class, target, x_other, left_out = self._class_rows(x, labels)
        values = {"occupied": float(self.surrogate.components.occupied.sum()), "skipped": float(left_out)}
        if x_class.shape[0] < 2:
            return values
        features = self.selector.transform(x_class.cpu()).double()
        scores, assigned = fidelity_scores(self.surrogate, features, target)
        values.update(scores)
        r2 = self._r2(assigned, target)
        if r2 is not None:
            values["r2"] = r2
        if x_other.shape[0] >= 1:
            values.update(self._bootstrap(x_class, x_other))
        return values

    def _r2(self, predicted: torch.Tensor, target: torch.Tensor) -> float | None:
        """R² of the surrogate on the class's logits; ``None`` (warned once) when the logits are constant, where R²
        is undefined (any tiny residual over a zero spread gives a huge negative number)."""
        spread, constant = logit_spread(target)
        if constant:
            self._warn_once("constant", f"the network's logit for class {self.target_class} is constant on the "
                            f"metric set (sd {spread:.3g}): R² is undefined, so {self.tag('r2')} is not logged.")
            return None
        return r_squared(predicted, target)

    def _bootstrap(self, x_class: torch.Tensor, x_other: torch.Tensor) -> dict[str, float]:
        """The paper's three bootstrap tests for the heaviest component's top (most positive) features, on a
        generator seeded from the callback's private stream."""
        top = top_positive_features(self.surrogate, self.selector, self.top_features)
        with self.rng.active():
            generator = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
        return bootstrap_scores(self.model, self.target_class, top, x_class, x_other, generator, self.output_fn)

    def draw(self, trainer: pl.Trainer) -> None:
        """Coefficient maps of the occupied components (image inputs) and the mixture weights (a bar chart)."""
        assert self.selector is not None
        tags = (self.tag("components"), self.tag("weights"))
        draw_components(trainer, tags, self.selector, self.surrogate.components, self.target_class)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """As the base class; a validation epoch that passes without a refit because of ``every_n_epochs`` is warned
        about once, naming the argument."""
        reports = self._reports
        super().on_validation_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking and self._reports == reports:
            self._warn_once("cadence", f"a validation epoch ended without a refit or report: every_n_epochs="
                            f"{self.every_n_epochs} refits every {self.every_n_epochs} validation epochs (and once at "
                            "the end of training); pass every_n_epochs=1 to refit at every validation epoch.")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A last fit on the final network, logged straight to the loggers (``self.log`` is closed here)."""
        values = self._scores(trainer, pl_module)
        if values is not None:
            values = {self.tag(f"final_{k}"): v for k, v in values.items()}
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            if trainer.is_global_zero:
                self.draw(trainer)

    # ------------------------------------------------------------------ explanations and state
    def explain(self, x: torch.Tensor, model: torch.nn.Module | None = None):
        """Local explanations of inputs ``x`` (of the explained class): component, coefficients, contributions.

        The network's output on ``x`` chooses each input's component (the paper's local explanation); coefficients
        and contributions are scattered back to the input's shape.
        """
        if model is not None:
            self.model = model
        if self.selector is None or self.fits == 0:
            raise RuntimeError("DMMMEN has not been fitted yet")
        features = self.selector.transform(x.cpu()).double()
        target = class_logit(self._logits(x), self.target_class).cpu()
        out = self.surrogate.explain(features, target)
        out.coefficients = self.selector.scatter(out.coefficients.float())
        out.contributions = self.selector.scatter(out.contributions.float())
        return out

    def _fit_state(self) -> dict[str, Any]:
        return {
            "surrogate": self.surrogate.state_dict(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "fits": self.fits,
            "fit_skipped": self._fit_skipped,
        }

    def _load_fit(self, state: dict[str, Any]) -> None:
        self.surrogate.load_state_dict(state["surrogate"])
        if state["selector"] is not None:
            self.selector = FeatureSelector(1)
            self.selector.load_state_dict(state["selector"])
        self.fits = int(state["fits"])
        self._fit_skipped = int(state.get("fit_skipped", 0))

    def explainer_state(self) -> dict[str, Any]:
        state = self._fit_state()
        state.update(self._reservoir.state_dict(), skipped_rows=self.skipped_rows,
                     skipped_reported=self._skipped_reported)
        return state

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        self._load_fit(state)
        self._reservoir.load_state_dict(state)
        self.skipped_rows = int(state.get("skipped_rows", 0))
        self._skipped_reported = int(state.get("skipped_reported", self.skipped_rows))

