"""DMM-MEN sampler speed at the paper's size: milliseconds per Gibbs sweep and the time for 20,000 sweeps.

Synthetic data from a 3-component sparse mixture of linear regressions (n = 7,000, p = 300 pixel-like features in
[0, 1], 30 non-zero coefficients per component, noise sd 0.3), fitted with J = 6 components and K = 3 elastic nets in
float64, as in Guo et al. (NeurIPS 2018): 20,000 sweeps, half burn-in. The script runs ``--warmup`` sweeps (the chain
settles, the Gram matrices stop changing much), then ``--sweeps`` more, timing each one; it prints the median and
quartiles of ms/sweep, the extrapolated time for 20,000 sweeps, where the time goes per step of the sweep, the MH
acceptance rates and how well the mixture was recovered. ``--full`` also runs the real 20,000 sweeps from scratch
and prints the wall time.

    python benchmarks/dmmmen_sweeps.py                    # CPU, one thread
    python benchmarks/dmmmen_sweeps.py --threads 2        # both cores (slower when the other core is busy)
    python benchmarks/dmmmen_sweeps.py --device cuda
    python benchmarks/dmmmen_sweeps.py --full
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment

from lightning_xai.dmmmen import DMMMENSurrogate

PAPER_SWEEPS = 20_000


def synthetic(n: int, p: int, components: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1] (smoothed noise, like pixels), a sparse mixture of regressions, and the true assignments."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, p, generator=g, dtype=torch.float64)
    x = (x + x.roll(1, 1) + x.roll(-1, 1)) / 3
    beta = torch.zeros(components, p, dtype=torch.float64)
    for k in range(components):
        support = torch.randperm(p, generator=g)[:30]
        beta[k, support] = torch.randn(30, generator=g, dtype=torch.float64) * 4
    intercept = torch.linspace(-2, 2, components, dtype=torch.float64)
    z = torch.multinomial(torch.tensor([0.5, 0.3, 0.2][:components]), n, replacement=True, generator=g)
    y = (x * beta[z]).sum(1) + intercept[z] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y, z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=7000)
    parser.add_argument("--p", type=int, default=300)
    parser.add_argument("--components", type=int, default=6, help="truncation level J")
    parser.add_argument("--nets", type=int, default=3, help="number of elastic nets K")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a busy second core makes 2 slower)")
    parser.add_argument("--full", action="store_true", help="also run 20,000 sweeps end to end")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"n={args.n} p={args.p} J={args.components} K={args.nets}")
    x, y, z_true = synthetic(args.n, args.p, 3)
    x, y = x.to(device), y.to(device)

    surrogate = DMMMENSurrogate(args.components, args.nets, seed=0, device=device)
    start = time.perf_counter()
    surrogate.fit(x, y, sweeps=args.warmup, burn_in=args.warmup)
    print(f"warm-up: {args.warmup} sweeps in {time.perf_counter() - start:.2f} s")

    stamps: list[float] = []

    def stamp(done: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    stamp(0, 0)
    surrogate.fit(x, y, sweeps=args.sweeps, burn_in=0, warm_start=True, progress=stamp, profile=True)
    per_sweep = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
    q1, median, q3 = statistics.quantiles(per_sweep, n=4)
    print(f"ms/sweep over {args.sweeps} sweeps: median {median:.2f} (quartiles {q1:.2f}-{q3:.2f}), "
          f"mean {statistics.fmean(per_sweep):.2f}")
    print(f"extrapolated {PAPER_SWEEPS} sweeps: {PAPER_SWEEPS * median / 1000:.0f} s "
          f"({PAPER_SWEEPS * median / 60000:.1f} min)")
    total = sum(surrogate.timings.values())
    print("time per step (profiled, ms/sweep):")
    for name, seconds in sorted(surrogate.timings.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16s} {1000 * seconds / args.sweeps:7.2f}  ({100 * seconds / total:4.1f}%)")
    report(surrogate, x, y, z_true)

    if args.full:
        full = DMMMENSurrogate(args.components, args.nets, seed=0, device=device)
        start = time.perf_counter()
        full.fit(x, y, sweeps=PAPER_SWEEPS)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        print(f"--full: {PAPER_SWEEPS} sweeps (burn-in {PAPER_SWEEPS // 2}) in {wall:.1f} s "
              f"({1000 * wall / PAPER_SWEEPS:.2f} ms/sweep)")
        report(full, x, y, z_true)


def report(surrogate: DMMMENSurrogate, x: torch.Tensor, y: torch.Tensor, z_true: torch.Tensor) -> None:
    """Acceptance rates, occupied components and assignment accuracy against the simulated truth."""
    scalars = surrogate.summary_scalars()
    _, z = surrogate.predict(x, y)
    z = z.cpu()
    table = torch.zeros(int(z_true.max()) + 1, surrogate.n_components)
    table.index_put_((z_true, z), torch.ones(z.numel()), accumulate=True)
    rows, cols = linear_sum_assignment(-table.numpy())
    accuracy = table[rows, cols].sum().item() / z.numel()
    accept = ", ".join(f"{k} {v:.2f}" for k, v in surrogate.acceptance.items())
    print(f"  acceptance: {accept}; occupied {scalars['n_occupied']:.0f}; "
          f"assignment accuracy {accuracy:.4f}; weights {surrogate.components.weights[:4].cpu().numpy().round(3)}")


if __name__ == "__main__":
    main()
