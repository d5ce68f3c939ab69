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
"""

from __future__ import annotations

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
from lightning_xai.cladec.model import ClaDecModel, cladec_objective, reconstruction_loss
from lightning_xai.metrics import MeanOfNamed
from lightning_xai.viz import diverging, feature_bars, stack_rows, tile_row, to_rgb

ACTIVATION_MODES = ("train", "eval")
OUTPUT_ACTIVATIONS = ("auto", "sigmoid", "identity")


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is finite on every rank (one tiny all-reduce under DDP: all ranks skip together)."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().float()
    return not bool(all_reduce_(bad, "max"))


@dataclass
class ClaDecExplanation:
    """What :meth:`ClaDec.explain` returns for a batch ``x`` of shape ``(B, *input_shape)``.

    Attributes:
        cladec: ClaDec reconstructions ``D(a(x))``, shape of ``x``.
        refae: RefAE reconstructions (``None`` without a RefAE), shape of ``x``.
        code: the explained layer's activations ``a(x)``, ``(B, *code_shape)``.
    """

    cladec: torch.Tensor
    refae: torch.Tensor | None
    code: torch.Tensor


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
        width: decoder channel base.
        lr: Adam learning rate of the decoder and RefAE.
        weight_decay: Adam weight decay.
        refae: also train the reference auto-encoder.
        activation_mode: ``"train"`` reuses the activation of the user's training forward (free, train-mode
            BatchNorm/dropout, assumes ``training_step`` runs the model on ``input_fn(batch)``); ``"eval"`` runs an
            extra truncated forward in eval mode.
        output_activation: ``"auto"`` (sigmoid when the data lie in [0, 1], decided on the first batch),
            ``"sigmoid"`` or ``"identity"``.
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
        self.tap: LayerTap | None = None
        self.core: ClaDecModel | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._shapes: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self.steps = 0
        self.skipped_steps = 0

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
        if self._shapes is not None and (self._shapes["layer"], self._shapes["capture"]) != (name, capture):
            raise ValueError(
                f"the checkpoint's ClaDec state decodes {self._shapes['layer']!r} ({self._shapes['capture']}), "
                f"but this callback is configured for {name!r} ({capture})"
            )
        if self.layer is None:
            rank_zero_info(f"ClaDec: layer=None, decoding {self.tap.describe()}, the last hidden representation.")

    def release(self) -> None:
        if self.tap is not None:
            self.tap.detach()

    def _resolve_activation(self, x: torch.Tensor) -> str:
        if self.output_activation != "auto":
            return self.output_activation
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
                self.width, s["output_activation"], self.use_refae,
            )
        self.core = core.to(device).train()  # stays in train mode; explain() switches to eval and back
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

    def _due(self, batch_number: int) -> bool:
        """Whether the ``batch_number``-th training batch (1-based, same on every rank) is a co-training step."""
        return batch_number % self.every_n_steps == 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.activation_mode == "train" and self.tap is not None and self._due(self.batches_seen + 1):
            self.tap.arm()

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._due(self.batches_seen):
            return
        code = self.tap.disarm() if self.activation_mode == "train" and self.tap is not None else None
        x, y = self.batches.input(batch).detach(), self.batches.target(batch)
        if self.activation_mode == "train":
            if code is None or code.shape[0] != x.shape[0]:
                got = "nothing" if code is None else f"a batch of {code.shape[0]}"
                raise RuntimeError(
                    f"ClaDec(activation_mode='train') captured {got} at {self.tap.describe()} during training_step, "
                    f"but input_fn gave {x.shape[0]} examples. Use activation_mode='eval' when training_step does not "
                    "run the model once on input_fn(batch)."
                )
            code = code.detach().float()
        self.fit_step(x, code, None if y is None else y.detach())

    def fit_step(
        self, x: torch.Tensor, code: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One Adam step of the decoder and the RefAE on a batch; returns the losses.

        ``code`` defaults to the classifier's eval-mode activation of ``x``. Usable without a Trainer after
        :meth:`attach`.
        """
        assert self.model is not None
        code = self.encode(x) if code is None else code
        core = self._ensure_built(x, code)
        self.steps += 1
        if not _all_finite(x, code):  # skip before any forward: a NaN would also reach the RefAE's BatchNorm
            self._skip("its inputs or activations")
            return {}
        recon = core.decoder(code)
        logits = target = None
        if self.alpha > 0:
            with eval_mode(self.model):  # BatchNorm statistics and dropout of the classifier stay untouched
                logits = self.model(recon)
                target = y if y is not None else self._predict(x)
        loss, rec, _ = cladec_objective(recon, x, self.alpha, logits, target)
        losses = {"cladec/rec_loss": rec.detach()}
        if core.refae is not None:
            with self.rng.active(x.device):  # dropout in the copied encoder draws from the private stream
                ref_loss = reconstruction_loss(core.refae(x), x)
            loss = loss + ref_loss
            losses["refae/rec_loss"] = ref_loss.detach()
        if not owned_step(loss, [p for p in core.parameters() if p.requires_grad], self._optimizer):
            self._skip("its gradients")
        return losses

    def _skip(self, what: str) -> None:
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            rank_zero_warn(f"ClaDec: skipped a step because {what} held NaN/Inf (counted in skipped_steps).")

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        with torch.no_grad(), eval_mode(self.model):
            return self.model(x).argmax(-1)

    # ------------------------------------------------------------------ validation and reports
    def _scores_on(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Reconstruction losses, and the frozen classifier's accuracy, agreement and CE on the reconstructions."""
        logits_x, out = self._reconstruct(x)
        recons = out.cladec if out.refae is None else torch.cat([out.cladec, out.refae])
        with torch.no_grad(), eval_mode(self.model):  # one forward for both reconstructions
            logits = self.model(recons).float()
        labels, pred, n = logits.argmax(-1), logits_x.argmax(-1), x.shape[0]
        scores = {
            self.tag("rec_loss"): reconstruction_loss(out.cladec, x),
            self.tag("agreement"): (labels[:n] == pred).float().mean(),
        }
        if y is not None:
            scores[self.tag("acc_on_recon")] = (labels[:n] == y).float().mean()
            scores[self.tag("ce_on_recon")] = F.cross_entropy(logits[:n], y)
        if out.refae is not None:
            ref = self.refae_prefix
            scores[self.tag("rec_loss", ref)] = reconstruction_loss(out.refae, x)
            scores[self.tag("agreement", ref)] = (labels[n:] == pred).float().mean()
            if y is not None:
                scores[self.tag("acc_on_recon", ref)] = (labels[n:] == y).float().mean()
        return scores

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.core is None and self._restored is None) or self.examples.inputs is None:
            return  # nothing trained yet (the same on every rank: the cadence depends on the step count only)
        x = self.examples.inputs.to(pl_module.device)
        y = None if self.examples.targets is None else self.examples.targets.to(pl_module.device)
        scores = self._scores_on(x, y)
        average = MeanOfNamed(sorted(scores)).to(x.device)
        average.update(scores, weight=x.shape[0])
        values = average.compute()  # a collective under DDP: every rank gets here
        ref_rec = values.get(self.tag("rec_loss", self.refae_prefix))
        if ref_rec is not None:
            values[self.tag("rec_ratio")] = values[self.tag("rec_loss")] / ref_rec.clamp_min(1e-12)
        log_scalars(pl_module, values)
        if trainer.is_global_zero and len(self.probe):
            self.draw_probes(trainer)

    def draw_probes(self, trainer: pl.Trainer) -> None:
        """Log the probe panels (images) or bar charts (tabular inputs) to the image-capable loggers."""
        assert self.probe.inputs is not None and self.core is not None
        x = self.probe.inputs.to(next(self.core.parameters()).device)
        out = self.explain(x)
        x, cladec = x.cpu(), out.cladec.cpu()
        refae = out.refae.cpu() if out.refae is not None else None
        if x.dim() == 4:  # original | RefAE | ClaDec | ClaDec − original, on the originals' intensity range
            low, high = float(x.min()), float(x.max())
            tiles = [to_rgb(x, low, high)] + ([to_rgb(refae, low, high)] if refae is not None else [])
            rows = tile_row(tiles + [to_rgb(cladec, low, high), diverging(cladec - x, high - low)])
            log_image(trainer, self.tag("probes"), stack_rows(rows))
            return
        rows, titles = [], []
        for i in range(min(4, x.shape[0])):
            series = {"original": x[i].flatten()}
            if refae is not None:
                series["RefAE"] = refae[i].flatten()
            series["ClaDec"] = cladec[i].flatten()
            rows.append(series)
            label = "" if self.probe.targets is None else f" (label {int(self.probe.targets[i])})"
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
        with torch.inference_mode(False), torch.no_grad(), eval_mode(self.model):
            x = x.clone() if x.is_inference() else x
            with self.tap.recording():
                logits = self.model(x)
            code = self.tap.value.detach().float()
            core = self._ensure_built(x, code)
            with eval_mode(core):
                cladec = core.decoder(code)
                refae = core.refae(x) if core.refae is not None else None
        return logits, ClaDecExplanation(cladec=cladec, refae=refae, code=code)

    # ------------------------------------------------------------------ checkpoints
    def explainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "shapes": self._shapes,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
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
        self.core, self._optimizer = None, None
        self._restored = {k: state[k] for k in ("core", "optimizer")} if "core" in state else None
