"""Faithfulness of attributions as torchmetrics ``Metric``s, accumulated over validation batches.

Each metric wraps one function of :mod:`lightning_xai.metrics.functional`. ``update`` scores a batch; ``compute``
returns the mean over every example seen since the last ``reset``. The states are sums and counts (plus one maximum),
so torchmetrics' cross-rank reduction under DDP is exact: ``compute`` on every rank returns the mean over all ranks'
examples, just as if one process had seen them all.

The perturbation metrics take the model in ``update`` (unusual for torchmetrics, but the model is what they probe);
it is used for that call only and never stored.

Example::

    deletion = DeletionAUC(steps=20)
    for x, y in val_loader:
        deletion.update(model, x, attribution(model, x, y), y)
    deletion.compute()   # mean area under the deletion curves (lower is better)
    deletion.curve()     # mean deletion curve, (steps + 1,)
"""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics import Metric

from lightning_xai.metrics.functional import (
    Baseline,
    Model,
    _auc,
    _check_curve_args,
    completeness_residual,
    infidelity,
    perturbation_curve,
)

__all__ = ["CompletenessResidual", "DeletionAUC", "Infidelity", "InsertionAUC"]


class _PerturbationAUC(Metric):
    """Mean area under deletion or insertion curves; the states are the summed curve and the example count."""

    full_state_update = False
    is_differentiable = False
    _mode: Literal["deletion", "insertion"]

    curve_sum: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        steps: int = 20,
        baseline: Baseline = 0.0,
        blur: float | None = None,
        score: Literal["prob", "logit"] = "prob",
        batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_curve_args(steps, baseline, blur, score, batch_size)
        self.steps, self.baseline, self.blur, self.score, self.batch_size = steps, baseline, blur, score, batch_size
        self.add_state("curve_sum", torch.zeros(steps + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, model: Model, x: torch.Tensor, attribution: torch.Tensor, target: int | torch.Tensor) -> None:
        """Add the curves of one batch (arguments as in :func:`.functional.perturbation_curve`)."""
        curves = perturbation_curve(
            model,
            x,
            attribution,
            target,
            mode=self._mode,
            steps=self.steps,
            baseline=self.baseline,
            blur=self.blur,
            score=self.score,
            batch_size=self.batch_size,
        )
        self.curve_sum += curves.detach().sum(dim=0).to(self.curve_sum)
        self.count += curves.shape[0]

    def compute(self) -> torch.Tensor:
        """Mean area under the curves (float32; NaN before any update).

        The area is linear in the curve, so this is both the area under the mean curve and the mean of the areas.
        """
        return _auc(self.curve_sum / self.count).float()

    def curve(self) -> torch.Tensor:
        """The mean curve (steps + 1,) in float32, synchronised across ranks like ``compute``.

        Point ``k`` is the mean score after moving the fraction ``k/steps`` of the input units.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return (self.curve_sum / self.count).float()


class DeletionAUC(_PerturbationAUC):
    """Mean area under the deletion curves of Petsiuk et al. (RISE, BMVC 2018); lower is more faithful.

    The top-attributed input units (pixels of (B, C, H, W) images, elements otherwise) of each example are replaced by
    the baseline in ``steps`` equal fractions while the softmax probability (or logit) of the target is recorded; see
    :func:`~lightning_xai.metrics.functional.perturbation_curve`.

    Args:
        steps: the curves have ``steps + 1`` points, at the fractions ``0, 1/steps, ..., 1``.
        baseline: a number, a tensor broadcasting to the inputs, or ``"blur"`` (a Gaussian-blurred copy of the image).
        blur: Gaussian sigma in pixels for ``baseline="blur"``.
        score: ``"prob"`` (softmax probability of the target, the RISE choice) or ``"logit"``.
        batch_size: most perturbed inputs per forward pass (``None``: all ``(steps + 1)·B`` at once).
        kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better = False
    _mode = "deletion"


class InsertionAUC(_PerturbationAUC):
    """Mean area under the insertion curves of Petsiuk et al. (RISE, BMVC 2018); higher is more faithful.

    Starting from the baseline, the top-attributed input units of each example are put back in ``steps`` equal
    fractions; RISE uses ``baseline="blur"``. Arguments as in :class:`DeletionAUC`.
    """

    higher_is_better = True
    _mode = "insertion"


class CompletenessResidual(Metric):
    """Mean relative completeness residual ``|Σφ − (f(x) − f(x₀))| / |f(x) − f(x₀)|``; lower is better, 0 is exact.

    ``compute()`` returns the mean over the examples, a scalar (so ``LightningModule.log`` can take the metric object);
    :meth:`compute_max` returns the worst example, kept in a state reduced with ``max`` across ranks. See
    :func:`~lightning_xai.metrics.functional.completeness_residual`.

    Args:
        eps: floor of the denominator.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    residual_sum: torch.Tensor
    count: torch.Tensor
    residual_max: torch.Tensor

    def __init__(self, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(**kwargs)
        if not eps > 0:
            raise ValueError(f"eps={eps!r} is not valid; expected a positive number")
        self.eps = eps
        self.add_state("residual_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("residual_max", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, attribution: torch.Tensor, output: torch.Tensor, baseline_output: torch.Tensor) -> None:
        """Add the residuals of one batch: attribution (B, ...), output (B,), baseline_output (B,) or a scalar."""
        residual = completeness_residual(attribution, output, baseline_output, eps=self.eps).detach()
        residual = residual.to(self.residual_sum)
        self.residual_sum += residual.sum()
        self.count += residual.numel()
        if residual.numel():
            self.residual_max = torch.maximum(self.residual_max, residual.max())

    def compute(self) -> torch.Tensor:
        """Mean residual over the examples (float32; NaN before any update)."""
        return (self.residual_sum / self.count).float()

    def compute_max(self) -> torch.Tensor:
        """Largest residual of any example (float32; 0 before any update), synchronised across ranks."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return self.residual_max.float().clone()


class Infidelity(Metric):
    """Mean infidelity of Yeh et al. (NeurIPS 2019) under Gaussian perturbations; lower is better.

    ``E_I[(Iᵀφ − (f(x) − f(x − I)))²]`` with ``f`` the target's logit; ``φ`` should be gradient-like (for a
    linearization ``W(x)·x + b(x)``, pass ``W(x)``). See :func:`~lightning_xai.metrics.functional.infidelity`.

    The noise comes from a private generator seeded with ``seed`` (created on the inputs' device at the first update)
    and reseeded on every ``reset``: each epoch then perturbs the same validation batches with the same noise, so
    changes from one epoch to the next come from the model and the attributions, not from the draws. With
    ``seed=None`` the global generator is used.

    Args:
        n_perturb: noise draws per example.
        noise_std: standard deviation of the Gaussian perturbation.
        normalize: rescale ``φ`` per example by the paper's optimal ``β`` (Captum's ``normalize``).
        seed: seed of the private noise generator, or ``None`` for the global one.
        batch_size: most perturbed inputs per forward pass (``None``: all ``n_perturb·B`` at once).
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    infidelity_sum: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        n_perturb: int = 10,
        noise_std: float = 0.1,
        normalize: bool = False,
        seed: int | None = 0,
        batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(n_perturb, bool) or not isinstance(n_perturb, int) or n_perturb < 1:
            raise ValueError(f"n_perturb={n_perturb!r} is not valid; expected a positive integer")
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std > 0:
            raise ValueError(f"noise_std={noise_std!r} is not valid; expected a positive number")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size={batch_size!r} is not valid; expected a positive integer or None")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not valid; expected an integer or None")
        self.n_perturb, self.noise_std, self.normalize, self.seed = n_perturb, noise_std, normalize, seed
        self.batch_size = batch_size
        self._generator: torch.Generator | None = None
        self.add_state("infidelity_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def update(self, model: Model, x: torch.Tensor, attribution: torch.Tensor, target: int | torch.Tensor) -> None:
        """Add the infidelities of one batch (arguments as in :func:`~lightning_xai.metrics.functional.infidelity`)."""
        values = infidelity(
            model,
            x,
            attribution,
            target,
            n_perturb=self.n_perturb,
            noise_std=self.noise_std,
            generator=self._noise_generator(x.device),
            normalize=self.normalize,
            batch_size=self.batch_size,
        ).detach()
        self.infidelity_sum += values.sum().to(self.infidelity_sum)
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        """Mean infidelity over the examples (float32; NaN before any update)."""
        return (self.infidelity_sum / self.count).float()

    def reset(self) -> None:
        """Clear the states and restart the noise stream from ``seed``."""
        super().reset()
        self._generator = None
