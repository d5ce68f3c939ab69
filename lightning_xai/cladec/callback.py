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
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_xai._core import ExplainerCallback, LayerTap, PrivateRNG, eval_mode, last_linear_name, owned_step
from lightning_xai._core.batch import BatchFn
from lightning_xai._core.distributed import all_reduce_, broadcast_module
from lightning_xai._core.logging import figure_to_image, log_image, log_scalars
from lightning_xai._core.optim import fast_adam
from lightning_xai._core.outputs import OutputFn, select_output
from lightning_xai.cladec.capture import BatchCapture
from lightning_xai._core.layers import replaced_output
from lightning_xai.cladec.model import ClaDecModel, cladec_objective, reconstruction_loss
from lightning_xai.metrics import MeanOfNamed
from lightning_xai.viz import diverging, feature_bars, stack_rows, tile_row, to_rgb

ACTIVATION_MODES = ("train", "eval")
OUTPUT_ACTIVATIONS = ("auto", "sigmoid", "identity")


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mask of the rows that are finite in every tensor (each ``(B, ...)``; integer tensors are finite)."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            keep &= torch.isfinite(t.reshape(t.shape[0], -1)).all(1).to(keep.device)
    return keep


def labels_in_range(y: torch.Tensor, classes: int) -> torch.Tensor:
    """``(B,)`` mask of integer class labels in ``[0, classes)``; other targets (soft labels) are all kept."""
    if y.is_floating_point() or y.dim() != 1:
        return torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    return (y >= 0) & (y < classes)


def _rows_on_every_rank(keep: torch.Tensor) -> bool:
    """Whether every rank has at least one usable row (one tiny all-reduce under DDP: all ranks skip together)."""
    none = (~keep.any()).float().reshape(1)
    return not bool(all_reduce_(none, "max").item())


@dataclass
class ClaDecExplanation:
    """What :meth:`ClaDec.explain` returns for a batch ``x`` of shape ``(B, *input_shape)``.

    Attributes:
        cladec: ClaDec reconstructions ``D(a(x))``, shape of ``x``.
        refae: RefAE reconstructions (``None`` without a RefAE), shape of ``x``.
        code: the explained layer's activations ``a(x)``, ``(B, *code_shape)``.
        original: what the reconstructions rebuild: ``x`` itself, or with ``input_layer`` that layer's output on
            ``x`` (e.g. the token embeddings); ``cladec`` and ``refae`` have its shape.
    """

    cladec: torch.Tensor
    refae: torch.Tensor | None
    code: torch.Tensor
    original: torch.Tensor | None = None


