"""Instance-wise linearization: the exact ``F(x) = W(x)·x + b(x)`` of a network at an input.

A network built from affine layers (linear, conv, eval-mode BatchNorm, average pooling, residual additions) and
piecewise-linear units (ReLU family, max-pooling) is affine on the region of input space where its gates (ReLU masks,
max-pool winners) stay fixed (Li et al., arXiv:2310.16295). There ``W(x)`` is the input Jacobian, computed here with
one batched vector-Jacobian product per chunk of outputs (never a dense layer matrix), and ``b(x)`` is obtained
independently by pushing the zero input through the network with every gate frozen at its value for ``x``. The
identity ``W·x + b = F(x)`` is then a real check (:attr:`Linearized.residual`), not a definition.

Networks with smooth units (GELU, SiLU, ...), LayerNorm or softmax attention are not piecewise-linear; they are
linearized in **gated-linear** mode (detached gates, see :mod:`~lightning_xai._core.gates`), which is exact
against the gated network but whose ``W`` is not the Jacobian of the original one. :attr:`Linearized.mode` says which.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from lightning_xai._core.autograd import batched_vjp
from lightning_xai._core.gates import GateRecorder, Mode, classify
from lightning_xai._core.modules import eval_mode

MODES = ("auto", "exact", "gated-linear")
BIASES = ("frozen", "difference")
# relative residuals above these mean the network is not what the gates describe (floating-point error is far below)
RESIDUAL_WARNING = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-1, torch.bfloat16: 1e-1}


@dataclass
class Linearized:
    """``F(x) = W·x + b`` for a batch, for ``K`` outputs (all of them, or the requested classes).

    Attributes:
        weight: ``W``, shape ``(B, K, *input_shape)``.
        bias: ``b`` from the frozen-gate zero pass, shape ``(B, K)``.
        output: ``F(x)`` for the same outputs, shape ``(B, K)``.
        classes: the output indices of the ``K`` columns, shape ``(B, K)``.
        mode: ``"exact"`` (piecewise-linear network: ``W`` is the Jacobian) or ``"gated-linear"``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    output: torch.Tensor
    classes: torch.Tensor
    mode: str

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``W·x + b`` for inputs of the linearized batch's shape (the same gates: exact only on their region)."""
        return (self.weight.flatten(2) * x.flatten(1)[:, None, :].to(self.weight)).sum(-1) + self.bias

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """``W ⊙ x`` per output: the exact share of each input feature in ``F(x) − b``, shape of :attr:`weight`."""
        return self.weight * x[:, None].to(self.weight)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Relative error ``‖W·x + b − F(x)‖ / ‖F(x)‖`` per example (≈1e-7 in float32, ≈1e-16 in float64)."""
        diff = (self.apply(x) - self.output).norm(dim=-1)
        return diff / self.output.norm(dim=-1).clamp_min(torch.finfo(self.output.dtype).tiny)


def _class_indices(classes: torch.Tensor | Sequence[int] | None, batch: int, n_out: int, device) -> torch.Tensor:
    """``(B, K)`` output indices: all outputs, a shared list (Python sequence), or per-example tensor rows."""
    if classes is None:
        idx = torch.arange(n_out, device=device).expand(batch, n_out)
    elif isinstance(classes, torch.Tensor):
        idx = classes.to(device=device, dtype=torch.long)
        idx = idx[:, None] if idx.dim() == 1 else idx
        if idx.dim() != 2 or idx.shape[0] != batch:
            raise ValueError(f"a classes tensor must be (B,) or (B, K) with B={batch}, got {tuple(classes.shape)}")
    else:
        idx = torch.as_tensor(list(classes), device=device, dtype=torch.long).expand(batch, -1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_out):
        raise ValueError(f"classes must lie in [0, {n_out}), got {sorted(set(idx.flatten().tolist()))[:10]}")
    return idx


def resolve_mode(model: nn.Module, mode: str = "auto") -> Mode:
    """``"exact"`` or ``"gated-linear"`` for ``model``; ``mode="exact"`` on a non-piecewise-linear model raises."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    detected, unknown = classify(model)
    if unknown:
        warnings.warn(
            f"linearize: modules of unknown linearity {unknown[:5]} are treated as affine; the residual check "
            "(Linearized.residual) tells whether they are.",
            stacklevel=3,
        )
    if mode == "exact" and detected == "gated-linear":
        raise ValueError("mode='exact' needs a piecewise-linear network; this one has smooth units, norms or softmax "
                         "(use mode='gated-linear' or 'auto')")
    return detected if mode == "auto" else mode  # type: ignore[return-value]


