"""Epoch time of ``trainer.fit`` with ClaDec attached versus the same fit without it (digits, SmallCNN).

Fits alternate (bare, ClaDec, bare, ClaDec, ...) in one process after a warm-up, each from the same seed, and the
script prints the per-epoch median times and their ratio. Run on a quiet machine:

    python benchmarks/cladec_overhead.py --epochs 5 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from lightning_xai import ClaDec
from lightning_xai.data import DigitsDataModule
from lightning_xai.models import SmallCNN


class EpochTimer(L.Callback):
    """Wall time of each training epoch, validation included."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self._start)


def fit(callbacks: list, epochs: int, tensorboard_dir: str | None) -> list[float]:
    L.seed_everything(0, verbose=False)
    timer = EpochTimer()
    logger = L.pytorch.loggers.TensorBoardLogger(tensorboard_dir) if tensorboard_dir else False
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[*callbacks, timer], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    return timer.times[1:]  # the first epoch carries one-off costs (decoder build, lazy imports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tensorboard", default="/tmp/lightning_xai_bench", help="log dir ('' for no logger)")
    parser.add_argument("--every-n-steps", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {} if args.every_n_steps is None else {"every_n_steps": args.every_n_steps}
    fit([], 2, None)  # warm-up
    bare, cladec = [], []
    for _ in range(args.repeats):
        bare += fit([], args.epochs, args.tensorboard)
        cladec += fit([ClaDec(**kwargs)], args.epochs, args.tensorboard)
    b, c = statistics.median(bare), statistics.median(cladec)
    print(f"torch threads: {torch.get_num_threads()}, epochs per fit: {args.epochs}, repeats: {args.repeats}")
    print(f"median epoch time  bare: {b * 1e3:.1f} ms   with ClaDec: {c * 1e3:.1f} ms   ratio: {c / b:.2f}x")


if __name__ == "__main__":
    main()
