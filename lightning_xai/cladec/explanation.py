"""What :meth:`ClaDec.explain <lightning_xai.cladec.ClaDec.explain>` returns.

The result type lives in its own module so that the parts of ClaDec that produce or consume explanations (the
callback, the probe panels, the post-hoc protocol) share it without importing the callback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
