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
    """Time of each training epoch, validation included: wall clock, or this process's CPU time.

    CPU time is the steadier figure on shared virtual machines, where other tenants steal cycles from the wall clock;
    with one torch thread it is also the work done.
    """

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self.clock()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.times.append(self.clock() - self._start)


def fit(
    callbacks: list, epochs: int, tensorboard_dir: str | None, clock=time.perf_counter
) -> tuple[list[float], dict[str, float]]:
    """Fit SmallCNN on digits; return the epoch times after the first and the final logged scalars."""
    L.seed_everything(0, verbose=False)
    timer = EpochTimer(clock)
    logger = L.pytorch.loggers.TensorBoardLogger(tensorboard_dir) if tensorboard_dir else False
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[*callbacks, timer], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return timer.times[1:], metrics  # the first epoch carries one-off costs (decoder build, lazy imports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock or process CPU time")
    parser.add_argument("--tensorboard", default="/tmp/lightning_xai_bench", help="log dir ('' for no logger)")
    parser.add_argument("--every-n-steps", type=int, default=None, help="ClaDec cadence (default: ClaDec's)")
    parser.add_argument("--width", type=int, default=None, help="ClaDec decoder width (default: ClaDec's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {k: v for k, v in (("every_n_steps", args.every_n_steps), ("width", args.width)) if v is not None}
    fit([], 2, None)  # warm-up: imports, allocator, thread pools
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    bare, cladec = [], []
    for _ in range(args.repeats):
        bare += fit([], args.epochs, args.tensorboard, clock)[0]
        times, metrics = fit([ClaDec(**kwargs)], args.epochs, args.tensorboard, clock)
        cladec += times
    b, c = statistics.median(bare), statistics.median(cladec)
    print(f"torch threads: {torch.get_num_threads()}, epochs per fit: {args.epochs}, repeats: {args.repeats}, {kwargs}")
    print(f"median epoch {args.clock} time  bare: {b * 1e3:.1f} ms   with ClaDec: {c * 1e3:.1f} ms   "
          f"ratio: {c / b:.2f}x")
    shown = ("val/acc", "cladec/rec_loss", "refae/rec_loss", "cladec/acc_on_recon", "refae/acc_on_recon")
    print("last fit, final epoch: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics))


if __name__ == "__main__":
    main()
