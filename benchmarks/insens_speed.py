"""Insens: the fast scheme (forward-mode row norms + one backward) versus one backward per inactive neuron.

Part 1, digits. SmallCNN is trained briefly on digits (3 epochs, seed 0, so that its gates are realistic), put in
eval mode and converted to float64. For B validation digits the script times, in interleaved rounds after a warm-up,
``insens(model, x)`` (exact row norms: D = 64 forward-mode directions), ``insens(model, x, method="hutchinson",
samples=64)`` and ``insens_naive(model, x)`` (one backward per inactive neuron), and prints the medians, the ratio
naive/fast and max |fast - naive| (must be < 1e-10, else exit 1). It then prints the Hutchinson relative error
||est - exact|| / ||exact|| of the map for 16, 64 and 256 directions.

Part 2, a larger input, where the exact row norms get expensive: their cost grows with D (one directional derivative
per input feature) while Hutchinson's does not. A randomly initialised ReLU CNN on 3x32x32 inputs (D = 3072,
Conv-ReLU-MaxPool x2, Linear-ReLU-Linear; about 25k hidden neurons) in float64, B = 2 random inputs: exact versus
Hutchinson. The naive reference runs once when its estimated time (inactive neurons x the measured time of one
single-neuron backward) is under ``--naive-limit`` seconds, and is skipped otherwise.

    python benchmarks/insens_speed.py --batch 8 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _digits import trained_digits_cnn
from torch import nn

from lightning_xai.insens import insens, insens_naive
from lightning_xai.insens.neurons import capture_preactivations

SAMPLES = (16, 64, 256)


def random_cifar_cnn() -> nn.Module:
    """A randomly initialised ReLU CNN for 3x32x32 inputs (D = 3072), float64, eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    ).double().eval()


