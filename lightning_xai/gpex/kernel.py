"""Kernel-mapping networks and the finite-rank kernel they define for GPEX.

GPEX (Akbarnejad, Bigras & Ray, arXiv:2112.09820) explains a network g with L scalar outputs by L Gaussian
processes whose kernels are deep and *finite-rank*: for head ℓ, ``k_ℓ(x, x') = f_ℓ(x)ᵀ f_ℓ(x')`` where
``f(x) ∈ R^{L×D}`` comes from a separate kernel-mapping network. Each head's D features are L2-normalised,
multiplied by ``scale`` and passed through LeakyReLU(0.01): without the normalisation training is unstable, and
without the final non-linearity the last two linear layers would collapse into one (paper, supplement §S5).

This module provides

* :class:`HeadNorm`, the per-head normalise × scale → LeakyReLU ending shared by every kernel map;
* :class:`KernelMap`, any backbone followed by a linear layer to ``L·D`` features and :class:`HeadNorm`;
* :func:`default_kernel_net`, a small CNN for ``(C, H, W)`` inputs of at least 16×16 pixels or an MLP for anything
  else;
* :class:`FeatureLinearKernel`, a gpytorch kernel on the features (heads as the kernel's batch dimension) that
  returns low-rank linear operators, for dense reference computations and for expressing the surrogate's
  posterior with gpytorch abstractions.

Any ``nn.Module`` mapping ``(B, *input_shape)`` to ``(B, L, D)`` can replace the default kernel map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gpytorch
import torch
from linear_operator.operators import LinearOperator, LowRankRootLinearOperator, MatmulLinearOperator
from torch import nn
from torch.nn import functional as F

__all__ = ["FeatureLinearKernel", "HeadNorm", "KernelMap", "default_kernel_net", "heads_first"]

LEAKY_SLOPE = 0.01
_MIN_CNN_SIDE = 16


class HeadNorm(nn.Module):
    """Reshape ``(B, L·D)`` to ``(B, L, D)``, L2-normalise each head's features, multiply by ``scale``, LeakyReLU.

    Args:
        heads: Number of output heads L (one GP each).
        dim: Features per head D.
        scale: Norm of each head's features before the LeakyReLU (the paper's code uses 0.1).
    """

    def __init__(self, heads: int, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.heads, self.dim, self.scale = int(heads), int(dim), float(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(z.shape[0], self.heads, self.dim)
        return F.leaky_relu(F.normalize(z, dim=-1) * self.scale, LEAKY_SLOPE)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, scale={self.scale}"


class KernelMap(nn.Module):
    """A kernel-mapping network f: ``backbone → Linear(width, L·D) → HeadNorm``, returning ``(B, L, D)``.

    Args:
        backbone: Maps ``(B, *input_shape)`` to ``(B, width)``.
        width: Output width of the backbone.
        heads: Number of output heads L.
        dim: Features per head D (20 in the paper).
        scale: Feature norm per head; with the surrogate's default noise ``σ² = scale²`` only the ratio
            ``σ²/scale²`` moves the posterior mean.

    Attributes:
        heads, dim, scale: As given; the surrogate reads them to size its cache and default noise.
    """

    def __init__(self, backbone: nn.Module, width: int, heads: int, dim: int = 20, scale: float = 1.0) -> None:
        super().__init__()
        self.heads, self.dim, self.scale = int(heads), int(dim), float(scale)
        self.backbone = backbone
        self.head = nn.Linear(int(width), self.heads * self.dim)
        self.norm = HeadNorm(self.heads, self.dim, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(self.backbone(x)))


def _cnn_backbone(input_shape: tuple[int, ...], width: int, hidden: int) -> tuple[nn.Module, int]:
    channels, height, wide = input_shape
    stages = min(4, max(1, int(math.log2(max(1, min(height, wide)))) - 2))
    layers: list[nn.Module] = []
    c_in = channels
    for stage in range(stages):
        c_out = width * 2**stage
        layers += [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        ]
        c_in = c_out
    pooled = 4 if min(height, wide) >= 4 * 2**stages else 1
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(c_in * pooled * pooled, hidden), nn.ReLU()]
    return nn.Sequential(*layers), hidden


def _mlp_backbone(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()), hidden


def default_kernel_net(
    input_shape: Sequence[int],
    heads: int,
    dim: int = 20,
    scale: float = 1.0,
    width: int = 32,
    hidden: int = 256,
    backbone: str = "auto",
) -> KernelMap:
    """A small default kernel map for the inputs of the explained network.

    ``(C, H, W)`` inputs of at least 16×16 pixels get a CNN: 1–4 stages of (3×3 conv, ReLU, stride-2 3×3 conv, ReLU)
    with ``width·2^i`` channels (stages ≈ log2(min(H, W)) − 2), an adaptive average pool to 4×4 (1×1 for tiny maps),
    and a ``hidden``-wide linear layer. Smaller images and any other shape are flattened into a two-layer MLP of
    width ``hidden``: on 8×8 digits it is several times cheaper per step than the one-stage CNN, which is why it is
    the default there (``backbone`` overrides the choice). No normalisation layers: f is trained on mixed inputs and
    evaluated on clean ones, and BatchNorm statistics would differ between the two. Both end in
    ``Linear(hidden, L·D)`` and :class:`HeadNorm`.

    Args:
        input_shape: Shape of one input without the batch dimension.
        heads: Number of output heads L of the explained network.
        dim: Features per head D (the paper uses 20).
        scale: Per-head feature norm; the paper's code uses 0.1 with σ² = 1 (see :class:`~lightning_xai.gpex.
            surrogate.GPEXSurrogate`).
        width: Channels of the first CNN stage.
        hidden: Width of the last hidden layer (of both MLP layers).
        backbone: ``"cnn"``, ``"mlp"``, or ``"auto"``: the CNN for ``(C, H, W)`` inputs with ``min(H, W) >= 16``,
            the MLP otherwise.
    """
    shape = tuple(int(s) for s in input_shape)
    if backbone not in ("auto", "cnn", "mlp"):
        raise ValueError(f"backbone={backbone!r} must be 'auto', 'cnn' or 'mlp'")
    if backbone == "auto":
        backbone = "cnn" if len(shape) == 3 and min(shape[1:]) >= _MIN_CNN_SIDE else "mlp"
    if backbone == "cnn":
        if len(shape) != 3:
            raise ValueError(f"backbone='cnn' needs (C, H, W) inputs, got {shape}")
        net, out = _cnn_backbone(shape, int(width), int(hidden))
    else:
        net, out = _mlp_backbone(shape, int(hidden))
    return KernelMap(net, out, heads=heads, dim=dim, scale=scale)


def heads_first(u: torch.Tensor) -> torch.Tensor:
    """``(B, L, D)`` features → ``(L, B, D)``, the layout gpytorch kernels with ``batch_shape = (L,)`` expect."""
    return u.transpose(0, 1)


class FeatureLinearKernel(gpytorch.kernels.Kernel):
    """The finite-rank kernel ``k_ℓ(x, x') = f_ℓ(x)ᵀ f_ℓ(x')`` on precomputed features, one kernel per head.

    Inputs are features laid out heads-first, ``(L, N, D)`` (see :func:`heads_first`); the kernel has
    ``batch_shape = (L,)`` and no hyper-parameters (the feature net carries all of them). Calling it returns a
    lazily evaluated ``(L, N, N')`` operator; ``.evaluate_kernel()`` gives a
    :class:`~linear_operator.operators.LowRankRootLinearOperator` ``UUᵀ`` when both arguments are the same tensor
    (so ``+ σ²I`` becomes a Woodbury-solvable ``LowRankRootAddedDiagLinearOperator``), else a
    :class:`~linear_operator.operators.MatmulLinearOperator`.

    Args:
        heads: Number of heads L (the batch size of the kernel).

    Example::

        k = FeatureLinearKernel(heads=10)
        K = k(heads_first(U)).evaluate_kernel()          # (L, M, M), rank D
        solve = K.add_diagonal(torch.tensor(noise)).solve(V.T.unsqueeze(-1))
    """

    has_lengthscale = False

    def __init__(self, heads: int) -> None:
        super().__init__(batch_shape=torch.Size([int(heads)]))

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> torch.Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError("FeatureLinearKernel does not support last_dim_is_batch")
        if diag:
            return (x1 * x2).sum(-1)
        if x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2)):
            return LowRankRootLinearOperator(x1)
        return MatmulLinearOperator(x1, x2.transpose(-2, -1))
