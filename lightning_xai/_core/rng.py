"""A private random stream for explainers, so they never shift the training run's global RNG.

A callback that draws random numbers from the global generator (weight init, dropout in a copied encoder, a
random probe) changes every later draw of the user's run: shuffling, dropout masks, augmentation. Its presence
would then change the classifier's trajectory. :class:`PrivateRNG` keeps the callback's own generator state and
swaps it in only for the duration of a block, restoring the global state afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PrivateRNG:
    """A seeded random stream, separate from the global one, whose state is checkpointable.

    Example::

        rng = PrivateRNG(seed=0)
        with rng.active(device):
            decoder = build_decoder()   # init draws come from the private stream
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._cpu_state: torch.Tensor | None = None
        self._cuda_state: torch.Tensor | None = None

    @contextmanager
    def active(self, device: torch.device | str | None = None) -> Iterator[None]:
        """Run the block with the private stream as the global generator (CPU, plus ``device`` if it is CUDA)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        cuda = device.type == "cuda"
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            if self._cpu_state is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self._cpu_state)
            if cuda:
                if self._cuda_state is None:
                    torch.cuda.manual_seed(self.seed)
                else:
                    torch.cuda.set_rng_state(self._cuda_state, devices[0])
            try:
                yield
            finally:
                self._cpu_state = torch.get_rng_state()
                if cuda:
                    self._cuda_state = torch.cuda.get_rng_state(devices[0])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "cpu": self._cpu_state, "cuda": self._cuda_state}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._cpu_state = state["cpu"]
        self._cuda_state = state["cuda"]
