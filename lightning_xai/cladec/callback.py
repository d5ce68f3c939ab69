"""The ClaDec callback: decode a layer's activations back to input space while the classifier trains.

ClaDec (Schneider & Vlachos, "Explaining Neural Networks by Decoding Layer Activations", arXiv:2005.13630) explains
a layer by what a decoder can rebuild from it: input aspects the classifier keeps come back sharp, the rest come
back as a generic average. A reference auto-encoder of the same shape, trained for reconstruction alone, shows what
such a bottleneck could keep; the difference between the two is what the classifier chose to drop.

On every ``every_n_steps``-th training batch (after the user's optimizer step) the decoder and the RefAE take one
Adam step together, on the layer's activation captured by a forward hook during the user's own forward pass
(``activation_mode="train"``, free) or by a truncated eval-mode forward (``activation_mode="eval"``, the paper's
post-hoc setting). The cadence bounds the cost on small models, where a decoder step costs more than the
classifier's own. The classifier's parameters, gradients, BatchNorm statistics and random stream are never touched:
its activations are detached, the classification term of the loss is differentiated with respect to the decoder's
parameters only, and extra forwards run in eval mode.

At each validation epoch end it logs, on a fixed set of ``metric_size`` validation examples (one batch),
``cladec/rec_loss``, ``refae/rec_loss``, ``cladec/rec_ratio``, ``cladec/acc_on_recon``, ``refae/acc_on_recon``,
``cladec/agreement``, ``refae/agreement`` and ``cladec/ce_on_recon`` (accuracy and CE need targets), and the
image ``cladec/probes``: one row per probe example, original | RefAE | ClaDec | ClaDec − original (the signed
difference map is this library's addition, not the paper's), all on the originals' intensity range. Tabular inputs
get bar charts per feature under the same tag.

Trust on ordinary set-ups:

* the training activation comes only from the user's own forward of the batch inside ``training_step`` (see
  :mod:`lightning_xai.cladec.capture`), never from another callback's forwards or ClaDec's own;
* a training row with a NaN/Inf input or activation (or, with ``alpha > 0``, a label outside ``[0, K)`` or a
  non-finite prediction) is left out of that step only; metric-set rows with a NaN/Inf input, activation or output,
  or a label outside ``[0, K)``, are left out of the scalars; ``cladec/skipped`` counts the examples left out so far
  (training rows, validation examples the metric set refused, metric-set rows the scalars leave out), summed over
  processes, and each kind is warned about once;
* every epoch co-trains at least once: when an epoch has fewer batches than ``every_n_steps``, its last batch is
  used (epochs of unknown length that end without a step warn once, naming ``every_n_steps``);
* the decoders and the RefAE run in float32 whatever the trainer's precision; inputs and activations are cast at
  the boundary, and reconstructions are cast to the input's dtype before the classifier sees them;
* inputs a decoder cannot produce (token ids) are refused at the first training batch, unless ``input_layer`` names
  a layer (the embedding) whose output is decoded to instead; the classifier then runs on reconstructions from that
  layer on, and the RefAE's copied encoder too;
* a model returning a dict, tuple or output object needs ``output_fn`` (refused at the first step otherwise).

This module holds the callback's lifecycle: set-up and hooks, the lazy build from the first observed shapes (and the
deferred restore of a checkpoint's weights), access to the classifier, explanations and checkpoint state. The
co-training step and its cadence live in :mod:`lightning_xai.cladec.cotraining`, the metric set and reports in
:mod:`lightning_xai.cladec.reporting` (with the probe panel in :mod:`lightning_xai.cladec.probes`), the bad-row
policy in :mod:`lightning_xai.cladec.rows`, the option checks in :mod:`lightning_xai.cladec.options`; the names
they define that were importable from here still are.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_xai._core import LayerTap, PrivateRNG, eval_mode, last_linear_name
from lightning_xai._core.batch import BatchFn
from lightning_xai._core.distributed import all_reduce_, broadcast_module
from lightning_xai._core.layers import replaced_output
from lightning_xai._core.optim import fast_adam
from lightning_xai._core.outputs import OutputFn, select_output
from lightning_xai.cladec.capture import BatchCapture
from lightning_xai.cladec.cotraining import ClaDecCoTraining
from lightning_xai.cladec.explanation import ClaDecExplanation
from lightning_xai.cladec.model import ClaDecModel
from lightning_xai.cladec.options import ACTIVATION_MODES, OUTPUT_ACTIVATIONS, check_options
from lightning_xai.cladec.reporting import ClaDecReporting
from lightning_xai.cladec.rows import check_decodable, finite_rows, labels_in_range
from lightning_xai.cladec.rows import rows_on_every_rank as _rows_on_every_rank  # noqa: F401 (old private name)

__all__ = [
    "ACTIVATION_MODES",
    "OUTPUT_ACTIVATIONS",
    "ClaDec",
    "ClaDecExplanation",
    "finite_rows",
    "labels_in_range",
]


class ClaDec(ClaDecReporting, ClaDecCoTraining):
    """Co-train a ClaDec decoder (and a reference auto-encoder) on one layer of any LightningModule.

    Args:
        layer: dotted name of the explained layer (its output is decoded). ``None`` decodes the input of the last
            ``nn.Linear``, i.e. the last hidden representation; the choice is printed at setup.
        alpha: weight of the classification term, ``(1 − α)·MSE + α·CE(f(D(a)), y)``; 0 is plain ClaDec.
        input_fn: callable ``batch -> input``; default handles ``(x, y, ...)`` and dict batches.
        target_fn: callable ``batch -> target``; without targets, ``alpha > 0`` uses the classifier's own prediction
            on the original input as the target, and accuracies are not logged (agreement still is).
        probe_size: validation examples drawn as panels, the same every epoch.
        metric_size: validation examples (per process) behind the scalars, the same every epoch, evaluated in one
            batch at the validation epoch's end.
        every_n_epochs: report every this many validation epochs.
        every_n_steps: one decoder/RefAE step on every this-many-th training batch (the batches in between are not
            used by the explainer: on small models this bounds its cost, see ``benchmarks/cladec_overhead.py``).
            An epoch with fewer batches still co-trains once, on its last batch.
        width: decoder channel base.
        lr: Adam learning rate of the decoder and RefAE.
        weight_decay: Adam weight decay.
        refae: also train the reference auto-encoder.
        activation_mode: ``"train"`` reuses the activation of the user's training forward (free, train-mode
            BatchNorm/dropout): only a forward inside ``training_step`` whose input is ``input_fn(batch)`` (the same
            tensor, a view of it, or an equal copy) counts, so other callbacks' forwards never do; when
            ``training_step`` feeds the model something else (augmentation, mixup), it fails naming the fix.
            ``"eval"`` runs an extra truncated forward in eval mode.
        output_activation: ``"auto"`` (sigmoid when the data lie in [0, 1], decided on the first batch),
            ``"sigmoid"`` or ``"identity"``.
        input_layer: dotted name of a layer whose output ClaDec treats as the input: it decodes to that output, feeds
            it to the RefAE and runs the classifier from there on reconstructions. For models whose input a decoder
            cannot produce, e.g. token ids (``input_layer="embed"``, the embedding). ``None``: the model's input.
        output_fn: callable ``model output -> logits (B, K)`` for models that return a dict, a tuple or an output
            object; ClaDec reads the logits for the classification term (``alpha > 0``), the predictions used as
            targets without labels, and the accuracy/agreement/CE scalars. ``None`` accepts tensor outputs only.
        name: tag prefix (default ``cladec``; ``cladec-<layer>`` when several ClaDec callbacks are attached).
        seed: seed of the private stream used to initialise the decoders and the RefAE encoder.
    """

    method = "cladec"

    def __init__(
        self,
        layer: str | None = None,
        alpha: float = 0.0,
        *,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        probe_size: int = 8,
        metric_size: int = 128,
        every_n_epochs: int = 1,
        every_n_steps: int = 6,
        width: int = 64,
        lr: float = 5e-3,
        weight_decay: float = 1e-5,
        refae: bool = True,
        activation_mode: str = "train",
        output_activation: str = "auto",
        input_layer: str | None = None,
        output_fn: OutputFn | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            layer=layer,
            input_fn=input_fn,
            target_fn=target_fn,
            probe_size=probe_size,
            metric_size=metric_size,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            name=name,
            seed=seed,
        )
        check_options(alpha, activation_mode, output_activation, width, lr)
        self.alpha = float(alpha)
        self.width, self.lr, self.weight_decay = width, float(lr), float(weight_decay)
        self.use_refae = refae
        self.activation_mode = activation_mode
        self.output_activation = output_activation
        self.output_fn = output_fn
        self.input_layer = input_layer
        self.tap: LayerTap | None = None
        self._capture: BatchCapture | None = None
        self._in_tap: LayerTap | None = None  # input_layer's output
        self._in_capture: BatchCapture | None = None
        self.core: ClaDecModel | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._shapes: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self.steps = 0
        self.skipped_steps = 0
        self.skipped = 0  # training rows left out so far (the logged scalar adds the metric set's unusable rows)
        self._metric_skipped = 0
        self._classes: int | None = None
        self._step_pending = False
        self._epoch_steps = 0
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ set-up
    def configure(self, trainer: pl.Trainer | None, model: nn.Module) -> None:
        self.release()
        if self.layer is None:
            name, capture = last_linear_name(model), "input"
        else:
            name, capture = self.layer, "output"
        self.tap = LayerTap(model, name, capture).attach()
        self._capture = BatchCapture(model, self.tap)
        if self.input_layer is not None:
            self._in_tap = LayerTap(model, self.input_layer, "output").attach()
            self._in_capture = BatchCapture(model, self._in_tap)
        self._classes = None  # the number of outputs of this model, read again at the first step
        if self._shapes is not None and (self._shapes["layer"], self._shapes["capture"]) != (name, capture):
            raise ValueError(
                f"the checkpoint's ClaDec state decodes {self._shapes['layer']!r} ({self._shapes['capture']}), "
                f"but this callback is configured for {name!r} ({capture})"
            )
        if self.layer is None:
            rank_zero_info(f"ClaDec: layer=None, decoding {self.tap.describe()}, the last hidden representation.")

    def release(self) -> None:
        for hooks in (self._capture, self.tap, self._in_capture, self._in_tap):
            if hooks is not None:
                hooks.detach()

    def _resolve_activation(self, x: torch.Tensor) -> str:
        if self.output_activation != "auto":
            return self.output_activation
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # a NaN/Inf row must not decide the range
        bounds = torch.stack([-x.min(), x.max()]).float()
        low, high = (-all_reduce_(bounds, "max")[0]).item(), bounds[1].item()  # same answer on every rank
        return "sigmoid" if low >= 0.0 and high <= 1.0 else "identity"

    def _build(self, device: torch.device) -> None:
        """Build modules and optimisers from :attr:`_shapes` (identically on every rank), then restore any state."""
        assert self.model is not None and self._shapes is not None
        s = self._shapes
        # a fresh build draws its initial weights from the private stream; a rebuild for restored weights must not
        # advance that stream (the resumed run would then draw different dropout masks than the uninterrupted one)
        init = self.rng.active(device) if self._restored is None else PrivateRNG(self.rng.seed).active(device)
        with init:
            core = ClaDecModel(
                self.model, s["layer"], s["capture"], s["code_shape"], s["input_shape"],
                self.width, s["output_activation"], self.use_refae, self.input_layer,
            )
        # float32 whatever the trainer's precision ("64-true", "bf16-true" cast the RefAE's copied encoder too):
        # inputs and activations are cast on the way in, reconstructions on the way back to the classifier.
        # It stays in train mode; explain() switches to eval and back.
        self.core = core.to(device=device, dtype=torch.float32).train()
        broadcast_module(self.core)
        # One Adam over decoder and RefAE: their graphs are disjoint, so one backward gives each its own gradients,
        # at the overhead of one step instead of two (which matters on small models).
        self._optimizer = fast_adam(self.core.parameters(), self.lr, self.weight_decay, device)
        if self._restored is not None:
            state, self._restored = self._restored, None
            self.core.load_state_dict(state["core"])
            self._optimizer.load_state_dict(state["optimizer"])

    def _ensure_built(self, x: torch.Tensor, code: torch.Tensor) -> ClaDecModel:
        if self.core is None:
            if self._shapes is None:
                assert self.tap is not None
                self._shapes = {
                    "layer": self.tap.name,
                    "capture": self.tap.capture,
                    "code_shape": list(code.shape[1:]),
                    "input_shape": list(x.shape[1:]),
                    "output_activation": self._resolve_activation(x),
                }
            self._build(x.device)
        assert self.core is not None
        return self.core

    # ------------------------------------------------------------------ co-training
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's activation at the layer, from a truncated eval-mode forward without gradients."""
        assert self.model is not None and self.tap is not None
        with torch.no_grad(), eval_mode(self.model):
            return self.tap.truncated(self.model, x).detach().float()

    def _encode_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(original, code)`` from one truncated eval-mode forward: what is decoded to (``x``, or input_layer's
        output) and the layer's activation."""
        assert self.model is not None and self.tap is not None
        if self._in_tap is None:
            return x, self.encode(x)
        with torch.no_grad(), eval_mode(self.model), self._in_tap.recording():
            code = self.tap.truncated(self.model, x).detach().float()
        return self._in_tap.value.detach(), code

    def _logits_on(self, recon: torch.Tensor, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The classifier's logits on reconstructions: ``recon`` as its input (cast to ``like``'s dtype), or with
        ``input_layer`` as that layer's output on the model's input ``x`` (rows matching ``recon``'s)."""
        recon = recon.to(like.dtype)
        if self._in_tap is None:
            return self._logits(recon)
        with replaced_output(self.model, self._in_tap.name, lambda output: recon):
            return self._logits(x)

    def _check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs a decoder cannot produce (token ids) without input_layer, before any low-level dtype error."""
        check_decodable(x, self.input_layer)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits ``(B, K)`` on ``x`` (its output through ``output_fn``), in float32."""
        assert self.model is not None
        return select_output(self.model(x), self.output_fn, who="ClaDec").float()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _num_classes(self, x: torch.Tensor) -> int:
        """The classifier's number of outputs ``K`` (one eval-mode forward of one row, once)."""
        if self._classes is None:
            assert self.model is not None
            with torch.no_grad(), eval_mode(self.model):
                self._classes = int(self._logits(x[:1]).shape[-1])
        return self._classes

    # ------------------------------------------------------------------ explanations
    def attach(self, model: nn.Module) -> ClaDec:
        """Point the callback at ``model`` without a Trainer (e.g. after loading a checkpoint's callback state)."""
        self.model = model
        self.configure(None, model)
        return self

    def explain(self, x: torch.Tensor, model: nn.Module | None = None) -> ClaDecExplanation:
        """Reconstruct ``x`` through the classifier's layer (ClaDec) and through the RefAE.

        Args:
            x: a batch of inputs on the model's device.
            model: the classifier, when the callback has not been attached to one yet (after a checkpoint load).

        Returns:
            a :class:`ClaDecExplanation`.
        """
        if model is not None and model is not self.model:
            self.attach(model)
        return self._reconstruct(x)[1]

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, ClaDecExplanation]:
        """The classifier's logits on ``x`` and the explanation, from one full eval-mode forward."""
        if self.model is None or self.tap is None:
            raise RuntimeError("ClaDec.explain needs a model: pass model=... or use the callback in trainer.fit first")
        if self.core is None and self._shapes is None:
            raise RuntimeError("ClaDec has not been trained yet: fit it (trainer.fit) or load a checkpoint's state")
        self._check_input(x)
        with torch.inference_mode(False), torch.no_grad(), eval_mode(self.model):
            x = x.clone() if x.is_inference() else x
            with self.tap.recording(), self._in_tap.recording() if self._in_tap is not None else nullcontext():
                logits = self._logits(x)
            code = self.tap.value.detach().float()
            original = x if self._in_tap is None else self._in_tap.value.detach()
            core = self._ensure_built(original, code)
            with eval_mode(core):
                cladec = core.decoder(code)
                refae = core.refae(original.float(), source=x) if core.refae is not None else None
        explanation = ClaDecExplanation(cladec=cladec, refae=refae, code=code, original=original)
        return logits, explanation

    # ------------------------------------------------------------------ checkpoints
    def explainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "shapes": self._shapes,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "skipped": self.skipped,
        }
        if self.core is not None:
            state["core"] = self.core.state_dict()
            state["optimizer"] = self._optimizer.state_dict()
        elif self._restored is not None:  # loaded but not rebuilt yet: pass the weights through unchanged
            state.update(self._restored)
        return state

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        self._shapes = state["shapes"]
        self.steps, self.skipped_steps = int(state["steps"]), int(state["skipped_steps"])
        self.skipped = int(state.get("skipped", 0))
        self.core, self._optimizer = None, None
        self._restored = {k: state[k] for k in ("core", "optimizer")} if "core" in state else None
