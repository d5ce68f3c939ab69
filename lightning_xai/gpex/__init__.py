"""GPEX: explaining a network by Gaussian processes with deep finite-rank kernels (Akbarnejad et al., arXiv:2112.09820).

One GP per output head, every training example an inducing point, the network's own outputs as targets; a kernel
net f is trained so that the GP posterior means match the network, and explanations are the training examples most
similar to a query under the matched kernel.

Modules, one concern each: ``callback`` (the Lightning callback: hooks, stream position, checkpoint state), built
from ``build`` (lazy build and restore), ``fitter`` (the Lightning-free co-training step and refit), ``explained``
(reading the explained module), ``explanation`` (``explain``), ``reporting`` (validation metrics and reports) and
``options`` (argument checks); ``slots`` (slot bookkeeping), ``fidelity`` (the fidelity Metric and function),
``figure`` (the neighbour panel); the GP itself in ``surrogate`` (training f, prediction), ``posterior`` (posterior
types, the matching step's analytic posterior), ``search`` (top-k neighbour search), ``cache`` (the inducing rows),
``gram`` (their Gram sums), ``keys`` (example fingerprints), ``kernel`` (the kernel net) and ``sharding`` (DDP).
"""

from lightning_xai.gpex.cache import InducingCache
from lightning_xai.gpex.callback import GPEX
from lightning_xai.gpex.explanation import GPEXExplanation
from lightning_xai.gpex.fidelity import SurrogateFidelity, fidelity
from lightning_xai.gpex.gram import RowSwap
from lightning_xai.gpex.kernel import FeatureLinearKernel, HeadNorm, KernelMap, default_kernel_net, heads_first
from lightning_xai.gpex.posterior import GPEXPrediction, MatchOutput
from lightning_xai.gpex.surrogate import GPEXSurrogate

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