def linearize(
    model: nn.Module,
    x: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    bias: str = "frozen",
) -> Linearized:
    """The exact local linear map ``F(x) = W·x + b`` of ``model`` at each example of ``x``.

    The model is evaluated in eval mode (BatchNorm statistics fixed, dropout off) and its previous modes are restored;
    autograd is enabled even under ``torch.inference_mode`` (Lightning's validation).

    Args:
        model: any ``nn.Module`` mapping ``(B, *input_shape)`` to ``(B, ...)`` (outputs are flattened per example).
        x: a batch of inputs.
        classes: outputs to linearize: ``None`` for all, a Python list of indices shared by the batch, or a tensor
            of per-example indices, ``(B,)`` or ``(B, K)`` (e.g. ``logits.argmax(-1)``).
        mode: ``"auto"`` (exact when the network is piecewise-linear, otherwise gated-linear), ``"exact"`` or
            ``"gated-linear"``.
        chunk_size: outputs per batched backward (memory ``O(chunk·B·D)``); ``None`` does all at once.
        bias: ``"frozen"`` computes ``b`` independently, pushing zero through the frozen gates (one more forward
            pass; then :meth:`Linearized.residual` checks the identity, and a large residual is warned about), or
            ``"difference"`` sets ``b = F(x) − W·x`` (cheaper; the identity then holds by construction).

    Returns:
        a :class:`Linearized`.
    """
    if bias not in BIASES:
        raise ValueError(f"bias={bias!r} is not one of {BIASES}")
    resolved = resolve_mode(model, mode)
    recorder = GateRecorder(model, gated=resolved == "gated-linear")
    # gates are recorded for the bias pass, and in gated-linear mode to route the forward through them
    recording = recorder.record() if bias == "frozen" or resolved == "gated-linear" else nullcontext()
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        with recording:
            out = model(x).flatten(1)
        batch, n_out = out.shape
        idx = _class_indices(classes, batch, n_out, out.device)
        k = idx.shape[1]
        chunk = k if chunk_size is None else max(1, chunk_size)
        rows = []
        for start in range(0, k, chunk):
            part = idx[:, start : start + chunk]  # (B, k')
            cot = torch.zeros(part.shape[1], batch, n_out, dtype=out.dtype, device=out.device)
            cot.scatter_(2, part.T[:, :, None], 1.0)
            rows.append(batched_vjp(out, x, cot, retain=start + chunk < k))
        weight = torch.cat(rows).movedim(0, 1).detach()  # (B, K, *input_shape)
        output = out.detach().gather(1, idx)
        if bias == "difference":
            offset = output - (weight.flatten(2) * x.detach().flatten(1)[:, None, :]).sum(-1)
            return Linearized(weight=weight, bias=offset, output=output, classes=idx, mode=resolved)
        with torch.no_grad(), recorder.replay():
            offset = model(torch.zeros_like(x)).flatten(1).gather(1, idx)
    result = Linearized(weight=weight, bias=offset, output=output, classes=idx, mode=resolved)
    worst = float(result.residual(x.detach()).max()) if output.numel() else 0.0
    if worst > RESIDUAL_WARNING[output.dtype] if output.dtype in RESIDUAL_WARNING else worst > 1e-3:
        warnings.warn(
            f"linearize: W·x + b misses F(x) by {worst:.2e} (relative). Nonlinearities called as functions "
            "(torch.relu, F.gelu, ...) are invisible to the frozen-gate bias pass; use modules (nn.ReLU, ...).",
            stacklevel=2,
        )
    return result


def frozen_gate_forward(model: nn.Module, x: torch.Tensor, z: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """``model`` applied to ``z`` with every gate frozen at its value for ``x`` (the affine piece of ``F`` at x)."""
    recorder = GateRecorder(model, gated=gated)
    with eval_mode(model), torch.inference_mode(False), torch.no_grad():
        with recorder.record():
            model(x)
        with recorder.replay():
            return model(z)
