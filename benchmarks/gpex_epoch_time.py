"""Epoch time of the digits SmallCNN trained bare and co-trained with ``GPEX()``, and GPEX's validation fidelity.

For each seed the bare fit and the fit with GPEX (default arguments) run back to back on one thread, so both timings
share the machine's load of that moment. Per epoch it reports

* ``train``: start of the training epoch → start of validation (GPEX's per-step work and its refit of the whole cache,
  which runs at validation start, are inside), the median over epochs 2..N;
* ``wall``: the whole fit's wall time divided by the epochs (validation and GPEX's report included);

and GPEX's last ``gpex/agreement``, ``gpex/pearson``, ``gpex/r2``. The issue's bars: ratio ≤ 2.5 at agreement ≥ .98
and Pearson ≥ .97. Run::

    python benchmarks/gpex_epoch_time.py --seeds 0 1 2 --epochs 12
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning as L
import torch

from lightning_xai.data import DigitsDataModule
from lightning_xai.gpex import GPEX
from lightning_xai.models import SmallCNN


class EpochTimer(L.Callback):
    """Seconds from the start of each training epoch to the start of its validation (or the epoch's end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def _stop(self) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()


def fit(seed: int, epochs: int, gpex: GPEX | None) -> dict[str, float]:
    """One fit of SmallCNN on digits (GPEX placed before the timer, so its work is timed)."""
    L.seed_everything(seed, verbose=False)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[*([gpex] if gpex else []), timer],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    wall = (time.perf_counter() - start) / epochs
    out = {"train": statistics.median(timer.seconds[1:] or timer.seconds), "wall": wall}
    out.update({k.split("/")[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gpex/")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.epochs} epochs, digits SmallCNN, GPEX()")
    print("seconds per epoch; train = training part of the epoch incl. GPEX's refit, wall = whole fit / epochs\n")
    print("| seed | bare train | GPEX train | ratio | bare wall | GPEX wall | ratio | agreement | pearson | r2 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        bare = fit(seed, args.epochs, None)
        with_gpex = fit(seed, args.epochs, GPEX(seed=seed))
        print(
            f"| {seed} | {bare['train']:.3f} | {with_gpex['train']:.3f} | {with_gpex['train'] / bare['train']:.2f} "
            f"| {bare['wall']:.3f} | {with_gpex['wall']:.3f} | {with_gpex['wall'] / bare['wall']:.2f} "
            f"| {with_gpex['agreement']:.4f} | {with_gpex['pearson']:.4f} | {with_gpex['r2']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
