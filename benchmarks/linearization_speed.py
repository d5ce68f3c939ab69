"""All-class ``W(x)`` for a batch: ``linearize`` versus a per-target gradient loop and ``vmap(jacrev)``.

SmallCNN is trained briefly on digits (3 epochs, seed 0, so that the ReLU and max-pool gates are realistic) and put
in eval mode. For a batch of B validation digits the script times, in interleaved rounds after a warm-up:

(a) ``linearize(model, x)``: all 10 classes from one batched VJP (``is_grads_batched``) plus the frozen-gate zero
    pass for the bias (and its residual check);
(a") ``linearize(model, x, bias="difference")``: the same W, with ``b = F(x) − W·x`` instead of the frozen-gate pass;
(a') for reference, the Jacobian half of (a) alone: one forward and one batched VJP, nothing else;
(b) a per-target loop, one fresh forward and one backward of ``model(x)[:, c].sum()`` per class c: 10 forwards and
    10 backwards. This mirrors the cost of per-target gradient attribution as Captum's ``Saliency`` runs it
    (``attribute(x, target=c)`` once per class); Captum itself is not used;
(c) ``torch.func.vmap(torch.func.jacrev(f))(x)`` with ``f = lambda xi: model(xi[None])[0]`` (eval-mode BatchNorm
    reads only its running statistics, so functorch handles it).

Before timing it checks that (a), (a'), (b) and (c) give the same ``W`` (max abs difference < 1e-5, else exit 1).
It then prints the bytes of ``W`` per example (``K·D·4`` in float32) for digits, MNIST and ImageNet-sized inputs, and
the measured peak-memory increase of one ``linearize`` call on a larger fresh batch: on CPU the peak RSS (``ru_maxrss``,
its high-water mark reset first through ``/proc/self/clear_refs``) minus the RSS before the call, since tracemalloc
does not see torch's CPU allocations; on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/linearization_speed.py --batch 64 --repeats 20 --threads 1
    python benchmarks/linearization_speed.py --device cuda          # when a GPU is available
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from _digits import trained_digits_cnn
from _rss import current_rss, reset_peak_rss

from lightning_xai.linearization import linearize


def via_linearize(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linearize(model, x).weight


def via_linearize_difference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linearize(model, x, bias="difference").weight


def via_batched_vjp(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian half of (a) alone: one forward and one batched VJP, no gate recording, bias pass or check."""
    xg = x.detach().clone().requires_grad_(True)
    out = model(xg)
    cotangents = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)[:, None, :].expand(-1, *out.shape)
    (grads,) = torch.autograd.grad(out, xg, cotangents, is_grads_batched=True)
    return grads.movedim(0, 1)


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
    '(a") linearize, bias=difference': via_linearize_difference,
    "(a') batched VJP only": via_batched_vjp,
    "(b) per-target loop": via_per_target,
    "(c) vmap(jacrev)": via_vmap_jacrev,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_increase(model: torch.nn.Module, x: torch.Tensor, chunk_size: int | None) -> tuple[float, str]:
    """Growth of the process's peak memory during one ``linearize`` call, in bytes, and how it was measured."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        w = linearize(model, x, chunk_size=chunk_size).weight
        torch.cuda.synchronize()
        del w
        return float(torch.cuda.max_memory_allocated() - before), "torch.cuda.max_memory_allocated - allocated before"
    # tracemalloc does not see torch's CPU allocations, so use the kernel's peak RSS (ru_maxrss, KiB on Linux)
    if reset_peak_rss():
        before = current_rss() // 1024
        how = "ru_maxrss after - RSS before, high-water mark reset via /proc/self/clear_refs"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss after - ru_maxrss before: a lower bound (the earlier peak may cover part of the call)"
    w = linearize(model, x, chunk_size=chunk_size).weight
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del w
    return (after - before) * 1024.0, how


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} B"


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

    model, dm = trained_digits_cnn(args.epochs)
    x_val = dm.val_dataset.tensors[0]
    model = model.to(device)
    x = x_val[: args.batch].to(device)
    batch, d = x.shape[0], x[0].numel()

    # the methods must agree before their times mean anything
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
        print(f"{name:32s} median {m * 1e3:8.2f} ms   ({m / batch * 1e6:7.1f} us per example)")
    a, a2 = med["(a) linearize"], med['(a") linearize, bias=difference']
    loop, jac = med["(b) per-target loop"], med["(c) vmap(jacrev)"]
    print(f"ratio (b)/(a) = {loop / a:.2f}x   ratio (b)/(a\") = {loop / a2:.2f}x   "
          f"ratio (c)/(a) = {jac / a:.2f}x   ratio (c)/(a\") = {jac / a2:.2f}x")
    rest = a - med["(a') batched VJP only"]
    print(f"(a') is the Jacobian part of (a); (a) - (a') = {rest * 1e3:.2f} ms is the "
          "gate recording, the frozen-gate bias pass and the residual check")

    print("\nmemory of W per example (float32, K*D*4 bytes):")
    for label, k, dim in (("digits", 10, d), ("MNIST", 10, 784), ("ImageNet", 1000, 3 * 224 * 224)):
        print(f"  {label:9s} K={k:5d} D={dim:7d}: {k * dim * 4:>13,d} B  ({size(k * dim * 4)}); "
              f"a batch of 64: {size(64 * k * dim * 4)}")
    w_bytes = x_mem.shape[0] * 10 * d * 4
    print(f"measured, one linearize call on {x_mem.shape[0]} fresh digits (W itself is {size(w_bytes)}): peak increase "
          f"{size(grown[None][0])} with all 10 classes in one batched backward, {size(grown[1][0])} with chunk_size=1")
    print(f"  ({grown[None][1]}; the batched backward holds K*B copies of the hidden activations' gradients, "
          "chunk_size bounds K)")


if __name__ == "__main__":
    main()
