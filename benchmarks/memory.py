"""Peak memory and checkpoint bytes of a fit with each explainer callback, all five, and none.

Issue 13's acceptance set-up: a 1-epoch fit of SmallCNN on 20,000 synthetic 1×28×28 examples (uniform noise, random
labels of 10 classes; 2,000 more for validation; batch 64), with the callbacks exactly as the main job's Hydra
configs build them (``callbacks=[gpex]`` ...; "all five" is the default set). Each configuration runs in a fresh
child process (imports and allocator state start equal) that prints its own peak resident set size
(``ru_maxrss``) after the fit and after saving a checkpoint, and the bytes of each callback's state in that
checkpoint (``torch.save`` of the callback's ``state_dict``). The acceptance asks for the all-five peak to be at
most 2× the bare fit.

The second table gives GPEX's inducing cache bytes per training-set size M from its buffers (L = 10 heads, D = 20,
1×28×28 float32 inputs stored; per process under DDP, divide M by the number of processes). GPEX's cache is
bounded by ``max_inducing`` (default: the training set's length per process, 65,536 for streams).

    python benchmarks/memory.py                    # every configuration, 20,000 examples
    python benchmarks/memory.py --only none gpex   # a subset (names as in CONFIGS)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "none": "none",
    "gpex": "[gpex]",
    "cladec": "[cladec]",
    "linearization": "[linearization]",
    "insens": "[insens]",
    "dmmmen": "[dmmmen]",
    "all five": "default",
}
SHAPE = (1, 28, 28)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _callbacks(selection: str) -> list:
    """The callbacks the main job builds for ``callbacks=<selection>`` (Hydra configs shipped in the package)."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("lightning_xai.configs", version_base=None):
        cfg = compose("train", overrides=[f"callbacks={selection}"])
    nodes = cfg.get("callbacks") or {}
    nodes = [nodes] if "_target_" in nodes else [n for n in nodes.values() if "_target_" in n]
    return [instantiate(node, _convert_="all") for node in nodes]


def child(selection: str, n: int, epochs: int) -> dict:
    """One fit in this process: peak RSS after the fit and after a checkpoint, and checkpoint bytes per callback."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_xai.models import SmallCNN

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n + n // 10, *SHAPE, generator=g), torch.randint(0, 10, (n + n // 10,), generator=g)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=64)
    callbacks = _callbacks(selection)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=TensorBoardLogger(tmp, name="run"),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(SmallCNN(input_shape=SHAPE), train, val)
        seconds = time.perf_counter() - start
        fit_peak = _peak_mib()
        path = os.path.join(tmp, "last.ckpt")
        trainer.save_checkpoint(path)
        checkpoint_bytes = os.path.getsize(path)
    per_callback = {}
    for cb in callbacks:
        buffer = io.BytesIO()
        torch.save(cb.state_dict(), buffer)
        per_callback[type(cb).__name__] = buffer.tell()
    return {"fit_peak": fit_peak, "peak": _peak_mib(), "seconds": seconds, "checkpoint": checkpoint_bytes,
            "callbacks": per_callback}


def run(name: str, n: int, epochs: int) -> dict:
    """Run one configuration in a fresh child process and return what it printed."""
    command = [sys.executable, __file__, "--child", CONFIGS[name], "--n", str(n), "--epochs", str(epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpex_cache_bytes(m: int, heads: int = 10, dim: int = 20, input_shape: tuple[int, ...] = SHAPE) -> int:
    """Bytes of every buffer of a GPEX inducing cache holding ``m`` examples (inputs stored)."""
    import torch

    from lightning_xai.gpex.cache import InducingCache

    cache = InducingCache(heads, dim, capacity=m, store_inputs=True)
    last = torch.tensor([m - 1])
    cache.write(last, torch.zeros(1, heads, dim), torch.zeros(1, heads), inputs=torch.zeros(1, *input_shape))
    return sum(b.numel() * b.element_size() for b in cache.buffers())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="training examples")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configurations")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.n, args.epochs)))
        return
    print(f"SmallCNN, {args.n:,} synthetic {'x'.join(map(str, SHAPE))} examples, {args.epochs} epoch(s), one child "
          "process per configuration")
    bare = None
    for name in args.only or CONFIGS:
        r = run(name, args.n, args.epochs)
        bare = r["peak"] if name == "none" else bare
        ratio = f"{r['peak'] / bare:4.2f}x bare" if bare else ""
        states = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["callbacks"].items())
        print(f"{name:14s} peak RSS {r['peak']:7.1f} MiB (fit {r['fit_peak']:7.1f}) {ratio:>10s}   "
              f"fit {r['seconds']:6.1f} s   checkpoint {r['checkpoint'] / 2**20:7.1f} MiB   {states}")
    print("\nGPEX inducing cache vs training-set size M (U, V, G, c, flags, indices, keys, 1x28x28 float32 inputs)")
    for m in (1_024, 16_384, 65_536):
        total = gpex_cache_bytes(m)
        print(f"M = {m:8,d}   {total / 2**20:8.1f} MiB   {total / m:6.0f} bytes per example")


if __name__ == "__main__":
    main()
