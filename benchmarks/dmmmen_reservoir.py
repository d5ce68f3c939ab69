"""DMM-MEN reservoir fill time: seconds to stream N training examples into ``DMMMEN.train_batch``.

The reservoir keeps at most ``max_examples`` inputs (Vitter's algorithm R). Filling it used to copy the whole pool
per example (quadratic in the stream length: 20,000 MNIST-sized examples into ``max_examples=20000`` took minutes);
it is now a growing preallocated buffer with vectorised insertion per batch, linear in the stream length.
Measured on the 2-core development machine (one thread, other jobs running): 20,000 examples of 784 features into
``max_examples=20000``: 1,096 s before (447 s on a quiet machine, issue 13), 0.35 s after; 5,000: 14.4 s before,
0.07 s after.

    python benchmarks/dmmmen_reservoir.py                          # 20,000 examples of 784 features, batch 64
    python benchmarks/dmmmen_reservoir.py --n 5000 --max-examples 1000
    python benchmarks/dmmmen_reservoir.py --module /tmp/old_callback.py   # time another version of the callback
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch


def load_dmmmen(path: str | None):
    """The DMMMEN class of this package, or of a callback module file at ``path`` (e.g. an older version)."""
    if path is None:
        from lightning_xai import DMMMEN

        return DMMMEN
    spec = importlib.util.spec_from_file_location("dmmmen_callback_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DMMMEN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="examples streamed")
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--max-examples", type=int, default=None, help="reservoir size (default: --n)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--module", default=None, help="a callback.py file to load DMMMEN from instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_examples = args.max_examples or args.n
    dmm = load_dmmmen(args.module)(target_class=1, max_examples=max_examples, progress=False)
    x = torch.rand(args.n, 1, args.features)
    y = torch.randint(0, 10, (args.n,))
    started = time.perf_counter()
    for i in range(0, args.n, args.batch_size):
        dmm.train_batch(None, None, (x[i : i + args.batch_size], y[i : i + args.batch_size]))
    seconds = time.perf_counter() - started
    pool = getattr(dmm, "pool", None)
    kept = (pool if pool is not None else dmm._pool).shape[0]  # older versions kept a private _pool
    print(f"{args.n} examples of {args.features} features, batch {args.batch_size}, max_examples={max_examples}: "
          f"{seconds:.2f} s ({args.n / seconds:,.0f} examples/s), {kept} kept")


if __name__ == "__main__":
    main()
