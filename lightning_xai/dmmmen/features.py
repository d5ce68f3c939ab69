"""Inputs and response of the DMM-MEN surrogate: a reduced feature set and the logit of the explained class.

The sampler's cost grows with p³ (one Cholesky per component and sweep), so the paper keeps the 300 highest-variance
of Fashion-MNIST's 784 pixels and maps coefficients back to the image afterwards: :class:`FeatureSelector` does both
directions. The response is the logit of the explained class's probability, ``log p − log(1 − p)``
(:func:`logit_target`, clipped so certain predictions stay finite; :func:`class_logit` gets it straight from the
network's logits without ever forming ``p``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def logit_target(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """The paper's response ``y = log p − log(1 − p)``, with ``p`` clipped to ``[eps, 1 − eps]``."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    p = torch.as_tensor(probs).clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def class_logit(logits: Tensor, target: int, eps: float = 1e-6) -> Tensor:
    """``log p_c − log(1 − p_c)`` of softmax class ``target`` from raw logits (n, C), clipped like :func:`logit_target`.

    Equals ``logits[:, c] − logsumexp(logits[:, others])``, which is exact where ``p_c`` rounds to 1.
    """
    if logits.dim() != 2 or not 0 <= target < logits.shape[1]:
        raise ValueError(f"need logits (n, C) and 0 <= target < C, got shape {tuple(logits.shape)} and {target!r}")
    others = torch.cat([logits[:, :target], logits[:, target + 1 :]], dim=1)
    if others.shape[1] == 0:
        raise ValueError("class_logit needs at least two classes")
    bound = float(torch.logit(torch.tensor(1 - eps, dtype=torch.float64)))
    return (logits[:, target] - torch.logsumexp(others, dim=1)).clamp(-bound, bound)


class FeatureSelector:
    """Keep ``k`` input features (the highest-variance ones, or given indices) and map results back to input space.

    Args:
        k: number of features kept by :meth:`fit` (ignored when ``indices`` is given).
        indices: explicit flat feature indices to keep instead.

    Example::

        selector = FeatureSelector(k=300).fit(images)       # images (n, 1, 28, 28)
        x = selector.transform(images)                      # (n, 300)
        maps = selector.scatter(surrogate.components.coefficients)   # (J, 1, 28, 28), zeros elsewhere
    """

    def __init__(self, k: int = 300, indices: Sequence[int] | Tensor | None = None) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.indices: Tensor | None = None
        self.input_shape: tuple[int, ...] | None = None
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
            if idx.numel() == 0 or bool((idx < 0).any()) or idx.unique().numel() != idx.numel():
                raise ValueError(f"indices must be distinct non-negative ints, got {indices!r}")
            self.indices, self.k = idx, idx.numel()

    def fit(self, x: Tensor) -> FeatureSelector:
        """Record the input shape (one example) and, unless indices were given, pick the k highest-variance features."""
        flat = x.reshape(x.shape[0], -1)
        self.input_shape = tuple(x.shape[1:])
        if self.indices is not None:
            if int(self.indices.max()) >= flat.shape[1]:
                raise ValueError(f"indices go up to {int(self.indices.max())} but inputs have {flat.shape[1]} features")
            return self
        if self.k > flat.shape[1]:
            raise ValueError(f"k={self.k} exceeds the {flat.shape[1]} input features")
        variance = flat.double().var(0)
        self.indices = torch.argsort(-variance, stable=True)[: self.k].sort().values.cpu()
        return self

    def transform(self, x: Tensor) -> Tensor:
        """The kept features of each example, ``(n, *input_shape) → (n, k)``."""
        if self.indices is None:
            raise RuntimeError("FeatureSelector is not fitted: call fit(x) first")
        return x.reshape(x.shape[0], -1)[:, self.indices.to(x.device)]

    def fit_transform(self, x: Tensor) -> Tensor:
        return self.fit(x).transform(x)

    def scatter(self, values: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """Place ``values (…, k)`` at the kept features of a zero tensor ``(…, *shape)`` (default: the input shape)."""
        if self.indices is None:
            raise RuntimeError("FeatureSelector is not fitted: call fit(x) first")
        shape = tuple(shape) if shape is not None else self.input_shape
        if shape is None:
            raise ValueError("scatter needs a shape (the selector was built from indices and never fitted)")
        if values.shape[-1] != self.k:
            raise ValueError(f"values must end in k={self.k} features, got shape {tuple(values.shape)}")
        size = 1
        for s in shape:
            size *= s
        out = values.new_zeros(*values.shape[:-1], size)
        out[..., self.indices.to(values.device)] = values
        return out.reshape(*values.shape[:-1], *shape)

    def state_dict(self) -> dict:
        return {"k": self.k, "indices": self.indices, "input_shape": self.input_shape}

    def load_state_dict(self, state: dict) -> None:
        self.k, self.indices = int(state["k"]), state["indices"]
        self.input_shape = None if state["input_shape"] is None else tuple(state["input_shape"])
