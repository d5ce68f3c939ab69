"""Peak memory of the main job with every explainer callback attached versus the same run without callbacks.

Each configuration runs `lightning-xai-train` in a fresh child process (so imports and allocator state start
equal) and the script prints the child's peak resident set size (``ru_maxrss`` of the finished child) and wall time.
Callback state that grows with the data is bounded by documented sizes: ClaDec keeps no cache (probe set of
``probe_size`` inputs), Linearization and Insens keep ``probe_size`` + ``metric_size`` validation inputs, DMM-MEN a
reservoir of fixed size. GPEX alone grows with the training set (one cache row per example): the second table gives
its cache's bytes per training-set size, measured from the buffers (digits-shaped: L = 10 heads, D = 20, 1×8×8
float inputs; per rank under DDP, divide M by the number of processes).

    python benchmarks/memory.py --epochs 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "no callbacks": ["callbacks=none"],
    "ClaDec": ["callbacks=[cladec]"],
    "Linearization + Insens": ["callbacks=[linearization,insens]"],
    "GPEX": ["callbacks=[gpex]"],
    "all callbacks (default)": [],
}


# A fresh intermediate interpreter per configuration whose only child is the job: its RUSAGE_CHILDREN peak is
# that job's peak (our own RUSAGE_CHILDREN would report the largest child so far).
PROBE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run(overrides: list[str], epochs: int) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time (s) of one main-job run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lightning_xai.train", *overrides, f"trainer.max_epochs={epochs}",
                   "+trainer.enable_progress_bar=false", f"hydra.run.dir={tmp}/run"]
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, *command], check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - start
    return int(out.stdout.split()[-1]) / 1024, seconds


def gpex_cache_bytes(m: int, heads: int = 10, dim: int = 20, input_shape: tuple[int, ...] = (1, 8, 8)) -> int:
    """Bytes of every buffer of a GPEX inducing cache holding ``m`` examples (inputs stored)."""
    import torch

    from lightning_xai.gpex.cache import InducingCache

    cache = InducingCache(heads, dim, capacity=m, store_inputs=True)
    last = torch.tensor([m - 1])
    cache.write(last, torch.zeros(1, heads, dim), torch.zeros(1, heads), inputs=torch.zeros(1, *input_shape))
    return sum(b.numel() * b.element_size() for b in cache.buffers())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"main job (digits, SmallCNN), {args.epochs} epochs, one child process per configuration")
    for name, overrides in CONFIGS.items():
        peak, seconds = run(overrides, args.epochs)
        print(f"{name:26s} peak RSS {peak:7.1f} MiB   wall {seconds:5.1f} s")
    print("\nGPEX inducing cache vs training-set size M (digits shapes: U, V, G, c, flags, indices, inputs)")
    for m in (1_024, 16_384, 65_536, 262_144):
        total = gpex_cache_bytes(m)
        print(f"M = {m:8,d}   {total / 2**20:8.1f} MiB   {total / m:6.0f} bytes per example")


if __name__ == "__main__":
    main()
