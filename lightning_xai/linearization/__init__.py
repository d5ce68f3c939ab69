"""Instance-wise linearization (Li et al., arXiv:2310.16295): ``F(x) = W(x)·x + b(x)``, exact per input."""

from lightning_xai._core.gates import GateRecorder, classify
from lightning_xai.linearization.callback import Linearization
from lightning_xai.linearization.core import Linearized, frozen_gate_forward, linearize

__all__ = ["GateRecorder", "Linearization", "Linearized", "classify", "frozen_gate_forward", "linearize"]