class ClaDec(ExplainerCallback):
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
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha!r} must lie in [0, 1]")
        if activation_mode not in ACTIVATION_MODES:
            raise ValueError(f"activation_mode={activation_mode!r} is not one of {ACTIVATION_MODES}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation={output_activation!r} is not one of {OUTPUT_ACTIVATIONS}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r} must be a positive integer")
        if lr <= 0:
            raise ValueError(f"lr={lr!r} must be positive")
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

    @property
    def refae_prefix(self) -> str:
        """Tag prefix of the RefAE's scalars: ``refae``, or ``refae-<layer>`` beside ``cladec-<layer>``."""
        if self.prefix.startswith(self.method):
            return "refae" + self.prefix[len(self.method) :]
        return f"{self.prefix}-refae"

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
        if self.input_layer is None and not x.is_floating_point():
            raise TypeError(
                f"ClaDec decodes the layer's activations back to the model's input, but input_fn(batch) gave a "
                f"{x.dtype} tensor of shape {tuple(x.shape)} (token ids?): a decoder cannot produce integer ids and "
                "the classifier cannot be run on a reconstruction of them. Pass input_layer='<the embedding "
                "layer>' to decode to that layer's output instead, or give input_fn the model's continuous input."
            )

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits ``(B, K)`` on ``x`` (its output through ``output_fn``), in float32."""
        assert self.model is not None
        return select_output(self.model(x), self.output_fn, who="ClaDec").float()

    def _due(self, batch_number: int) -> bool:
        """Whether the ``batch_number``-th training batch (1-based, same on every rank) is a regular co-training
        step."""
        return batch_number % self.every_n_steps == 0

    def _due_now(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether the coming training batch is a co-training step: a regular one, or the epoch's last batch when no
        regular step fell in the epoch (fewer batches than ``every_n_steps``). The same answer on every rank."""
        number = self.batches_seen + 1
        if self._due(number):
            return True
        if batch_idx + 1 != getattr(trainer, "num_training_batches", None):
            return False
        first = number - batch_idx  # the epoch's first batch number (also after a mid-epoch resume)
        last_regular = (number - 1) // self.every_n_steps * self.every_n_steps
        return last_regular < first

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_steps = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for capture in (self._capture, self._in_capture):
            if capture is not None:
                capture.disarm()
        if self.core is None and self._restored is None:  # the first batch: refuse token ids before anything runs
            self._check_input(self.batches.input(batch))
        self._step_pending = self._due_now(trainer, batch_idx)
        if self._step_pending and self.activation_mode == "train" and self._capture is not None:
            x = self.batches.input(batch)
            self._capture.arm(x, pl_module)
            if self._in_capture is not None:
                self._in_capture.arm(x, pl_module)

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        pending, self._step_pending = self._step_pending, False
        train_mode = self.activation_mode == "train" and self._capture is not None
        matched = self._capture.matched if train_mode else 0
        code = self._capture.disarm() if train_mode else None
        original = self._in_capture.disarm() if train_mode and self._in_capture is not None else None
        if not pending:
            return
        x, y = self.batches.input(batch).detach(), self.batches.target(batch)
        self._check_input(x)
        if train_mode:
            self._check_capture(code, x, matched, self.tap)
            code = code.detach()
            if self._in_tap is not None:
                self._check_capture(original, x, matched, self._in_tap)
                original = original.detach()
        self._epoch_steps += 1
        self.fit_step(x, code, None if y is None else y.detach(), original=original)

    def _check_capture(self, code: torch.Tensor | None, x: torch.Tensor, matched: int, tap: LayerTap) -> None:
        """Fail with the fix when the user's training forward of the batch gave no usable activation at ``tap``."""
        assert self.model is not None
        fix = "Use activation_mode='eval' when training_step does not run the model once on input_fn(batch)."
        if matched == 0:
            raise RuntimeError(
                f"ClaDec(activation_mode='train') saw no forward of {type(self.model).__name__} on input_fn(batch) "
                f"inside training_step (forwards on other inputs, or from other hooks, are ignored), so it captured "
                f"nothing at {tap.describe()}. {fix}"
            )
        if code is None or code.shape[0] != x.shape[0]:
            got = "nothing" if code is None else f"a batch of {code.shape[0]}"
            raise RuntimeError(
                f"ClaDec(activation_mode='train') captured {got} at {tap.describe()} during training_step's "
                f"forward of input_fn(batch), which has {x.shape[0]} examples. {fix}"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_steps == 0:
            self._warn_once(
                "cadence",
                f"ClaDec did not co-train during epoch {trainer.current_epoch}: no training batch was due with "
                f"every_n_steps={self.every_n_steps} (an epoch of unknown length, or max_steps, ended first). "
                "Lower every_n_steps.",
            )

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

    def _usable_rows(
        self, x: torch.Tensor, original: torch.Tensor, code: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows a training step can use, and the targets of the classification term (``alpha > 0``)."""
        keep = finite_rows(x, original, code)
        target = None
        if self.alpha > 0:
            if y is None:  # the classifier's own predictions; a non-finite output is no target
                with torch.no_grad(), eval_mode(self.model):
                    logits = self._logits(x)
                keep &= finite_rows(logits)
                target = logits.argmax(-1)
            else:
                keep &= labels_in_range(y, self._num_classes(x)).to(keep.device)
                target = y
        return keep, target

    def fit_step(
        self,
        x: torch.Tensor,
        code: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        original: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One Adam step of the decoder and the RefAE on a batch; returns the losses.

        ``code`` defaults to the classifier's eval-mode activation of ``x``; ``original`` (what is decoded to) to
        ``x``, or with ``input_layer`` to that layer's eval-mode output on ``x``. Rows with a NaN/Inf input or
        activation (with ``alpha > 0``: a label outside ``[0, K)`` or a non-finite prediction) are left out of the
        step and counted in :attr:`skipped`; the step is skipped (counted in :attr:`skipped_steps`) only when a rank
        has no usable row. Usable without a Trainer after :meth:`attach`.
        """
        assert self.model is not None
        self._check_input(x)
        if self._in_tap is None:
            original = x
        elif original is None or code is None:
            original_eval, code_eval = self._encode_pair(x)
            original = original_eval if original is None else original
            code = code_eval if code is None else code
        code = (self.encode(x) if code is None else code).detach().float()
        original = original.detach()
        core = self._ensure_built(original, code)
        self._num_classes(x)  # once: a dict or tuple output without output_fn fails here, at the first step
        self.steps += 1
        keep, target = self._usable_rows(x, original, code, y)
        left_out = int((~keep).sum())
        if left_out:
            self._note_skipped(left_out, "training rows")
        if not _rows_on_every_rank(keep):  # before any forward: a NaN would also reach the RefAE's BatchNorm
            self._skip("every row of its inputs, activations or labels")
            return {}
        if left_out:
            x, original, code = x[keep], original[keep], code[keep]
            target = None if target is None else target[keep]
        x32 = original.float()
        recon = core.decoder(code)
        logits = None
        if self.alpha > 0:
            with eval_mode(self.model):  # BatchNorm statistics and dropout of the classifier stay untouched
                logits = self._logits_on(recon, x, original)
        loss, rec, _ = cladec_objective(recon, x32, self.alpha, logits, target)
        losses = {"cladec/rec_loss": rec.detach()}
        if core.refae is not None:
            with self.rng.active(x.device):  # dropout in the copied encoder draws from the private stream
                ref_loss = reconstruction_loss(core.refae(x32, source=x), x32)
            loss = loss + ref_loss
            losses["refae/rec_loss"] = ref_loss.detach()
        if not owned_step(loss, [p for p in core.parameters() if p.requires_grad], self._optimizer):
            self._skip("its gradients")
        return losses

    def _note_skipped(self, rows: int, where: str) -> None:
        """Count training rows left out and warn once."""
        self.skipped += rows
        self._warn_once(
            "rows",
            f"ClaDec: left out {rows} {where} with NaN/Inf values or labels outside the class range (counted in "
            f"{self.tag('skipped')}); the other rows are used.",
        )

    def _skip(self, what: str) -> None:
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            rank_zero_warn(f"ClaDec: skipped a step because {what} held NaN/Inf (counted in skipped_steps).")

    # ------------------------------------------------------------------ validation and reports
    def _score_names(self, with_targets: bool) -> list[str]:
        """The scalars :meth:`_scores_on` returns (the same on every rank, whatever rows it could use)."""
        names = [self.tag("rec_loss"), self.tag("agreement")]
        names += [self.tag("acc_on_recon"), self.tag("ce_on_recon")] if with_targets else []
        if self.use_refae:
            ref = self.refae_prefix
            names += [self.tag("rec_loss", ref), self.tag("agreement", ref)]
            names += [self.tag("acc_on_recon", ref)] if with_targets else []
        return names

    def _scores_on(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], int]:
        """Reconstruction losses, and the frozen classifier's accuracy, agreement and CE on the reconstructions, over
        the usable rows of ``(x, y)``; returns the scores and the number of rows behind them.

        Rows with a NaN/Inf input, activation or classifier output, or a label outside ``[0, K)``, are left out
        (their number is kept in ``_metric_skipped``); with no usable row every score is 0 with weight 0.
        """
        logits_x, out = self._reconstruct(x)
        original = x if out.original is None else out.original
        keep = finite_rows(x, original, out.code, logits_x)
        if y is not None:
            keep &= labels_in_range(y, logits_x.shape[-1]).to(keep.device)
        self._metric_skipped = int((~keep).sum())
        n = int(keep.sum())
        if n == 0:
            return {name: torch.zeros((), device=x.device) for name in self._score_names(y is not None)}, 0
        x, original, logits_x, cladec = x[keep], original[keep], logits_x[keep], out.cladec[keep]
        y = None if y is None else y[keep]
        refae = None if out.refae is None else out.refae[keep]
        recons = cladec if refae is None else torch.cat([cladec, refae])
        with torch.no_grad(), eval_mode(self.model):  # one forward for both reconstructions
            logits = self._logits_on(recons, x if refae is None else torch.cat([x, x]), original)
        labels, pred = logits.argmax(-1), logits_x.argmax(-1)
        x32 = original.float()
        scores = {
            self.tag("rec_loss"): reconstruction_loss(cladec, x32),
            self.tag("agreement"): (labels[:n] == pred).float().mean(),
        }
        if y is not None:
            scores[self.tag("acc_on_recon")] = (labels[:n] == y).float().mean()
            scores[self.tag("ce_on_recon")] = F.cross_entropy(logits[:n], y)
        if refae is not None:
            ref = self.refae_prefix
            scores[self.tag("rec_loss", ref)] = reconstruction_loss(refae, x32)
            scores[self.tag("agreement", ref)] = (labels[n:] == pred).float().mean()
            if y is not None:
                scores[self.tag("acc_on_recon", ref)] = (labels[n:] == y).float().mean()
        return scores, n

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.core is None and self._restored is None) or self.examples.inputs is None:
            return  # nothing trained yet (the same on every rank: the cadence depends on the step count only)
        x = self.examples.inputs.to(pl_module.device)
        y = None if self.examples.targets is None else self.examples.targets.to(pl_module.device)
        scores, n = self._scores_on(x, y)
        average = MeanOfNamed(sorted(scores)).to(x.device)
        average.update(scores, weight=n)
        values = average.compute()  # a collective under DDP: every rank gets here
        ref_rec = values.get(self.tag("rec_loss", self.refae_prefix))
        if ref_rec is not None and self.tag("rec_loss") in values:
            values[self.tag("rec_ratio")] = values[self.tag("rec_loss")] / ref_rec.clamp_min(1e-12)
        if self._metric_skipped:
            self._warn_once(
                "metric",
                f"ClaDec: {self._metric_skipped} of the {x.shape[0]} metric-set examples have NaN/Inf inputs, "
                "activations or outputs, or labels outside the class range; the scalars leave them out (counted in "
                f"{self.tag('skipped')}).",
            )
        left_out = self.skipped + getattr(self.examples, "skipped", 0) + self._metric_skipped
        skipped = torch.tensor([float(left_out)], device=x.device)
        values[self.tag("skipped")] = all_reduce_(skipped, "sum")[0]
        log_scalars(pl_module, values)
        if trainer.is_global_zero and len(self.probe):
            self.draw_probes(trainer)

    def draw_probes(self, trainer: pl.Trainer) -> None:
        """Log the probe panels (images) or bar charts (tabular inputs) to the image-capable loggers.

        With ``input_layer``, sequences of vectors ``(T, d)`` (token embeddings) are drawn as one-channel images."""
        assert self.probe.inputs is not None and self.core is not None
        x = self.probe.inputs.to(next(self.core.parameters()).device)
        keep = finite_rows(x)  # a NaN/Inf example has no picture
        targets = None if self.probe.targets is None else self.probe.targets[keep.cpu()]
        if not bool(keep.any()):
            return
        out = self.explain(x[keep])
        shown = (x[keep] if out.original is None else out.original).cpu().float()
        cladec, refae = out.cladec.cpu(), (out.refae.cpu() if out.refae is not None else None)
        if self.input_layer is not None and shown.dim() == 3:
            shown, cladec = shown.unsqueeze(1), cladec.unsqueeze(1)
            refae = None if refae is None else refae.unsqueeze(1)
        if shown.dim() == 4:  # original | RefAE | ClaDec | ClaDec − original, on the originals' intensity range
            low, high = float(shown.min()), float(shown.max())
            tiles = [to_rgb(shown, low, high)] + ([to_rgb(refae, low, high)] if refae is not None else [])
            rows = tile_row(tiles + [to_rgb(cladec, low, high), diverging(cladec - shown, high - low)])
            log_image(trainer, self.tag("probes"), stack_rows(rows))
            return
        rows, titles = [], []
        for i in range(min(4, shown.shape[0])):
            series = {"original": shown[i].flatten()}
            if refae is not None:
                series["RefAE"] = refae[i].flatten()
            series["ClaDec"] = cladec[i].flatten()
            rows.append(series)
            label = "" if targets is None else f" (label {int(targets[i])})"
            titles.append(f"probe {i}{label}")
        names = getattr(trainer.datamodule, "feature_names", None) if trainer.datamodule is not None else None
        log_image(trainer, self.tag("probes"), figure_to_image(feature_bars(rows, names, titles)))

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
