"""Epoch time of a Lightning fit of torchvision ResNet-18, MobileNetV3-small and a small ViT, bare and with each
explainer callback (default arguments), as ratios to the bare fit.

Issue 17, item 6: on ResNet-18 with 10,000 training examples of 3×32×32 (batch 64) each callback should add at most
1.5× to the epoch time of a bare fit, and all five together at most 3×. The data are uniform noise with random labels
of 10 classes (N for training, N/10 for validation), the networks are randomly initialised (no download; the
torchvision ViT's zero-initialised head gets small random weights, or its outputs would be constant) and wrapped in
the package's :class:`~lightning_xai.models.ClassifierModule` (cross-entropy, Adam). Every fit logs to TensorBoard in a
temporary folder, as the main job does, so the callbacks draw their figures as they would for a user.

Per fit it prints:

* ``s/epoch``: the mean wall time of a training epoch *including its validation* and every callback's work there (from
  the first callback's ``on_train_epoch_start`` to the last callback's ``on_train_epoch_end``);
* ``fit s``: the whole ``trainer.fit`` (set-up and end-of-training work too, e.g. DMM-MEN's final refit, which
  happens once at ``on_train_end`` with its default ``every_n_epochs=5``);
* the ratios of both to the bare fit of the same model, the seconds an epoch gains (``+ s/epoch``: a callback's
  report at validation costs about the same whatever N, its per-step work grows with N, so small-N ratios overstate
  the large-N ones), and the peak resident memory of the process during the fit (and the peak CUDA memory
  allocated, on a GPU). Every fit runs in this one process, so a fit's RSS peak includes what earlier fits left
  allocated (the allocator keeps freed pages); ``benchmarks/memory.py`` measures each configuration in a fresh
  process.

Insens refuses networks that are not piecewise-linear (MobileNetV3's Hardswish, the ViT's GELU/softmax/LayerNorm) at
``setup``; its row then reads ``refused: <message>``, and "all five" leaves it out there (as the main job's default
set does), saying so. Any other error is printed in one line and the run goes on.

torchvision/timm come from ``.vendor/`` exactly as in the tests (``tests/_vision.py``): never install the CUDA-built
torchvision wheel into the main environment (it breaks ``import lightning``). Run::

    python benchmarks/real_models.py                              # all models and callbacks, N = 10,000, 1 epoch
    python benchmarks/real_models.py --models resnet18 --n 2000 --epochs 2
    python benchmarks/real_models.py --callbacks none gpex all --threads 1

On a shared machine wall times swing with other tenants' load (on 2 busy cores a bare ResNet-18 epoch read 5× its
CPU time): there use ``--clock cpu --threads 1`` (this process's CPU time, an idle machine's wall time) and
``--bare-twice`` to see the drift, and compare ratios measured back to back, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization
from lightning_xai.models import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))
from _rss import reset_peak_rss  # noqa: E402

SHAPE = (3, 32, 32)
CLASSES = 10
BATCH = 64

# callbacks alone, by name, as each is constructed with default arguments (DMM-MEN without its progress bar)
CALLBACKS: dict[str, Callable[[], L.Callback]] = {
    "gpex": GPEX,
    "cladec": ClaDec,
    "linearization": Linearization,
    "insens": Insens,
    "dmmmen": lambda: DMMMEN(progress=False),
}
CHOICES = ["none", *CALLBACKS, "all"]
# wall time (what a user waits), or this process's CPU time summed over its threads (steadier on a shared machine,
# where other tenants' load stretches wall time; with one thread it is an idle machine's wall time)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class VendorMissing(RuntimeError):
    """torchvision could not be imported from ``.vendor`` (see ``tests/_vision.py``)."""


def torchvision_models():
    """``torchvision.models`` loaded from ``.vendor`` as the tests do; :class:`VendorMissing` when not installed."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import _vision

    try:
        return _vision.torchvision_models()
    except BaseException as error:  # pytest.skip raises a BaseException (Skipped) outside pytest
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise VendorMissing(f"torchvision is not importable: {error}. Install it outside the main environment: "
                            "pip install --no-deps --target .vendor torchvision timm (see .ci/run)") from None


def small_vit(models) -> nn.Module:
    """A 4-layer torchvision VisionTransformer for 32×32 images (8×8 patches of 4 pixels), head re-initialised."""
    vit = models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
                                   mlp_dim=128, num_classes=CLASSES)
    nn.init.trunc_normal_(vit.heads.head.weight, std=0.02)  # torchvision zero-initialises it: constant outputs
    return vit


MODELS: dict[str, Callable[[object], nn.Module]] = {
    "resnet18": lambda models: models.resnet18(weights=None, num_classes=CLASSES),
    "mobilenet_v3_small": lambda models: models.mobilenet_v3_small(weights=None, num_classes=CLASSES),
    "vit": small_vit,
}


