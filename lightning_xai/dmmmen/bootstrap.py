"""The paper's three bootstrap fidelity tests: do the surrogate's top features matter to the network?

Guo et al. (NeurIPS 2018) check a global surrogate's feature importances on the explained network itself, by the
**positive classification rate** (PCR: the fraction of inputs the network assigns to the explained class) after
editing the top-N features of a component against N random features, over bootstrap resamples:

* **nullification** (in-class inputs, the features set to the baseline): a lower PCR than with random features means
  the surrogate found what the network relies on;
* **filling** (other-class inputs, the features copied from a reference in-class input): a higher PCR than random;
* **new cases** (noise inputs, the features copied from the reference): a higher PCR than random.

The authors' code scales the copied values (−0.5×, 5×, 3× the reference) for MNIST-style pixels; here the edits are
plain substitutions (baseline value, reference value), which keep the inputs inside the data range for any
standardisation, and the reference is the in-class input the network scores highest. Integer inputs (token ids) are
edited alike (the baseline id, the reference's ids) and the new cases are random ids drawn uniformly from the
``noise`` range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_xai._core.outputs import OutputFn
from lightning_xai.dmmmen.network import network_logits


@dataclass
class BootstrapResult:
    """Mean PCR over the bootstrap repeats for the top features and for random ones, per test."""

    nullification_top: float
    nullification_random: float
    filling_top: float
    filling_random: float
    new_cases_top: float
    new_cases_random: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def positive_rate(
    model: nn.Module, x: torch.Tensor, target: int, batch_size: int = 512, output_fn: OutputFn | None = None
) -> float:
    """Fraction of ``x`` the model classifies as ``target`` (eval mode, no gradients)."""
    if x.shape[0] == 0:
        return 0.0
    logits = network_logits(model, x, output_fn, batch_size)
    return int((logits.argmax(-1) == target).sum()) / x.shape[0]


def noise_inputs(like: torch.Tensor, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inputs shaped and typed like ``like``: uniform in ``[low, high)``, or uniform integers in ``[low, high]`` for
    integer inputs (token ids)."""
    if like.is_floating_point():
        fresh = low + (high - low) * torch.rand(like.shape, generator=generator)
    else:
        fresh = torch.randint(int(low), int(high) + 1, like.shape, generator=generator)
    return fresh.to(device=like.device, dtype=like.dtype)


def _edit(x: torch.Tensor, features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Copies of ``x`` with the flat ``features`` set to ``values`` (a scalar or one value per feature)."""
    flat = x.reshape(x.shape[0], -1).clone()
    flat[:, features] = values
    return flat.view_as(x)


def bootstrap_tests(
    model: nn.Module,
    target: int,
    top_features: torch.Tensor,
    in_class: torch.Tensor,
    other_class: torch.Tensor,
    *,
    baseline: float = 0.0,
    repeats: int = 10,
    fraction: float = 0.3,
    noise: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
) -> BootstrapResult:
    """Run the three tests for the flat input features ``top_features`` against as many random features.

    Args:
        model: the explained classifier.
        target: the explained class.
        top_features: flat indices into one input (the N most important features of a component).
        in_class: inputs of the explained class (n₁, *shape); the reference is the one scored highest.
        other_class: inputs of other classes (n₂, *shape).
        baseline: value written by nullification (0 is the background of [0, 1] images, the mean of standardised
            features).
        repeats: bootstrap repeats; each resamples ``fraction`` of the inputs with replacement.
        fraction: resample size as a fraction of the inputs.
        noise: ``(low, high)`` of the uniform noise inputs of the new-cases test, in the data's range (for integer
            inputs, the range of the random ids, inclusive).
        generator: random source (resamples, random features, noise).
        output_fn: callable ``model output -> logits (B, K)`` for models that return a dict, tuple or object.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must lie in (0, 1]")
    n_features = in_class[0].numel()
    k = top_features.numel()
    device = in_class.device
    scores = network_logits(model, in_class, output_fn).softmax(-1)[:, target]
    reference = in_class[int(scores.argmax())].reshape(-1)
    totals = {key: 0.0 for key in BootstrapResult.__dataclass_fields__}
    for _ in range(repeats):
        random_features = torch.randperm(n_features, generator=generator)[:k].to(device)
        pick_in = torch.randint(len(in_class), (max(1, int(fraction * len(in_class))),), generator=generator)
        pick_out = torch.randint(len(other_class), (max(1, int(fraction * len(other_class))),), generator=generator)
        ins, outs = in_class[pick_in.to(device)], other_class[pick_out.to(device)]
        fresh = noise_inputs(ins, *noise, generator)
        for label, features in (("top", top_features.to(device)), ("random", random_features)):
            edits = {
                "nullification": _edit(ins, features, baseline),
                "filling": _edit(outs, features, reference[features]),
                "new_cases": _edit(fresh, features, reference[features]),
            }
            for test, edited in edits.items():
                totals[f"{test}_{label}"] += positive_rate(model, edited, target, output_fn=output_fn)
    return BootstrapResult(**{key: value / repeats for key, value in totals.items()})
