"""All-class ``W(x)`` for a batch: ``linearize`` versus a per-target gradient loop and ``vmap(jacrev)``.

SmallCNN is trained briefly on digits (3 epochs, seed 0, so that the ReLU and max-pool gates are realistic) and put
in eval mode. For a batch of B validation digits the script times, in interleaved rounds after a warm-up:

(a) ``linearize(model, x)``: all 10 classes from one batched VJP (``is_grads_batched``) plus the frozen-gate zero
    pass for the bias (and its residual check);
(b) a per-target loop, one fresh forward and one backward of ``model(x)[:, c].sum()`` per class c: 10 forwards and
    10 backwards. This mirrors the cost of per-target gradient attribution as Captum's ``Saliency`` runs it
    (``attribute(x, target=c)`` once per class); Captum itself is not used;
(c) ``torch.func.vmap(torch.func.jacrev(f))(x)`` with ``f = lambda xi: model(xi[None])[0]`` (eval-mode BatchNorm
    reads only its running statistics, so functorch handles it).

Before timing it checks that (a), (b) and (c) give the same ``W`` (max abs difference < 1e-5, else exit 1). It then
prints the bytes of ``W`` per example (``K·D·4`` in float32) for digits, MNIST and ImageNet-sized inputs, and the
measured peak-memory increase of one ``linearize`` call on a larger fresh batch: on CPU the growth of the peak RSS
(``ru_maxrss``; tracemalloc does not see torch's CPU allocations), on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/linearization_speed.py --batch 64 --repeats 20 --threads 1
    python benchmarks/linearization_speed.py --device cuda          # when a GPU is available
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import lightning as L
import torch

from lightning_xai.data import DigitsDataModule
from lightning_xai.linearization import linearize
from lightning_xai.models import SmallCNN


def trained_model(epochs: int) -> tuple[SmallCNN, torch.Tensor]:
    """SmallCNN fitted on digits for a few epochs (seed 0), in eval mode, and the validation inputs."""
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule()
    model = SmallCNN()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    dm.setup()
    return model.eval(), dm.val_dataset.tensors[0]


def via_linearize(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linearize(model, x).weight


def via_per_target(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward and one backward per class, as a per-target attribution method (Captum's Saliency) runs them."""
    rows = []
    for c in range(10):
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg)[:, c].sum(), xg)
        rows.append(grad)
    return torch.stack(rows, 1)


def via_vmap_jacrev(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(x)


METHODS = {
    "(a) linearize": via_linearize,
    "(b) per-target loop": via_per_target,
    "(c) vmap(jacrev)": via_vmap_jacrev,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_increase(model: torch.nn.Module, x: torch.Tensor, chunk_size: int | None) -> float:
    """Growth of the process's peak memory during one ``linearize`` call, in bytes (see :data:`MEMORY_HOW`)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        w = linearize(model, x, chunk_size=chunk_size).weight
        torch.cuda.synchronize()
        del w
        return float(torch.cuda.max_memory_allocated() - before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    w = linearize(model, x, chunk_size=chunk_size).weight
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del w
    return (after - before) * 1024.0


MEMORY_HOW = {
    "cpu": "growth of the peak RSS (ru_maxrss), a lower bound: the earlier peak may cover part of the call",
    "cuda": "torch.cuda.max_memory_allocated minus memory_allocated before the call",
}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="validation digits per batch (max 360)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs before timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timed with torch.cuda.synchronize)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock or process CPU time (steadier on a shared CPU machine; not for cuda)")
    parser.add_argument("--mem-batch", type=int, default=4096, help="examples in the peak-memory measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available")
    device = torch.device(args.device)

    model, x_val = trained_model(args.epochs)
    model = model.to(device)
    x = x_val[: args.batch].to(device)
    batch, d = x.shape[0], x[0].numel()

    # the three must agree before their times mean anything
    weights = {name: fn(model, x).detach() for name, fn in METHODS.items()}
    reference = weights["(a) linearize"]
    worst = 0.0
    for name, w in weights.items():
        diff = float((w - reference).abs().max())
        worst = max(worst, diff)
        print(f"{name:22s} W shape {tuple(w.shape)}  max |W - W_linearize| = {diff:.2e}")
    if worst >= 1e-5:
        sys.exit(f"FAIL: the methods disagree on W by {worst:.2e} (>= 1e-5)")

    # memory, on a fresh batch larger than anything seen so far (the validation set tiled)
    reps = -(-args.mem_batch // x_val.shape[0])
    x_mem = x_val.repeat(reps, 1, 1, 1)[: args.mem_batch].to(device)
    # the smaller peak first: ru_maxrss only grows
    grown = {chunk: peak_memory_increase(model, x_mem, chunk) for chunk in (1, None)}

    clock = time.perf_counter if args.clock == "wall" or device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.warmup):
        for fn in METHODS.values():
            fn(model, x)
    for _ in range(args.repeats):
        for name, fn in METHODS.items():
            sync(device)
            start = clock()
            fn(model, x)
            sync(device)
            times[name].append(clock() - start)

    med = {name: statistics.median(t) for name, t in times.items()}
    clock_name = "wall" if clock is time.perf_counter else "cpu"
    print(f"\ndevice {device}, torch threads {torch.get_num_threads()}, batch {batch}, input D = {d}, K = 10 classes, "
          f"median {clock_name} time of {args.repeats} interleaved rounds after {args.warmup} warm-up")
    for name, m in med.items():
        print(f"{name:22s} median {m * 1e3:8.2f} ms   ({m / batch * 1e6:7.1f} us per example)")
    a = med["(a) linearize"]
    print(f"ratio (b)/(a) = {med['(b) per-target loop'] / a:.2f}x   ratio (c)/(a) = {med['(c) vmap(jacrev)'] / a:.2f}x")

    print("\nmemory of W per example (float32, K*D*4 bytes):")
    for label, k, dim in (("digits", 10, d), ("MNIST", 10, 784), ("ImageNet", 1000, 3 * 224 * 224)):
        print(f"  {label:9s} K={k:5d} D={dim:7d}: {k * dim * 4:>13,d} B  ({mib(k * dim * 4)})")
    w_bytes = x_mem.shape[0] * 10 * d * 4
    print(f"measured, one linearize call on {x_mem.shape[0]} fresh digits (W itself is {mib(w_bytes)}): peak increase "
          f"{mib(grown[None])} with all 10 classes in one batched backward, {mib(grown[1])} with chunk_size=1")
    print(f"  ({MEMORY_HOW[device.type]}; the batched backward holds K*B copies of the hidden activations' "
          "gradients, chunk_size bounds K)")


if __name__ == "__main__":
    main()