class Classifier(ClassifierModule):
    """A torchvision network as a Lightning classifier (the package's loss, accuracy logging and Adam)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(num_classes=CLASSES)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(name: str, seed: int = 0) -> Classifier:
    """The named network (one of :data:`MODELS`), randomly initialised with ``seed``."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {sorted(MODELS)}")
    models = torchvision_models()
    torch.manual_seed(seed)
    return Classifier(MODELS[name](models))


def loaders(n: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Uniform-noise 3×32×32 images with random labels: ``n`` to train on (shuffled), ``max(n // 10, BATCH)`` to
    validate on, batches of :data:`BATCH`."""
    n_val = max(n // 10, BATCH)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n + n_val, *SHAPE, generator=g), torch.randint(0, CLASSES, (n + n_val,), generator=g)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return train, DataLoader(TensorDataset(x[n:], y[n:]), batch_size=BATCH)


class EpochMark(L.Callback):
    """Records the clock at each training epoch's start (``role="start"``, place it first) or end (``role="stop"``,
    place it last; in Lightning 2 validation runs before ``on_train_epoch_end``, so an epoch includes it)."""

    def __init__(self, role: str, times: list[float], sync: bool, clock: Callable[[], float] = time.perf_counter):
        self.role, self.times, self.sync, self.clock = role, times, sync, clock

    def _mark(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(self.clock())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.role == "start":
            self._mark()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.role == "stop":
            self._mark()


@dataclass
class FitResult:
    """What one fit measured (``error`` set instead when it failed; ``refused`` when Insens refused at setup)."""

    epochs: list[float] = field(default_factory=list)
    fit: float = float("nan")
    rss_mib: float | None = None
    gpu_mib: float | None = None
    note: str = ""
    error: str | None = None
    refused: str | None = None

    @property
    def epoch(self) -> float:
        return sum(self.epochs) / len(self.epochs) if self.epochs else float("nan")


def make_callbacks(selection: str, net: nn.Module) -> tuple[list[L.Callback], str]:
    """The callbacks of ``selection`` (a name of :data:`CHOICES`) and a note; "all" leaves Insens out when it
    cannot apply to ``net`` (the main job's default set does the same)."""
    if selection == "none":
        return [], ""
    if selection != "all":
        return [CALLBACKS[selection]()], ""
    names = list(CALLBACKS)
    reason = Insens.inapplicable_reason(net)
    if reason is not None:
        names.remove("insens")
    return [CALLBACKS[name]() for name in names], ("Insens left out" if reason is not None else "")


def fit(model_name: str, selection: str, n: int, epochs: int, device: str = "cpu", seed: int = 0,
        clock: str = "wall") -> FitResult:
    """One fit of ``model_name`` with the callbacks of ``selection`` on ``device`` ("cpu" or "cuda"), timed with
    ``clock`` (a name of :data:`CLOCKS`)."""
    read = CLOCKS[clock]
    L.seed_everything(seed, verbose=False)
    model = build_model(model_name, seed)
    callbacks, note = make_callbacks(selection, model)
    times_start: list[float] = []
    times_stop: list[float] = []
    cuda = device == "cuda"
    marks_first = EpochMark("start", times_start, cuda, read)
    marks_last = EpochMark("stop", times_stop, cuda, read)
    train, val = loaders(n, seed)
    result = FitResult(note=note)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="gpu" if cuda else "cpu", devices=1, default_root_dir=tmp,
            logger=TensorBoardLogger(tmp, name="run"), callbacks=[marks_first, *callbacks, marks_last],
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            num_sanity_val_steps=0,
        )  # fmt: skip
        start = read()
        try:
            trainer.fit(model, train, val)
        except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and goes on
            reason = Insens.inapplicable_reason(model) if selection == "insens" else None
            message = " ".join(str(error).split())
            if reason is not None:
                result.refused = message
            else:
                result.error = f"{type(error).__name__}: {message}"
            return result
        if cuda:
            torch.cuda.synchronize()
        result.fit = read() - start
    result.epochs = [stop - begin for begin, stop in zip(times_start, times_stop)]
    if rss_reset:
        result.rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        result.gpu_mib = torch.cuda.max_memory_allocated() / 2**20
    return result


def _label(selection: str) -> str:
    return {"none": "bare", "none again": "bare, again", "all": "all five"}.get(selection, selection)


def _mib(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "n/a"


def warm_up(model_name: str, device: str = "cpu", steps: int = 2) -> None:
    """A few training steps of a throwaway copy of the model on one batch, so that one-off costs (kernel selection,
    allocator growth, lazy initialisation) are not charged to whichever fit runs first: the bare one."""
    net = build_model(model_name).net.to(device)
    optimiser = torch.optim.Adam(net.parameters())
    x = torch.rand(BATCH, *SHAPE, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    for _ in range(steps):
        nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
        optimiser.zero_grad()
    with torch.no_grad():
        net.eval()(x)


def _fit_or_error(model_name: str, selection: str, n: int, epochs: int, device: str, clock: str) -> FitResult:
    try:
        return fit(model_name, selection, n, epochs, device, clock=clock)
    except VendorMissing:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a model that fails to build
        return FitResult(error=f"{type(error).__name__}: {' '.join(str(error).split())}")


def table(models: list[str], selections: list[str], n: int, epochs: int, device: str = "cpu",
          echo: Callable[[str], None] = print, clock: str = "wall",
          bare_twice: bool = False) -> dict[tuple[str, str], FitResult]:
    """Fit every model with every selection (the bare fit first: the ratios' denominator) and print a markdown
    table row per fit as it finishes; returns the results by (model, selection). ``bare_twice`` fits the bare
    model again after the callbacks and prints that row too (the load of a shared machine drifts: the two bare rows
    show by how much; the ratios are to the first)."""
    gpu = device == "cuda"
    echo("| model | callbacks | s/epoch | × bare | + s/epoch | fit s | × bare | peak RSS MiB |"
         + (" peak GPU MiB |" if gpu else ""))
    echo("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
    results: dict[tuple[str, str], FitResult] = {}
    for model_name in models:
        try:
            warm_up(model_name, device)
        except VendorMissing:
            raise
        except Exception:  # noqa: BLE001 - the fits below report the error
            pass
        order = ["none", *[s for s in selections if s != "none"]]
        for selection in order:
            result = _fit_or_error(model_name, selection, n, epochs, device, clock)
            results[model_name, selection] = result
            if selection not in selections:  # the bare fit was only needed as the denominator
                continue
            echo(_row(model_name, selection, result, results.get((model_name, "none")), gpu))
        if bare_twice:
            again = _fit_or_error(model_name, "none", n, epochs, device, clock)
            results[model_name, "none again"] = again
            echo(_row(model_name, "none again", again, results.get((model_name, "none")), gpu))
    return results


def _row(model_name: str, selection: str, result: FitResult, bare: FitResult | None, gpu: bool) -> str:
    """One markdown row: times and ratios, or the refusal / error in one cell."""
    label = _label(selection) + (f" ({result.note})" if result.note else "")
    if result.refused is not None or result.error is not None:
        text = f"refused: {result.refused}" if result.refused is not None else f"error: {result.error}"
        return f"| {model_name} | {label} | {text} |" + " |" * (6 + gpu)
    ok = bare is not None and bare.error is None and bare.refused is None
    epoch_ratio = f"{result.epoch / bare.epoch:.2f}" if ok else "n/a"
    extra = f"{result.epoch - bare.epoch:+.2f}" if ok else "n/a"
    fit_ratio = f"{result.fit / bare.fit:.2f}" if ok else "n/a"
    row = (f"| {model_name} | {label} | {result.epoch:.2f} | {epoch_ratio} | {extra} | {result.fit:.2f} | {fit_ratio} "
           f"| {_mib(result.rss_mib)} |")
    return row + (f" {_mib(result.gpu_mib)} |" if gpu else "")


def quiet() -> None:
    """Silence Lightning's info lines and the callbacks' warnings (the table is the output)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "lightning_xai"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parser() -> argparse.ArgumentParser:
    """Command-line options shared with ``device_check.py``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--callbacks", nargs="+", choices=CHOICES, default=CHOICES,
                   help="'none' is the bare fit (always run: the denominator); 'all' is all five together")
    p.add_argument("--n", type=int, default=10_000, help="training examples (validation: n/10, at least 64)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine; CPU device only)")
    p.add_argument("--bare-twice", action="store_true",
                   help="fit the bare model again after the callbacks (shows the machine's drift)")
    return p


def main() -> None:
    p = parser()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu does not see the GPU's work: use --clock wall with --device cuda")
    torch.set_num_threads(args.threads)
    quiet()
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s), N = {args.n} training "
          f"examples of 3×32×32 (+{max(args.n // 10, BATCH)} validation), batch {BATCH}, {args.epochs} epoch(s), "
          f"{args.clock} clock\n")
    try:
        table(args.models, args.callbacks, args.n, args.epochs, args.device, clock=args.clock,
              bare_twice=args.bare_twice)
    except VendorMissing as error:
        print(f"cannot run: {error}")
        sys.exit(1)


if __name__ == "__main__":
    main()
