"""GPEX: explaining a network by Gaussian processes with deep finite-rank kernels (Akbarnejad et al., arXiv:2112.09820).

One GP per output head, every training example an inducing point, the network's own outputs as targets; a kernel
net f is trained so that the GP posterior means match the network, and explanations are the training examples most
similar to a query under the matched kernel.
"""

from lightning_xai.gpex.cache import InducingCache, RowSwap
from lightning_xai.gpex.callback import GPEX, GPEXExplanation, SurrogateFidelity
from lightning_xai.gpex.kernel import FeatureLinearKernel, HeadNorm, KernelMap, default_kernel_net, heads_first
from lightning_xai.gpex.surrogate import GPEXPrediction, GPEXSurrogate, MatchOutput, fidelity

__all__ = [
    "GPEX",
    "FeatureLinearKernel",
    "GPEXExplanation",
    "GPEXPrediction",
    "GPEXSurrogate",
    "HeadNorm",
    "InducingCache",
    "KernelMap",
    "MatchOutput",
    "RowSwap",
    "SurrogateFidelity",
    "default_kernel_net",
    "fidelity",
    "heads_first",
]
