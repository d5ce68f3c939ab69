"""ClaDec's co-training: when the decoder and the RefAE step, on what, and what a step leaves out.

:class:`ClaDecCoTraining` holds the training side of :class:`lightning_xai.cladec.ClaDec`: the ``every_n_steps``
cadence (with the epoch's last batch as a fallback, so every epoch co-trains once), the Lightning hooks that arm
and read the activation capture around the user's ``training_step`` (:mod:`lightning_xai.cladec.capture`), and
:meth:`~ClaDecCoTraining.fit_step`, one Adam step on the usable rows of a batch (the bad-row policy of
:mod:`lightning_xai.cladec.rows`) with the skip accounting. It is a mixin of the callback, kept apart so that the
callback module holds the lifecycle (set-up, lazy build, explanation, checkpoints) and this one the step; it uses
the callback's state and classifier accessors (declared below for type checkers) and never imports the callback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_xai._core import ExplainerCallback, LayerTap, eval_mode, owned_step
from lightning_xai.cladec.capture import BatchCapture, check_capture
from lightning_xai.cladec.model import ClaDecModel, cladec_objective, reconstruction_loss
from lightning_xai.cladec.rows import finite_rows, labels_in_range, rows_on_every_rank


class ClaDecCoTraining(ExplainerCallback):
    """The co-training half of :class:`lightning_xai.cladec.ClaDec` (a mixin: it has no constructor of its own)."""

    alpha: float
    activation_mode: str
    tap: LayerTap | None
    _capture: BatchCapture | None
    _in_tap: LayerTap | None
    _in_capture: BatchCapture | None
    _optimizer: torch.optim.Optimizer | None
    steps: int
    skipped_steps: int
    skipped: int
    _step_pending: bool
    _epoch_steps: int

    if TYPE_CHECKING:  # provided by the callback

        def encode(self, x: torch.Tensor) -> torch.Tensor: ...

        def _encode_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

        def _ensure_built(self, x: torch.Tensor, code: torch.Tensor) -> ClaDecModel: ...

        def _check_input(self, x: torch.Tensor) -> None: ...

        def _logits(self, x: torch.Tensor) -> torch.Tensor: ...

        def _logits_on(self, recon: torch.Tensor, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...

        def _num_classes(self, x: torch.Tensor) -> int: ...

        def _warn_once(self, key: str, message: str) -> None: ...

    # ------------------------------------------------------------------ cadence and capture
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
            assert self.model is not None and self.tap is not None
            check_capture(code, x, matched, self.tap, self.model)
            code = code.detach()
            if self._in_tap is not None:
                check_capture(original, x, matched, self._in_tap, self.model)
                original = original.detach()
        self._epoch_steps += 1
        self.fit_step(x, code, None if y is None else y.detach(), original=original)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_steps == 0:
            self._warn_once(
                "cadence",
                f"ClaDec did not co-train during epoch {trainer.current_epoch}: no training batch was due with "
                f"every_n_steps={self.every_n_steps} (an epoch of unknown length, or max_steps, ended first). "
                "Lower every_n_steps.",
            )

    # ------------------------------------------------------------------ the step
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
        if not rows_on_every_rank(keep):  # before any forward: a NaN would also reach the RefAE's BatchNorm
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
