"""Instance-wise linearization (Li et al., arXiv:2310.16295): ``F(x) = W(x)·x + b(x)``, exact per input."""

from lightning_xai.linearization.core import Linearized, frozen_gate_forward, linearize
from lightning_xai.linearization.gates import GateRecorder, classify

__all__ = ["GateRecorder", "Linearized", "classify", "frozen_gate_forward", "linearize"]
