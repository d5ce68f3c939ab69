"""DMM-MEN: a Dirichlet mixture of linear regressions with multiple elastic nets as a surrogate of a network's output
(Guo et al., NeurIPS 2018, arXiv:1811.03422), fitted by a batched blocked Gibbs sampler in plain torch."""

from lightning_xai.dmmmen.features import FeatureSelector, class_logit, logit_target
from lightning_xai.dmmmen.model import DMMMENSurrogate
from lightning_xai.dmmmen.outputs import Components, Explanation

__all__ = [
    "Components",
    "DMMMENSurrogate",
    "Explanation",
    "FeatureSelector",
    "class_logit",
    "logit_target",
]
