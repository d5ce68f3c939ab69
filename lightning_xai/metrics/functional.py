"""Faithfulness of attributions as plain functions on tensors (the functional twins of :mod:`.faithfulness`).

Every function is batched: one call scores a whole batch of examples, and the perturbed inputs of all examples (and
all steps or noise draws) go through the model in a few stacked forward passes, chunked by ``batch_size``.

* :func:`perturbation_curve`, :func:`deletion_auc`, :func:`insertion_auc`: deletion and insertion curves of Petsiuk
  et al., "RISE: Randomized Input Sampling for Explanation of Black-box Models" (BMVC 2018).
* :func:`completeness_residual`: how far an attribution is from summing to the change of the output (the
  "completeness" / "summation-to-delta" property; for an instance-wise linearization ``F(x) = W(x)·x + b(x)`` with
  attribution ``W(x) ⊙ x`` it compares ``Σ W ⊙ x`` with ``F(x) − b(x)``).
* :func:`infidelity`: Yeh et al., "On the (In)fidelity and Sensitivity of Explanations" (NeurIPS 2019).

Models are run in eval mode (every submodule's own mode is restored afterwards) and without gradients.

Non-finite attributions: an example whose attribution holds NaN/Inf has no ranking of its features, so
:func:`perturbation_curve`, :func:`deletion_auc` and :func:`insertion_auc` return NaN for that example (its whole
curve) rather than a number computed from an arbitrary order; the other examples are scored as usual. Callers
average with ``nanmean`` or count the NaN rows; :func:`nonfinite_rows` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn

from lightning_xai._core.modules import eval_mode

__all__ = [
    "completeness_residual",
    "deletion_auc",
    "gaussian_blur",
    "infidelity",
    "insertion_auc",
    "nonfinite_rows",
    "perturbation_curve",
]

Model = Callable[[torch.Tensor], torch.Tensor]
Baseline = float | torch.Tensor | Literal["blur"]

_MODES = ("deletion", "insertion")
_SCORES = ("prob", "logit")


# --------------------------------------------------------------------------------------------------------- helpers
def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name}={value!r} is not valid; expected a positive integer{' or None' if allow_none else ''}"
        )


def _check_curve_args(steps: int, baseline: Baseline, blur_sigma: float | None, score: str, batch_size: int | None):
    """Validate the arguments shared by the perturbation-curve functions and metrics (raises ``ValueError``)."""
    _positive_int("steps", steps)
    _positive_int("batch_size", batch_size, allow_none=True)
    _choice("score", score, _SCORES)
    if isinstance(baseline, str):
        _choice("baseline", baseline, ("blur",))
    elif not isinstance(baseline, (int, float, torch.Tensor)) or isinstance(baseline, bool):
        raise ValueError(f"baseline={baseline!r} is not valid; expected a number, a tensor or 'blur'")
    if blur_sigma is not None:
        if not isinstance(baseline, str):
            raise ValueError(f"blur={blur_sigma!r} is only used with baseline='blur' (got baseline={baseline!r})")
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0:
            raise ValueError(f"blur={blur_sigma!r} is not valid; expected a positive Gaussian sigma (pixels) or None")


def _targets(target: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(target, device=device)
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target has shape {tuple(t.shape)}; expected ({batch},) or a single class index")
    return t.long()


def _check_inputs(x: torch.Tensor, attribution: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected a batch (B, ...) of at least 2 dimensions")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if attribution.shape != x.shape:
        raise ValueError(f"attribution has shape {tuple(attribution.shape)}; expected the shape of x {tuple(x.shape)}")


def nonfinite_rows(values: torch.Tensor) -> list[int]:
    """Indices of the examples (first dimension) of ``values`` holding any NaN or Inf."""
    if values.dim() == 0 or not values.is_floating_point():
        return []
    return torch.nonzero(~torch.isfinite(values.reshape(values.shape[0], -1)).all(1)).flatten().tolist()


@contextmanager
def _inference(model: Model) -> Iterator[None]:
    """No gradients, and the model (if it is a module) in eval mode with every submodule's mode restored after."""
    with torch.no_grad(), eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        yield


