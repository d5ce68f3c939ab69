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
from dataclasses import dataclass

import torch
from torch import nn

from lightning_xai._core.autograd import batched_vjp
from lightning_xai._core.gates import GateRecorder, Mode, classify, refuse_recurrent
from lightning_xai._core.layers import replaced_output
from lightning_xai._core.modules import eval_mode
from lightning_xai._core.outputs import OutputFn, select_output

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
        point: the tensor ``W`` applies to: the input batch, or the ``input_layer``'s output.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    output: torch.Tensor
    classes: torch.Tensor
    mode: str
    point: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``W·x + b`` for inputs of the linearized batch's shape (the same gates: exact only on their region)."""
        return (self.weight.flatten(2) * x.flatten(1)[:, None, :].to(self.weight)).sum(-1) + self.bias

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """``W ⊙ x`` per output: the exact share of each input feature in ``F(x) − b``, shape of :attr:`weight`."""
        return self.weight * x[:, None].to(self.weight)

    def residual(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Relative error ``‖W·x + b − F(x)‖ / ‖F(x)‖`` per example (≈1e-7 in float32, ≈1e-16 in float64); ``x``
        defaults to :attr:`point`."""
        x = self.point if x is None else x
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
    """The mode ``model``'s modules call for (``"exact"`` or ``"gated-linear"``); a static check for set-up time.

    Functional calls in ``forward`` are only seen when the network runs: :func:`linearize` reports the mode it found.

    Raises:
        ValueError: for an unknown ``mode``, or ``mode="exact"`` on a network with gated modules.
        NotImplementedError: for recurrent layers.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    detected, gated = classify(model)
    if mode == "exact" and detected == "gated-linear":
        raise ValueError(f"mode='exact' needs a piecewise-linear network; {gated[:5]} are smooth units, norms or "
                         "softmax (use mode='gated-linear' or 'auto')")
    return detected if mode == "auto" else mode  # type: ignore[return-value]


def _check_input(x: torch.Tensor, input_layer: str | None) -> None:
    if input_layer is None and not x.is_floating_point():
        raise TypeError(f"the input is {x.dtype} (token ids?), and a network is not linear in integer ids: pass "
                        "input_layer='<module name>' (e.g. the embedding) to linearize with respect to that layer's "
                        "output")


def linearize(
    model: nn.Module,
    x: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    bias: str = "frozen",
    input_layer: str | None = None,
    output_fn: OutputFn | None = None,
) -> Linearized:
    """The exact local linear map ``F(x) = W·x + b`` of ``model`` at each example of ``x``.

    The model is evaluated in eval mode (BatchNorm statistics fixed, dropout off) and its previous modes are restored;
    autograd is enabled even under ``torch.inference_mode`` (Lightning's validation). Gates are recorded per operator
    call (:class:`~lightning_xai._core.gates.GateRecorder`), so functional activations (``F.relu``, ``torch.relu``),
    in-place units and modules called at several sites are exact.

    Args:
        model: any ``nn.Module`` mapping ``(B, *input_shape)`` to ``(B, ...)`` (outputs are flattened per example).
        x: a batch of inputs.
        classes: outputs to linearize: ``None`` for all, a Python list of indices shared by the batch, or a tensor
            of per-example indices, ``(B,)`` or ``(B, K)`` (e.g. ``logits.argmax(-1)``).
        mode: ``"auto"`` (exact when the network is piecewise-linear, otherwise gated-linear), ``"exact"`` (fail on
            other networks) or ``"gated-linear"``.
        chunk_size: outputs per batched backward (memory ``O(chunk·B·D)``); ``None`` does all at once.
        bias: ``"frozen"`` computes ``b`` independently, pushing zero through the frozen gates (one more forward
            pass; then :meth:`Linearized.residual` checks the identity, and a large residual is warned about), or
            ``"difference"`` sets ``b = F(x) − W·x`` (cheaper; the identity then holds by construction).
        input_layer: linearize in the output of this module instead of ``x`` (e.g. the embedding of a token-id
            model); ``W`` then has that output's shape per example, and :attr:`Linearized.point` holds it.
        output_fn: callable ``model output -> tensor`` for models that return a dict, tuple or output object.

    Returns:
        a :class:`Linearized`.
    """
    if bias not in BIASES:
        raise ValueError(f"bias={bias!r} is not one of {BIASES}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    _check_input(x, input_layer)
    refuse_recurrent(model)
    recorder = GateRecorder(model, gated=True)
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        leaf = x.requires_grad_(True) if input_layer is None else None
        with recorder.record(), replaced_output(model, input_layer, lambda o: recorder.track(_leaf(o))) as subs:
            out = select_output(model(x.clone() if leaf is not None else x), output_fn, who="linearize").flatten(1)
        point = leaf if leaf is not None else subs[0]
        resolved = _resolved(recorder, mode)
        batch, n_out = out.shape
        idx = _class_indices(classes, batch, n_out, out.device)
        weight = _jacobian_rows(out, point, idx, chunk_size)
        output = out.detach().gather(1, idx)
        if bias == "difference":
            offset = output - (weight.flatten(2) * point.detach().flatten(1)[:, None, :]).sum(-1)
            return Linearized(weight, offset, output, idx, resolved, point.detach())
        zeros = lambda o: recorder.track(torch.zeros_like(o))  # noqa: E731 - the input layer's output replaced by zero
        with torch.no_grad(), recorder.replay(), replaced_output(model, input_layer, zeros):
            zero_in = torch.zeros_like(x) if input_layer is None else x
            offset = select_output(model(zero_in), output_fn, who="linearize").flatten(1).gather(1, idx)
    result = Linearized(weight, offset, output, idx, resolved, point.detach())
    _warn_on_residual(result, recorder)
    return result


def _leaf(output: torch.Tensor) -> torch.Tensor:
    return output.detach().clone().requires_grad_(True)


def _resolved(recorder: GateRecorder, mode: str) -> Mode:
    found = recorder.mode
    if mode == "exact" and found == "gated-linear":
        raise ValueError(f"mode='exact' needs a piecewise-linear network, but {recorder.gated_sites()[:5]} hold smooth "
                         "gates (smooth units, norms, softmax or attention); use mode='gated-linear' or 'auto'")
    return "gated-linear" if mode == "gated-linear" else found


def _jacobian_rows(out: torch.Tensor, point: torch.Tensor, idx: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Rows of ``∂out/∂point`` for the outputs ``idx`` ``(B, K)``: ``(B, K, *point.shape[1:])``, batched VJPs."""
    batch, n_out = out.shape
    k = idx.shape[1]
    chunk = k if chunk_size is None else max(1, chunk_size)
    rows = []
    for start in range(0, k, chunk):
        part = idx[:, start : start + chunk]  # (B, k')
        cot = torch.zeros(part.shape[1], batch, n_out, dtype=out.dtype, device=out.device)
        cot.scatter_(2, part.T[:, :, None], 1.0)
        rows.append(batched_vjp(out, point, cot, retain=start + chunk < k))
    return torch.cat(rows).movedim(0, 1).detach()


def _warn_on_residual(result: Linearized, recorder: GateRecorder) -> None:
    worst = float(result.residual().max()) if result.output.numel() else 0.0
    if worst > RESIDUAL_WARNING.get(result.output.dtype, 1e-3):
        warnings.warn(
            f"linearize: W·x + b misses F(x) by {worst:.2e} (relative). The network computes something no recorded "
            "gate describes: a product of two input-dependent tensors, a custom autograd Function, an operator "
            "without a gate rule, or data-dependent control flow.",
            stacklevel=3,
        )


def frozen_gate_forward(model: nn.Module, x: torch.Tensor, z: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """``model`` applied to ``z`` with every gate frozen at its value for ``x`` (the affine piece of ``F`` at x)."""
    recorder = GateRecorder(model, gated=gated)
    with eval_mode(model), torch.inference_mode(False), torch.no_grad():
        with recorder.record():
            model(x)
        with recorder.replay():
            return model(z)