def fast_exact(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return insens(model, x).map


def fast_hutchinson(model: nn.Module, x: torch.Tensor, samples: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return insens(model, x, method="hutchinson", samples=samples, generator=generator).map


def naive(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return insens_naive(model, x)


def interleaved_medians(methods: dict, model: nn.Module, x: torch.Tensor, repeats: int, warmup: int,
                        clock) -> dict[str, float]:
    """Median time of each method over ``repeats`` rounds that run every method once, after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(warmup):
        for fn in methods.values():
            fn(model, x)
    for _ in range(repeats):
        for name, fn in methods.items():
            start = clock()
            fn(model, x)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def relative_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float((est - exact).norm() / exact.norm())


def hutchinson_errors(model: nn.Module, x: torch.Tensor, exact: torch.Tensor) -> str:
    return "   ".join(f"m={m}: {relative_error(fast_hutchinson(model, x, m), exact):.3f}" for m in SAMPLES)


def preactivations(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All hidden neurons' pre-activations, flattened per example: ``(B, N)``."""
    with torch.no_grad(), capture_preactivations(model) as pre:
        model(x)
    return torch.cat([v.flatten(1) for v in pre.values()], 1)


def naive_estimate(model: nn.Module, x: torch.Tensor, probes: int = 20) -> tuple[int, float]:
    """Backward passes ``insens_naive`` would run (neurons with v <= 0) and its estimated seconds.

    The estimate is that count times the wall time of one single-neuron backward, measured on ``probes`` of them.
    """
    off = int((preactivations(model, x) <= 0).sum())
    with torch.enable_grad():
        xb = x[:1].detach().clone().requires_grad_(True)
        with capture_preactivations(model) as pre:
            model(xb)
        flat = torch.cat([v.flatten() for v in pre.values()])
        picks = torch.nonzero(flat.detach() <= 0).flatten()[:probes].tolist()
        start = time.perf_counter()
        for i in picks:
            torch.autograd.grad(flat[i], xb, retain_graph=True)
        per_backward = (time.perf_counter() - start) / max(len(picks), 1)
    return off, off * per_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="validation digits (part 1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (part 1)")
    parser.add_argument("--big-repeats", type=int, default=3, help="interleaved timing rounds (part 2)")
    parser.add_argument("--big-batch", type=int, default=2, help="random 3x32x32 inputs (part 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs before timing")
    parser.add_argument("--naive-limit", type=float, default=60.0, help="skip the part-2 naive run above this (s)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock or process CPU time (steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    # part 1: digits
    model, dm = trained_digits_cnn(args.epochs)
    model, x_val = model.double(), dm.val_dataset.tensors[0].double()
    x = x_val[: args.batch]
    exact, slow = fast_exact(model, x), naive(model, x)
    diff = float((exact - slow).abs().max())
    stats, n_neurons = insens(model, x), preactivations(model, x[:1]).shape[1]
    print(f"part 1: digits SmallCNN (trained {args.epochs} epochs), float64, B = {x.shape[0]}, D = {x[0].numel()}, "
          f"{n_neurons} hidden neurons per example, torch threads {torch.get_num_threads()}")
    print(f"inactive neurons per example (v <= 0, ||w|| > 0): {[int(n) for n in stats.inactive]}; left out for "
          f"||w|| = 0: {[int(n) for n in stats.zero_norm]}")
    print(f"max |fast exact - naive| = {diff:.2e}")
    if not diff < 1e-10:
        sys.exit(f"FAIL: insens and insens_naive disagree by {diff:.2e} (>= 1e-10)")
    methods = {"insens exact": fast_exact, "insens hutchinson m=64": fast_hutchinson, "insens_naive": naive}
    med = interleaved_medians(methods, model, x, args.repeats, args.warmup, clock)
    print(f"median {args.clock} time of {args.repeats} interleaved rounds after {args.warmup} warm-up:")
    for name, m in med.items():
        print(f"  {name:24s} {m * 1e3:9.1f} ms")
    print(f"ratio naive / fast exact = {med['insens_naive'] / med['insens exact']:.1f}x   "
          f"naive / hutchinson = {med['insens_naive'] / med['insens hutchinson m=64']:.1f}x")
    print(f"Hutchinson relative error ||est - exact|| / ||exact||:   {hutchinson_errors(model, x, exact)}")

    # part 2: a larger input
    big = random_cifar_cnn()
    generator = torch.Generator().manual_seed(0)
    xb = torch.rand(args.big_batch, 3, 32, 32, dtype=torch.float64, generator=generator)
    big_stats = insens(big, xb)
    n_neurons = preactivations(big, xb[:1]).shape[1]
    print(f"\npart 2: random ReLU CNN on 3x32x32, float64, B = {xb.shape[0]}, D = {xb[0].numel()}, "
          f"{n_neurons} hidden neurons per example")
    print(f"inactive neurons per example (v <= 0, ||w|| > 0): {[int(n) for n in big_stats.inactive]}; left out for "
          f"||w|| = 0: {[int(n) for n in big_stats.zero_norm]}")
    methods = {"insens exact": fast_exact, "insens hutchinson m=64": fast_hutchinson}
    med = interleaved_medians(methods, big, xb, args.big_repeats, args.warmup, clock)
    print(f"median {args.clock} time of {args.big_repeats} interleaved rounds after {args.warmup} warm-up:")
    for name, m in med.items():
        print(f"  {name:24s} {m * 1e3:9.1f} ms")
    print(f"ratio exact / hutchinson = {med['insens exact'] / med['insens hutchinson m=64']:.1f}x")
    off, estimate = naive_estimate(big, xb)
    diff = 0.0
    if estimate > args.naive_limit:
        print(f"insens_naive skipped: {off} backward passes, estimated {estimate:.0f} s > --naive-limit "
              f"{args.naive_limit:.0f} s")
    else:
        start = clock()
        slow = naive(big, xb)
        took = clock() - start
        diff = float((big_stats.map - slow).abs().max())
        print(f"insens_naive, one run: {took * 1e3:.1f} ms ({off} backward passes, estimated {estimate:.1f} s)   "
              f"naive / fast exact = {took / med['insens exact']:.1f}x   "
              f"naive / hutchinson = {took / med['insens hutchinson m=64']:.1f}x")
        print(f"max |fast exact - naive| = {diff:.2e}")
    print(f"Hutchinson relative error ||est - exact|| / ||exact||:   {hutchinson_errors(big, xb, big_stats.map)}")
    if not diff < 1e-10:
        sys.exit(f"FAIL: insens and insens_naive disagree by {diff:.2e} (>= 1e-10)")


if __name__ == "__main__":
    main()
