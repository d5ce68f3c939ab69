"""The package on a CUDA device: the main job, every callback's overhead and peak GPU memory, ``linearize`` on GPU.

Issue 17, item 8. When a CUDA device is present it prints, in order (each section flushed as it ends, so a run cut
short still shows what it finished):

1. **main job**: ``python -m lightning_xai.train trainer=gpu`` with the default config (digits, SmallCNN, the
   default callback set), in a child process with a time limit: exit status, wall time and its last lines;
2. **linearize on GPU**: mode and largest relative residual ``‖W·x + b − F(x)‖/‖F(x)‖`` for torchvision ResNet-18
   (trained-like BatchNorm statistics, float32 and float64: exact), MobileNetV3-small and a small ViT (gated-linear),
   with PyTorch's default TF32 settings and with TF32 off (cuDNN convolutions use TF32 by default on Ampere and
   later, which is accurate to about 1e-3, not 1e-5);
3. **callbacks on a CUDA fit**: the table of ``real_models.py`` (epoch time with each callback alone and all five as
   ratios to the bare fit, peak RSS and peak ``torch.cuda.max_memory_allocated`` per fit).

Without a CUDA device it prints ``no CUDA device: nothing to check`` and exits 0. ``--device cpu`` runs every
section on the CPU instead (a dry run of the code paths; use tiny sizes). Run::

    python benchmarks/device_check.py                                    # on a GPU machine
    python benchmarks/device_check.py --n 2000 --models resnet18 --main-timeout 120
    python benchmarks/device_check.py --device cpu --n 64 --models resnet18 --callbacks none gpex \\
        --main-args trainer.max_epochs=1 data.batch_size=256 'callbacks=[gpex]'   # dry run on the CPU
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402

from lightning_xai import linearize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOUNDS = {torch.float32: 1e-5, torch.float64: 1e-12}


def say(text: str = "") -> None:
    print(text, flush=True)


def main_job(device: str, timeout: float, extra: list[str], tail: int = 12) -> int:
    """Run the main job (default config on ``trainer=gpu`` or ``trainer=cpu``) in a child process; print its exit
    status, wall time and last ``tail`` lines. Returns the exit status (124 on timeout)."""
    trainer = "gpu" if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lightning_xai.train", f"trainer={trainer}", f"hydra.run.dir={tmp}/run",
                   *extra]
        say(f"$ {' '.join(command[1:])}")
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            rc, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as expired:
            rc, output = 124, expired.stdout or ""
            output = output.decode(errors="replace") if isinstance(output, bytes) else output
            output += f"\n(timed out after {timeout:.0f} s)"
        seconds = time.perf_counter() - start
        say(f"exit status {rc}, {seconds:.1f} s wall; last lines:")
        say("```")
        for line in readable_lines(output)[-tail:]:
            say(line[:200])
        say("```")
        scalars = last_scalars(Path(tmp))
        if scalars:
            text = ", ".join(f"{tag} = {value:.4g}" for tag, value in sorted(scalars.items()))
            say("\n".join(textwrap.wrap("last logged scalars: " + text, width=118, break_on_hyphens=False)))
    return rc


def readable_lines(output: str) -> list[str]:
    """The lines of a child's output without progress-bar redraws (each carriage-returned line's last state; the
    DMM-MEN sweep bars dropped, the final "Epoch ..." bar kept: it shows the last metrics)."""
    lines = []
    for raw in output.split("\n"):  # not splitlines(): it also splits at the carriage returns
        line = raw.split("\r")[-1].replace("\x1b[A", "").rstrip()
        if line.strip() and not ("it/s]" in line and not line.startswith("Epoch")):
            lines.append(line)
    return lines


def last_scalars(root: Path) -> dict[str, float]:
    """The last value of every scalar in the TensorBoard event files under ``root`` (empty when there are none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, float] = {}
    for folder in sorted({path.parent for path in root.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            values[tag] = events.Scalars(tag)[-1].value
    return values


def trained_like_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters: a fresh network's identity
    statistics would hide a wrong bias."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=g) * 0.3)
            module.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(channels, generator=g) + 0.5)
                module.bias.data.copy_(torch.randn(channels, generator=g) * 0.3)
    return model


@contextmanager
def tf32(enabled: bool):
    """TF32 for cuDNN convolutions and CUDA matmuls on or off inside the block (previous settings restored)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


LINEARIZE_CASES: dict[str, tuple[str, torch.dtype]] = {
    "resnet18 float32": ("resnet18", torch.float32),
    "resnet18 float64": ("resnet18", torch.float64),
    "mobilenet_v3_small float32": ("mobilenet_v3_small", torch.float32),
    "vit float32": ("vit", torch.float32),
}


def linearize_case(model_name: str, dtype: torch.dtype, device: str, batch: int) -> tuple[str, float, float]:
    """(mode, largest relative residual, seconds) of ``linearize`` for all 10 outputs of a batch of random inputs."""
    net = trained_like_norms(rm.build_model(model_name).net).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, *rm.SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    lin = linearize(net, x)
    residual = float(lin.residual(x).max())
    if device == "cuda":
        torch.cuda.synchronize()
    return lin.mode, residual, time.perf_counter() - start


def linearize_table(device: str, batch: int, cases: list[str]) -> None:
    """Print mode and residual of every case, with PyTorch's default TF32 settings and with TF32 off."""
    defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    say(f"PyTorch defaults here: cudnn.allow_tf32={defaults[0]}, cuda.matmul.allow_tf32={defaults[1]}; "
        f"batch {batch}, all 10 outputs\n")
    say("| network | TF32 | mode | max relative residual | bound | within | s |")
    say("|---|---|---|---:|---:|---|---:|")
    settings: list[tuple[str, Callable]] = [("default", lambda: tf32(defaults[0])), ("off", lambda: tf32(False))]
    for case in cases:
        model_name, dtype = LINEARIZE_CASES[case]
        for label, setting in settings:
            if label == "default" and dtype == torch.float64:
                continue  # TF32 only concerns float32
            try:
                with setting():
                    mode, residual, seconds = linearize_case(model_name, dtype, device, batch)
            except rm.VendorMissing:
                raise
            except Exception as error:  # noqa: BLE001 - report and go on
                say(f"| {case} | {label} | error: {type(error).__name__}: {' '.join(str(error).split())} | | | | |")
                continue
            bound = BOUNDS[dtype]
            say(f"| {case} | {label} | {mode} | {residual:.2e} | {bound:.0e} | {'yes' if residual < bound else 'NO'} "
                f"| {seconds:.2f} |")


def main() -> None:
    p = rm.parser()
    p.description = __doc__
    p.set_defaults(n=10_000)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else print 'no CUDA device: nothing to check'; cpu: a dry run")
    p.add_argument("--main-timeout", type=float, default=300.0, help="seconds before the main job is stopped")
    p.add_argument("--main-args", nargs="*", default=[], help="Hydra overrides for the main job")
    p.add_argument("--linearize-batch", type=int, default=8)
    p.add_argument("--linearize-cases", nargs="+", choices=list(LINEARIZE_CASES), default=list(LINEARIZE_CASES))
    p.add_argument("--skip", nargs="*", choices=["main", "linearize", "callbacks"], default=[])
    args = p.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device is None:
        say("no CUDA device: nothing to check")
        return
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    rm.quiet()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    say(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU thread(s)\n")
    try:
        if "main" not in args.skip:
            say("## main job\n")
            main_job(device, args.main_timeout, args.main_args)
        if "linearize" not in args.skip:
            say("\n## linearize\n")
            linearize_table(device, args.linearize_batch, args.linearize_cases)
        if "callbacks" not in args.skip:
            clock = "wall" if device == "cuda" else args.clock
            say(f"\n## callbacks: N = {args.n} training examples of 3×32×32, batch {rm.BATCH}, {args.epochs} "
                f"epoch(s), {clock} clock\n")
            rm.table(args.models, args.callbacks, args.n, args.epochs, device, echo=say, clock=clock,
                     bare_twice=args.bare_twice)
    except rm.VendorMissing as error:
        say(f"cannot run: {error}")
        sys.exit(1)


if __name__ == "__main__":
    main()