def _target_scores(model: Model, inputs: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """``model(inputs)`` reduced to one score per row: the softmax probability or the logit of ``target``."""
    out = model(inputs)
    if out.dim() != 2 or out.shape[0] != inputs.shape[0]:
        raise ValueError(f"model output has shape {tuple(out.shape)}; expected logits (N, classes) for N={len(inputs)}")
    if score == "prob":
        out = out.softmax(dim=1)
    return out.gather(1, target.unsqueeze(1)).squeeze(1)


def _chunks(n: int, batch_size: int | None) -> Iterator[slice]:
    size = n if batch_size is None else batch_size
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under curves sampled at the equally spaced fractions 0, 1/steps, ..., 1 (last dimension)."""
    steps = curve.shape[-1] - 1
    return torch.trapezoid(curve, dx=1.0 / steps, dim=-1)


# ------------------------------------------------------------------------------------------------------------- blur
def gaussian_blur(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A Gaussian-blurred copy of a batch of images, each channel on its own (a depthwise, separable ``conv2d``).

    Args:
        x: images (B, C, H, W).
        sigma: standard deviation of the Gaussian in pixels; ``None`` picks ``max(1, max(H, W) / 8)``. The kernel
            spans ±3 sigma (clipped to the image) and the borders are padded by replication, so a constant image stays
            constant.

    Returns:
        The blurred images, same shape and dtype as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur needs images (B, C, H, W); got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if sigma is None:
        sigma = max(1.0, max(height, width) / 8)
    channels = x.shape[1]
    out = x
    for dim, size in ((2, height), (3, width)):
        radius = min(math.ceil(3 * sigma), size - 1)
        if radius == 0:
            continue
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1, 1) if dim == 2 else (kernel / kernel.sum()).view(1, 1, 1, -1)
        pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
        out = nn.functional.pad(out, pad, mode="replicate")
        out = nn.functional.conv2d(out, kernel.expand(channels, 1, *kernel.shape[2:]).contiguous(), groups=channels)
    return out


# ---------------------------------------------------------------------------------------------- perturbation curves
def _baseline_tensor(x: torch.Tensor, baseline: Baseline, blur_sigma: float | None) -> torch.Tensor:
    if isinstance(baseline, str):
        return gaussian_blur(x, blur_sigma)
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError:
            raise ValueError(
                f"baseline has shape {tuple(baseline.shape)}, which does not broadcast to x's shape {tuple(x.shape)}"
            ) from None
    return torch.full_like(x, float(baseline))


def perturbation_curve(
    model: Model,
    x: torch.Tensor,
    attribution: torch.Tensor,
    target: int | torch.Tensor,
    *,
    mode: Literal["deletion", "insertion"] = "deletion",
    steps: int = 20,
    baseline: Baseline = 0.0,
    blur: float | None = None,
    score: Literal["prob", "logit"] = "prob",
    batch_size: int | None = None,
) -> torch.Tensor:
    """The deletion or insertion curve of each example (Petsiuk et al., RISE, BMVC 2018).

    The input features of each example are ranked by attribution, largest first (ties keep their flattened index
    order). For images ``x`` of shape (B, C, H, W) the unit is the pixel: pixels are ranked by the sum over channels of
    the attribution and move with all their channels. Any other shape (B, ...) is ranked element by element.

    * ``mode="deletion"`` starts from ``x`` and replaces the top-ranked units by the baseline;
    * ``mode="insertion"`` starts from the baseline and puts back the top-ranked units of ``x``;

    at the fractions ``0, 1/steps, ..., 1`` of the units (step ``k`` moves ``round(k·n/steps)`` of the ``n`` units).
    A faithful attribution makes the deletion curve fall fast (low area) and the insertion curve rise fast (high area).

    All ``(steps + 1)·B`` perturbed inputs go through the model in stacked forward passes of at most ``batch_size``
    rows (all at once when ``None``), in eval mode and without gradients.

    Args:
        model: maps a batch of inputs to logits (N, classes), e.g. an ``nn.Module``.
        x: the inputs (B, ...), on the model's device.
        attribution: one score per input feature, same shape as ``x``.
        target: the class scored for each example, (B,) integers or one class index for all.
        mode: ``"deletion"`` or ``"insertion"``.
        steps: number of equal fractions the units are moved in; the curve has ``steps + 1`` points.
        baseline: what replaces ``x`` where it is removed: a number, a tensor that broadcasts to ``x`` (e.g. one
            image (C, H, W), or per-example baselines (B, C, H, W)), or ``"blur"`` for a Gaussian-blurred copy of
            ``x`` (images only; the usual choice for insertion).
        blur: Gaussian sigma in pixels for ``baseline="blur"`` (``None``: see :func:`gaussian_blur`).
        score: what is recorded at each step: ``"prob"``, the softmax probability of ``target`` (as in RISE), or
            ``"logit"``, its logit.
        batch_size: most rows per forward pass; ``None`` runs them all in one.

    Returns:
        The curves (B, steps + 1): column ``k`` is the score after moving the fraction ``k/steps`` of the units, so
        deletion curves start at the score of ``x`` and end at the score of the baseline, insertion curves the reverse.
        The curve of an example whose attribution holds NaN/Inf is all NaN (it ranks nothing).

    Raises:
        ValueError: on an unknown ``mode``/``score``/``baseline``, non-positive ``steps``/``batch_size``, or shapes
            that do not match.
    """
    _choice("mode", mode, _MODES)
    _check_curve_args(steps, baseline, blur, score, batch_size)
    _check_inputs(x, attribution)
    if isinstance(baseline, str) and x.dim() != 4:
        raise ValueError(f"baseline='blur' needs images (B, C, H, W); x has shape {tuple(x.shape)}")
    batch = x.shape[0]
    targets = _targets(target, batch, x.device)
    base = _baseline_tensor(x, baseline, blur)

    images = x.dim() == 4
    unit_scores = attribution.sum(dim=1) if images else attribution
    unit_scores = unit_scores.reshape(batch, -1)
    unranked = ~torch.isfinite(unit_scores).all(1)
    unit_scores = torch.where(torch.isfinite(unit_scores), unit_scores, torch.zeros_like(unit_scores))
    n_units = unit_scores.shape[1]
    order = torch.argsort(unit_scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_units, device=x.device).expand(batch, -1))
    k = torch.arange(steps + 1, device=x.device)
    moved = torch.div(2 * k * n_units + steps, 2 * steps, rounding_mode="floor")  # round(k·n/steps), half up

    # row i of the stacked evaluation is step i // B of example i % B
    start, end = (x, base) if mode == "deletion" else (base, x)
    unit_shape = (x.shape[0], 1, *x.shape[2:]) if images else x.shape
    scores = []
    with _inference(model):
        for rows in _chunks((steps + 1) * batch, batch_size):
            idx = torch.arange(rows.start, rows.stop, device=x.device)
            step, example = idx // batch, idx % batch
            mask = (rank[example] < moved[step].unsqueeze(1)).view(len(idx), *unit_shape[1:])
            inputs = torch.where(mask, end[example], start[example])
            scores.append(_target_scores(model, inputs, targets[example], score))
    curves = torch.cat(scores).view(steps + 1, batch).transpose(0, 1).contiguous()
    return curves.masked_fill(unranked.unsqueeze(1), float("nan"))


def deletion_auc(
    model: Model,
    x: torch.Tensor,
    attribution: torch.Tensor,
    target: int | torch.Tensor,
    *,
    steps: int = 20,
    baseline: Baseline = 0.0,
    blur: float | None = None,
    score: Literal["prob", "logit"] = "prob",
    batch_size: int | None = None,
) -> torch.Tensor:
    """Area under each example's deletion curve over [0, 1] (trapezoidal rule); lower is more faithful.

    Arguments as in :func:`perturbation_curve`. Returns a (B,) tensor; NaN for an example whose attribution holds
    NaN/Inf (see :func:`nonfinite_rows`), never a finite-looking number from an arbitrary ranking.
    """
    curve = perturbation_curve(
        model,
        x,
        attribution,
        target,
        mode="deletion",
        steps=steps,
        baseline=baseline,
        blur=blur,
        score=score,
        batch_size=batch_size,
    )
    return _auc(curve)


def insertion_auc(
    model: Model,
    x: torch.Tensor,
    attribution: torch.Tensor,
    target: int | torch.Tensor,
    *,
    steps: int = 20,
    baseline: Baseline = 0.0,
    blur: float | None = None,
    score: Literal["prob", "logit"] = "prob",
    batch_size: int | None = None,
) -> torch.Tensor:
    """Area under each example's insertion curve over [0, 1] (trapezoidal rule); higher is more faithful.

    Arguments as in :func:`perturbation_curve` (``baseline="blur"`` is the RISE choice for insertion). Returns (B,);
    NaN for an example whose attribution holds NaN/Inf.
    """
    curve = perturbation_curve(
        model,
        x,
        attribution,
        target,
        mode="insertion",
        steps=steps,
        baseline=baseline,
        blur=blur,
        score=score,
        batch_size=batch_size,
    )
    return _auc(curve)


# ----------------------------------------------------------------------------------------------------- completeness
def completeness_residual(
    attribution: torch.Tensor, output: torch.Tensor, baseline_output: torch.Tensor, *, eps: float = 1e-12
) -> torch.Tensor:
    """Relative violation of completeness, per example.

    ``residual = |Σ attribution − (output − baseline_output)| / max(|output − baseline_output|, eps)``.

    An attribution is complete ("sums to delta") when its entries add up to the change of the explained output
    between the baseline and the input. For an instance-wise linearization ``F(x) = W(x)·x + b(x)`` pass
    ``attribution = W(x) ⊙ x`` (of the target row of ``W``), ``output = F(x)`` and ``baseline_output = b(x)``.

    Args:
        attribution: (B, ...), summed over every dimension but the first.
        output: the explained output of each example, (B,) (or any shape with B elements).
        baseline_output: the output at the baseline, same number of elements as ``output``, or a scalar.
        eps: floor of the denominator, so a zero delta does not divide by zero.

    Returns:
        The residuals (B,), non-negative; 0 for a complete attribution.
    """
    if attribution.dim() < 1:
        raise ValueError("attribution must have a batch dimension (B, ...)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} is not valid; expected a positive number")
    batch = attribution.shape[0]
    output = torch.as_tensor(output, device=attribution.device)
    baseline_output = torch.as_tensor(baseline_output, device=attribution.device)
    if output.numel() != batch:
        raise ValueError(f"output has shape {tuple(output.shape)}; expected ({batch},), one value per example")
    if baseline_output.numel() not in (1, batch):
        raise ValueError(f"baseline_output has shape {tuple(baseline_output.shape)}; expected ({batch},) or a scalar")
    total = attribution.reshape(batch, -1).sum(dim=1)
    delta = output.reshape(batch) - baseline_output.reshape(-1)
    return (total - delta).abs() / delta.abs().clamp_min(eps)


# -------------------------------------------------------------------------------------------------------- infidelity
def infidelity(
    model: Model,
    x: torch.Tensor,
    attribution: torch.Tensor,
    target: int | torch.Tensor,
    *,
    n_perturb: int = 10,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Infidelity of Yeh et al. (NeurIPS 2019) with Gaussian perturbations, one value per example.

    ``INFD(φ, f, x) = E_I[(Iᵀφ − (f(x) − f(x − I)))²]`` with ``I ~ N(0, noise_std² · Id)`` and ``f`` the **logit** of
    ``target`` (not its probability), estimated with ``n_perturb`` draws per example. ``Iᵀφ`` predicts the output
    change from the attribution, so ``φ`` should be gradient-like (a sensitivity per feature): for a linear model
    ``f(x) = w·x`` and ``φ = w`` the infidelity is exactly 0. For a linearization ``F(x) = W(x)·x + b(x)``, pass
    ``W(x)`` (its target row), not ``W(x) ⊙ x``.

    With ``normalize=True`` the attribution is first rescaled, per example, by the optimal ``β = E[Iᵀφ·Δ] / E[(Iᵀφ)²]``
    of the paper (``Δ = f(x) − f(x − I)``; ``β = 0`` when every ``Iᵀφ`` is 0), as Captum's ``normalize`` flag does,
    which makes the value insensitive to the scale of ``φ``.

    All ``n_perturb·B`` perturbed inputs go through the model in stacked forward passes of at most ``batch_size`` rows,
    in eval mode and without gradients. The noise is drawn once up front, so the result does not depend on
    ``batch_size``.

    Args:
        model: maps a batch of inputs to logits (N, classes).
        x: the inputs (B, ...), floating point, on the model's device.
        attribution: same shape as ``x``.
        target: the class explained for each example, (B,) integers or one class index for all.
        n_perturb: number of noise draws per example.
        noise_std: standard deviation of the Gaussian perturbation.
        generator: draws the noise (reproducible when seeded); it may live on the CPU or on ``x``'s device.
            ``None`` uses the global generator.
        normalize: rescale ``φ`` by the optimal ``β`` first.
        batch_size: most rows per forward pass; ``None`` runs them all in one.

    Returns:
        The infidelities (B,), non-negative.
    """
    _positive_int("n_perturb", n_perturb)
    _positive_int("batch_size", batch_size, allow_none=True)
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std > 0:
        raise ValueError(f"noise_std={noise_std!r} is not valid; expected a positive number")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r} is not valid; expected a torch.Generator or None")
    _check_inputs(x, attribution)
    batch = x.shape[0]
    targets = _targets(target, batch, x.device)

    noise_device = generator.device if generator is not None else x.device
    noise = torch.randn((n_perturb, *x.shape), generator=generator, device=noise_device, dtype=x.dtype)
    noise = noise.to(x.device).mul_(noise_std).flatten(0, 1)  # row i: draw i // B of example i % B
    example = torch.arange(batch, device=x.device).repeat(n_perturb)
    predicted = (noise * attribution[example]).reshape(len(example), -1).sum(dim=1).view(n_perturb, batch)

    with _inference(model):
        clean = _target_scores(model, x, targets, "logit")
        perturbed = torch.cat(
            [
                _target_scores(model, x[example[rows]] - noise[rows], targets[example[rows]], "logit")
                for rows in _chunks(n_perturb * batch, batch_size)
            ]
        ).view(n_perturb, batch)
    delta = clean.unsqueeze(0) - perturbed

    if normalize:
        numerator = (predicted * delta).mean(dim=0)
        denominator = predicted.square().mean(dim=0)
        beta = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
        predicted = beta * predicted
    return (predicted - delta).square().mean(dim=0)
