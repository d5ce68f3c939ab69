"""GPEX at scale: step time and memory versus the number of inducing points, gpytorch SVGP beside it, and fidelity.

Four sections, chosen with ``--sections`` (default ``algebra,step,svgp``; ``--fidelity`` adds the fourth):

``algebra``
    The GP algebra alone, on random features (no kernel net): L heads, D features per head, a batch of B queries and
    B gradient-carrying inducing rows, M inducing points (M = 1,024 · 4^k up to ``--max-m``). One step is
    ``GPEXSurrogate.match`` with an identity kernel net (so ``features`` returns the given random features), which
    runs ``InducingCache.swap`` + the posterior solve + the matching loss; then ``loss.backward()``
    into the two leaf feature tensors and the rank-B row write ``update_rows`` (``InducingCache.write``), exactly as
    the callback does. Every size's cache is built first; the median step time then comes from ``--repeats``
    rounds that time one step of every size in turn (interleaved, so a shared machine's drift hits all sizes
    alike). The periodic full refresh of G and c, which ``write`` runs when the cache's schedule says so, is
    reported three ways: the time of one ``refresh()`` on its own; the refresh period in writes, read from the
    cache's schedule; and a measured window of consecutive steps started right after a refresh and as long as one
    period (capped by ``--max-window``), whose mean step time includes the refresh that ends it (refreshes are
    counted by wrapping ``cache.refresh``). amortised = median + one refresh / period. Also: the ratios to
    M = 1,024, the cache's buffer size, and peak memory: on the CPU the growth of the process's peak RSS
    (``ru_maxrss``, its high-water mark reset through ``/proc/self/clear_refs`` first; tracemalloc does not see
    torch) while the cache is built and filled, and separately over the window; on CUDA
    ``torch.cuda.max_memory_allocated`` minus what was allocated before. RSS only grows when the allocator asks the
    OS for more, so memory freed earlier and reused shows as 0.
``step``
    The whole callback step: ``GPEX()`` attached to an (untrained) ``SmallCNN`` for 8×8 digits-shaped inputs
    (1, 8, 8) with 10 classes through ``gpex.attach(model)``; the first ``fit_step(x, slots, match=False)`` builds
    the surrogate with the cache grown to exactly M slots, the remaining rows are written with random features,
    targets and inputs through ``gpex.surrogate.update_rows`` (the kernel net would give the same shapes; only the
    timing matters), then ``gpex.fit_step(x, slots)`` on B random inputs at B consecutive slots is timed, the sizes
    interleaved as above: the network's forward passes, mixing, the kernel net on 2B inputs, the GP algebra, the
    Adam step and the row write. amortised = median + one refresh / period (one write of B rows per step).
``svgp``
    gpytorch's standard SVGP for comparison: ``ApproximateGP`` with ``VariationalStrategy`` over a
    ``CholeskyVariationalDistribution`` (``learn_inducing_locations=True``), an RBF ``ScaleKernel``, on 64-dim flat
    inputs (digits are 8×8); 10 outputs through ``IndependentMultitaskVariationalStrategy`` with a
    ``MultitaskGaussianLikelihood``, and 1 output with a ``GaussianLikelihood``; ``VariationalELBO``; one Adam step
    on a batch of B. M = 256, 1,024, 4,096 (``--svgp-max-m``). M <= 1,024 always runs; a larger size whose step
    time, extrapolated from the previous two sizes (exponent between 2 and 3: B·M² to M³ terms), exceeds
    ``--svgp-budget`` seconds is skipped with a note, and the budget also bounds the number of timed steps. The
    acceptance bar of the GPEX issue is printed at the end: GPEX's whole callback step at M = 65,536 faster than
    SVGP's step at M = 1,024.
``fidelity`` (``--fidelity``)
    Fidelity versus the number of inducing points, like the GPEX paper's Fig. S66: the digits ``SmallCNN`` trained
    for ``--cnn-epochs`` epochs (``benchmarks/_digits.py``), then ``GPEX()`` fitted post hoc with
    ``lightning_xai.fit_explainers`` on random training subsets of M examples (the training stream is the inducing
    set, so the subset *is* the inducing set), each M with the same number of kernel-net steps
    (``--fidelity-steps``, so the epochs grow as M shrinks) and validation only after the last epoch. Reported:
    the callback's logged validation metrics ``gpex/agreement``, ``gpex/pearson``, ``gpex/pearson_min``,
    ``gpex/r2``, ``gpex/variance`` from ``trainer.callback_metrics``, mean [min, max] over ``--fidelity-seeds``
    seeds (subset and GPEX seed).

Times are the wall clock (``--clock cpu``: process CPU time, steadier on a shared machine; not with CUDA) with
``torch.cuda.synchronize`` around each step on CUDA, after ``--warmup`` untimed steps (rounds, where interleaved).

    python benchmarks/gpex_scale.py                                   # algebra, step, svgp on 1 CPU thread
    python benchmarks/gpex_scale.py --fidelity                        # ... and the fidelity table
    python benchmarks/gpex_scale.py --sections algebra --max-m 65536 --repeats 100
    python benchmarks/gpex_scale.py --sections fidelity --fidelity-scale 0.1 --fidelity-noise 1 --fidelity-lr 1e-4
                                                                      # ... with the paper's σ²/scale² = 100
    python benchmarks/gpex_scale.py --device cuda --max-m 1048576     # when a GPU is available
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import gpytorch
import lightning
import torch
from _rss import current_rss, reset_peak_rss
from torch import nn

from lightning_xai.gpex import GPEX, GPEXSurrogate, HeadNorm, InducingCache
from lightning_xai.models import SmallCNN

SECTIONS = ("algebra", "step", "svgp", "fidelity")
SVGP_SIZES = (256, 1024, 4096, 16384)
FILL_CHUNK = 65536
DIGITS_SHAPE = (1, 8, 8)
CLASSES = 10


# ---------------------------------------------------------------------------------------------- timing and memory
class Clock:
    """Times one call: wall clock or process CPU time, with ``cuda.synchronize`` on both sides on CUDA."""

    def __init__(self, device: torch.device, kind: str) -> None:
        self.device = device
        self.now = time.perf_counter if kind == "wall" or device.type == "cuda" else time.process_time
        self.name = "wall" if self.now is time.perf_counter else "cpu"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds taken by ``fn()``."""
        self.sync()
        start = self.now()
        fn()
        self.sync()
        return self.now() - start


@dataclass
class PeakMemory:
    """Growth of peak memory over a ``with`` block: CUDA allocator peak, or the process's peak RSS on the CPU."""

    device: torch.device
    grown: float = 0.0
    exact: bool = True
    _base: float = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact = reset_peak_rss()
            self._base = current_rss() if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.grown = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.grown = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak memory = torch.cuda.max_memory_allocated - allocated before"
    if reset_peak_rss():
        return "peak memory = ru_maxrss after - RSS before (high-water mark reset via /proc/self/clear_refs)"
    return "peak memory = ru_maxrss after - ru_maxrss before: a lower bound (clear_refs not writable)"


def buffer_bytes(module: nn.Module) -> int:
    """Bytes held by a module's buffers (the inducing cache: U, V, G, c, filled, index, inputs)."""
    return sum(b.numel() * b.element_size() for b in module.buffers())


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} B"


def ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:,.2f}"


def table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> None:
    """Print a markdown table, columns right-aligned except those in ``left``."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i in left else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the inducing cache
class RefreshCounter:
    """Counts full refreshes of an :class:`InducingCache`, by wrapping its ``refresh`` on the instance.

    ``InducingCache.write`` calls ``self.refresh()`` when its schedule says so, so the instance attribute sees every
    periodic refresh, whatever the schedule is.
    """

    def __init__(self, cache: InducingCache) -> None:
        self.calls = 0
        original = cache.refresh

        def counted() -> None:
            original()
            self.calls += 1

        cache.refresh = counted  # type: ignore[method-assign]


def writes_per_refresh(cache: InducingCache, rows_per_write: int) -> int | None:
    """Writes of ``rows_per_write`` rows from one periodic refresh to the next, under the cache's declared schedule.

    Two schedules are understood: a refresh once the rows rewritten since the last one reach ``refresh_every`` times
    the filled rows (caches with a ``rewritten`` counter: ``⌈refresh_every · filled / B⌉`` writes, growing with M so
    the amortised cost per row is constant), and a refresh every ``refresh_every`` writes (older caches). ``None``
    when the cache never refreshes on its own.
    """
    every = getattr(cache, "refresh_every", None)
    if every is None:
        return None
    if hasattr(cache, "rewritten"):
        return max(1, math.ceil(float(every) * cache.num_filled / rows_per_write))
    return int(every)


def random_features(n: int, heads: int, dim: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, L, D) features shaped like a kernel net's: per-head L2-normalised, then LeakyReLU (``HeadNorm``)."""
    return HeadNorm(heads, dim)(torch.randn(n, heads * dim, generator=gen)).to(device)


def fill_rows(
    surrogate: GPEXSurrogate, rows: range, gen: torch.Generator, inputs_shape: tuple[int, ...] | None = None
) -> None:
    """Write random features and targets (and inputs, when the cache stores them) at ``rows``, in large chunks."""
    device = surrogate.cache.U.device
    for start in range(rows.start, rows.stop, FILL_CHUNK):
        stop = min(start + FILL_CHUNK, rows.stop)
        n = stop - start
        u = random_features(n, surrogate.heads, surrogate.dim, gen, device)
        v = torch.randn(n, surrogate.heads, generator=gen).to(device)
        x = None if inputs_shape is None else torch.rand(n, *inputs_shape, generator=gen).to(device)
        surrogate.update_rows(torch.arange(start, stop, device=device), u, v, inputs=x)


def sizes(start: int, stop: int, factor: int = 4) -> list[int]:
    out, m = [], start
    while m <= stop:
        out.append(m)
        m *= factor
    return out


# ---------------------------------------------------------------------------------------------- interleaving
def interleaved_medians(
    steps: dict[int, Callable[[], Callable[[], object]]], rounds: int, warmup: int, clock: Clock
) -> dict[int, list[float]]:
    """Time one step of every size per round, sizes in turn, so that a shared machine's drift hits all alike.

    ``steps[m]()`` prepares a step (its random inputs) and returns the closure to time. Returns each size's times.
    """
    for _ in range(warmup):
        for make in steps.values():
            make()()
    times: dict[int, list[float]] = {m: [] for m in steps}
    for _ in range(rounds):
        for m, make in steps.items():
            times[m].append(clock.time(make()))
    return times


# ---------------------------------------------------------------------------------------------- 1. GP algebra
@dataclass
class AlgebraRow:
    m: int
    median: float
    window_mean: float
    window: int
    refreshes: int
    refresh: float
    period: int | None
    cache_bytes: int
    build_peak: float
    step_peak: float

    @property
    def amortised(self) -> float:
        """Median step plus its share of the periodic refresh: ``median + refresh / period``."""
        return self.median if self.period is None else self.median + self.refresh / self.period


def algebra_step(surrogate: GPEXSurrogate, m: int, batch: int, gen: torch.Generator) -> Callable[[], None]:
    """One GP-algebra training step on fresh random data, as a closure (inputs are drawn before timing)."""
    device = surrogate.cache.U.device
    heads, dim = surrogate.heads, surrogate.dim
    start = int(torch.randint(0, m - batch + 1, (1,), generator=gen))
    slots = torch.arange(start, start + batch, device=device)  # B consecutive slots, as the callback's stream
    u_query = random_features(batch, heads, dim, gen, device).requires_grad_(True)
    u_rows = random_features(batch, heads, dim, gen, device).requires_grad_(True)
    v_rows = torch.randn(batch, heads, generator=gen).to(device)
    targets = torch.randn(batch, heads, generator=gen).to(device)

    def step() -> None:
        out = surrogate.match(u_query, targets, slots, u_rows, v_rows)  # swap + posterior + loss
        out.loss.backward()  # into the queries and the B gradient-carrying rows
        surrogate.update_rows(slots, out.inducing_features, v_rows, swap=out.swap)  # rank-B write (+ any refresh)

    return step


def bench_algebra(args: argparse.Namespace, device: torch.device, clock: Clock) -> list[AlgebraRow]:
    """Build a cache of random rows per M, time interleaved steps, then each M's refresh window and refresh."""
    built: dict[int, tuple[GPEXSurrogate, torch.Generator, float]] = {}
    for m in sizes(1024, args.max_m):
        free(device)
        gen = torch.Generator().manual_seed(m)
        with PeakMemory(device) as build:
            surrogate = GPEXSurrogate(nn.Identity(), heads=args.heads, dim=args.dim, cache_size=m).to(device)
            fill_rows(surrogate, range(m), gen)
        built[m] = (surrogate, gen, build.grown)

    def maker(m: int) -> Callable[[], Callable[[], None]]:
        surrogate, gen, _ = built[m]
        return lambda: algebra_step(surrogate, m, args.batch, gen)

    times = interleaved_medians({m: maker(m) for m in built}, args.repeats, args.warmup, clock)
    rows: list[AlgebraRow] = []
    for m, (surrogate, gen, build_peak) in built.items():
        cache = surrogate.cache
        counter = RefreshCounter(cache)
        period = writes_per_refresh(cache, args.batch)
        window = args.window or min(period or args.max_window, args.max_window)
        cache.refresh()  # start a period: under the rows-rewritten schedule the window then ends on the next refresh
        window_times, before = [], counter.calls
        with PeakMemory(device) as steps:
            for _ in range(window):
                window_times.append(clock.time(algebra_step(surrogate, m, args.batch, gen)))
        refreshes = counter.calls - before
        refresh = statistics.median(clock.time(cache.refresh) for _ in range(args.refresh_repeats))
        row = AlgebraRow(
            m=m,
            median=statistics.median(times[m]),
            window_mean=sum(window_times) / window,
            window=window,
            refreshes=refreshes,
            refresh=refresh,
            period=period,
            cache_bytes=buffer_bytes(cache),
            build_peak=build_peak,
            step_peak=steps.grown,
        )
        rows.append(row)
        print(
            f"  algebra M={m:,}: median {ms(row.median)} ms, window mean {ms(row.window_mean)} ms "
            f"({refreshes} periodic refreshes in {window} steps), one refresh {ms(refresh)} ms",
            file=sys.stderr,
        )
    return rows


def print_algebra(args: argparse.Namespace, rows: list[AlgebraRow], device: torch.device) -> None:
    print(f"## 1. GP algebra per step (L = {args.heads}, D = {args.dim}, B = {args.batch}, random features)\n")
    print(
        "step = `match` (cache.swap + posterior + loss) + backward to u + `update_rows` (rank-B write from the swap). "
        f"median: {args.repeats} rounds, the sizes interleaved in each. window mean: a run of consecutive steps "
        "started right after a refresh and as long as the cache's refresh period (writes, from its schedule; capped "
        "by --max-window), so it includes the periodic full refresh that `write` runs when due (counted in the "
        "refreshes column). amortised = median + one refresh / period. "
        f"{memory_note(device)}.\n"
    )
    base = rows[0]
    table(
        [
            "M",
            "median ms/step",
            "× M=1,024",
            "amortised ms/step",
            "× M=1,024",
            "window mean ms/step",
            "refreshes / window",
            "refresh period (writes)",
            "one refresh ms",
            "cache buffers",
            "peak mem build+fill",
            "peak mem window",
        ],
        [
            [
                f"{r.m:,}",
                ms(r.median),
                f"{r.median / base.median:.2f}",
                ms(r.amortised),
                f"{r.amortised / base.amortised:.2f}",
                ms(r.window_mean),
                f"{r.refreshes} / {r.window:,}",
                "never" if r.period is None else f"{r.period:,}",
                ms(r.refresh),
                size(r.cache_bytes),
                size(r.build_peak),
                size(r.step_peak),
            ]
            for r in rows
        ],
    )


# ---------------------------------------------------------------------------------------------- 2. callback step
@dataclass
class StepRow:
    m: int
    median: float
    p90: float
    refresh: float
    period: int | None
    cache_bytes: int
    step_peak: float

    @property
    def amortised(self) -> float:
        """Median step plus its share of the periodic refresh: ``median + refresh / period``."""
        return self.median if self.period is None else self.median + self.refresh / self.period


def callback_with_cache(m: int, args: argparse.Namespace, device: torch.device) -> tuple[GPEX, torch.Generator]:
    """``GPEX()`` attached to an untrained SmallCNN, with a cache of exactly M rows (one real write, then random)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(m)
    b = args.batch
    model = SmallCNN(input_shape=DIGITS_SHAPE, num_classes=CLASSES).to(device).eval()
    gpex = GPEX().attach(model)
    # the first write names the last slots, so the growing cache allocates exactly M rows
    gpex.fit_step(torch.rand(b, *DIGITS_SHAPE, generator=gen).to(device), torch.arange(m - b, m, device=device), False)
    assert gpex.surrogate is not None
    fill_rows(gpex.surrogate, range(0, m - b), gen, DIGITS_SHAPE)
    return gpex, gen


def callback_step(gpex: GPEX, m: int, batch: int, gen: torch.Generator) -> Callable[[], object]:
    """One ``fit_step`` on B random digits-shaped inputs at B consecutive slots, as a closure."""
    assert gpex.surrogate is not None
    device = gpex.surrogate.cache.U.device
    start = int(torch.randint(0, m - batch + 1, (1,), generator=gen))
    x = torch.rand(batch, *DIGITS_SHAPE, generator=gen).to(device)
    slots = torch.arange(start, start + batch, device=device)  # B consecutive positions of the training stream
    return lambda: gpex.fit_step(x, slots)


def bench_step(args: argparse.Namespace, device: torch.device, clock: Clock) -> list[StepRow]:
    """Build GPEX per M, time interleaved ``fit_step`` rounds, then each M's peak memory over steps and a refresh."""
    built: dict[int, tuple[GPEX, torch.Generator]] = {}
    for m in sizes(1024, min(args.max_m, args.step_max_m)):
        free(device)
        built[m] = callback_with_cache(m, args, device)

    def maker(m: int) -> Callable[[], Callable[[], object]]:
        gpex, gen = built[m]
        return lambda: callback_step(gpex, m, args.batch, gen)

    times = interleaved_medians({m: maker(m) for m in built}, args.repeats, args.warmup, clock)
    rows: list[StepRow] = []
    for m, (gpex, gen) in built.items():
        assert gpex.surrogate is not None
        cache = gpex.surrogate.cache
        with PeakMemory(device) as peak:
            for _ in range(args.warmup + 5):
                callback_step(gpex, m, args.batch, gen)()
        refresh = statistics.median(clock.time(cache.refresh) for _ in range(args.refresh_repeats))
        ordered = sorted(times[m])
        row = StepRow(
            m=m,
            median=statistics.median(ordered),
            p90=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            refresh=refresh,
            period=writes_per_refresh(cache, args.batch),
            cache_bytes=buffer_bytes(cache),
            step_peak=peak.grown,
        )
        rows.append(row)
        print(f"  step M={m:,}: median {ms(row.median)} ms, one refresh {ms(refresh)} ms", file=sys.stderr)
    return rows


def print_step(args: argparse.Namespace, rows: list[StepRow], device: torch.device) -> None:
    print(
        f"## 2. Whole GPEX callback step: `GPEX().fit_step(x, slots)` on SmallCNN, 8×8 digits-shaped inputs, "
        f"L = 10, D = 20, B = {args.batch}\n"
    )
    print(
        "default kernel net (an MLP under 16×16), Adam; the cache holds M rows of features, targets and inputs. "
        f"median and p90: {args.repeats} rounds, the sizes interleaved in each. amortised = median + one refresh / "
        "refresh period (writes, from the cache's schedule; one write per step). "
        f"{memory_note(device)}, over {args.warmup + 5} further steps.\n"
    )
    base = rows[0]
    table(
        [
            "M",
            "median ms/step",
            "p90 ms",
            "× M=1,024",
            "amortised ms/step",
            "× M=1,024",
            "refresh period (writes)",
            "one refresh ms",
            "cache buffers",
            "peak mem steps",
        ],
        [
            [
                f"{r.m:,}",
                ms(r.median),
                ms(r.p90),
                f"{r.median / base.median:.2f}",
                ms(r.amortised),
                f"{r.amortised / base.amortised:.2f}",
                "never" if r.period is None else f"{r.period:,}",
                ms(r.refresh),
                size(r.cache_bytes),
                size(r.step_peak),
            ]
            for r in rows
        ],
    )


# ---------------------------------------------------------------------------------------------- 3. gpytorch SVGP
class SVGP(gpytorch.models.ApproximateGP):
    """The textbook gpytorch SVGP: learned inducing locations, Cholesky q(u), RBF kernel; ``outputs`` independent GPs.

    Args:
        inducing: (M, d) initial inducing locations (copied per output).
        outputs: number of independent outputs; more than one uses ``IndependentMultitaskVariationalStrategy``.
    """

    def __init__(self, inducing: torch.Tensor, outputs: int) -> None:
        batch = torch.Size([outputs]) if outputs > 1 else torch.Size([])
        m = inducing.shape[0]
        q = gpytorch.variational.CholeskyVariationalDistribution(m, batch_shape=batch)
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing.expand(*batch, *inducing.shape).clone(), q, learn_inducing_locations=True
        )
        if outputs > 1:
            strategy = gpytorch.variational.IndependentMultitaskVariationalStrategy(strategy, num_tasks=outputs)
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(batch_shape=batch), batch_shape=batch
        )

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@dataclass
class SVGPRow:
    outputs: int
    m: int
    median: float | None
    peak: float | None
    note: str = ""


def svgp_step(m: int, outputs: int, batch: int, device: torch.device) -> Callable[[], None]:
    """A closure running one ELBO + Adam step of an SVGP with M inducing points on 64-dim inputs."""
    gen = torch.Generator().manual_seed(m + outputs)
    d = math.prod(DIGITS_SHAPE)
    model = SVGP(torch.rand(m, d, generator=gen), outputs).to(device)
    if outputs > 1:
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=outputs).to(device)
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood().to(device)
    elbo = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=1437)
    optimizer = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=1e-2)
    x = torch.rand(batch, d, generator=gen).to(device)
    y = torch.randn(batch, outputs, generator=gen).to(device)
    y = y if outputs > 1 else y[:, 0]
    model.train()
    likelihood.train()

    def step() -> None:
        optimizer.zero_grad()
        loss = -elbo(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def predicted_seconds(measured: list[tuple[int, float]], m: int) -> float:
    """Step time at M extrapolated from the measured (M, s) pairs: the last two give the exponent, kept in [2, 3]
    (B·M² to M³ terms); from a single point, cubic."""
    m1, t1 = measured[-1]
    exponent = 3.0
    if len(measured) >= 2:
        m0, t0 = measured[-2]
        exponent = min(3.0, max(2.0, math.log(t1 / t0) / math.log(m1 / m0)))
    return t1 * (m / m1) ** exponent


def bench_svgp(args: argparse.Namespace, device: torch.device, clock: Clock) -> list[SVGPRow]:
    rows: list[SVGPRow] = []
    for outputs in (CLASSES, 1):
        measured: list[tuple[int, float]] = []
        for m in [s for s in SVGP_SIZES if s <= args.svgp_max_m]:
            if measured and m > 1024:  # M <= 1,024 always runs: the acceptance bar compares with M = 1,024
                predicted = predicted_seconds(measured, m)
                if predicted > args.svgp_budget:
                    note = f"skipped: predicted ≈ {predicted:,.0f} s/step > --svgp-budget {args.svgp_budget:g} s"
                    rows.append(SVGPRow(outputs, m, None, None, note))
                    continue
            free(device)
            with PeakMemory(device) as peak:
                step = svgp_step(m, outputs, args.batch, device)
                first = clock.time(step)  # warm-up, and the estimate of how many repeats fit the budget
                repeats = max(1, min(args.svgp_repeats, int(args.svgp_budget * 3 / max(first, 1e-9))))
                times = [clock.time(step) for _ in range(repeats)]
            median = statistics.median(times)
            note = f"{repeats} timed step(s)" + ("" if repeats == args.svgp_repeats else " (budget-limited)")
            rows.append(SVGPRow(outputs, m, median, peak.grown, note))
            print(f"  svgp outputs={outputs} M={m:,}: {median:.3f} s/step", file=sys.stderr)
            measured.append((m, median))
    return rows


def print_svgp(args: argparse.Namespace, rows: list[SVGPRow], device: torch.device) -> None:
    print(
        f"## 3. gpytorch SVGP step (VariationalStrategy + CholeskyVariationalDistribution, learned inducing "
        f"locations, RBF ScaleKernel, VariationalELBO, Adam), 64-dim inputs, B = {args.batch}\n"
    )
    print(f"peak memory over model construction and the steps ({memory_note(device)}).\n")
    table(
        ["outputs", "M", "s/step", "peak mem", "note"],
        [
            [
                str(r.outputs),
                f"{r.m:,}",
                "–" if r.median is None else f"{r.median:.3f}",
                "–" if r.peak is None else size(r.peak),
                r.note,
            ]
            for r in rows
        ],
        left=(4,),
    )


def print_acceptance(step_rows: list[StepRow], svgp_rows: list[SVGPRow]) -> None:
    gpex = next((r for r in step_rows if r.m == 65536), None)
    print("## Acceptance: GPEX's whole callback step at M = 65,536 faster than SVGP's step at M = 1,024\n")
    if gpex is None:
        print("n/a: section `step` did not reach M = 65,536 (raise --max-m / --step-max-m)\n")
        return
    for outputs in (CLASSES, 1):
        svgp = next((r for r in svgp_rows if r.m == 1024 and r.outputs == outputs and r.median is not None), None)
        if svgp is None:
            print(f"- SVGP with {outputs} output(s) at M = 1,024: not measured")
            continue
        assert svgp.median is not None
        verdict = "PASS" if gpex.median < svgp.median else "FAIL"
        amortised = f" (amortised {ms(gpex.amortised)} ms)"
        print(
            f"- GPEX step at 65,536: {ms(gpex.median)} ms{amortised} vs SVGP ({outputs} output(s)) at 1,024: "
            f"{svgp.median * 1e3:,.1f} ms → {svgp.median / gpex.median:,.1f}× faster: {verdict}"
        )
    print()


# ---------------------------------------------------------------------------------------------- 4. fidelity
@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and the warnings expected for tiny post-hoc fits."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_xai")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


FIDELITY_KEYS = ("agreement", "pearson", "pearson_min", "r2", "variance")


@dataclass
class FidelityRow:
    m: int
    epochs: int
    steps: int
    seconds: float
    values: dict[str, list[float]]


def bench_fidelity(args: argparse.Namespace, device: torch.device) -> tuple[list[FidelityRow], int]:
    from _digits import trained_digits_cnn
    from torch.utils.data import Subset

    from lightning_xai import fit_explainers
    from lightning_xai.data import DigitsDataModule

    with quiet_lightning():
        model, dm = trained_digits_cnn(args.cnn_epochs)
    train = dm.train_dataset
    assert train is not None
    full = len(train)
    wanted = sorted({full if s == "all" else min(int(s), full) for s in args.fidelity_sizes.split(",")})
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    for m in wanted:
        per_epoch = math.ceil(m / dm.batch_size)
        epochs = max(1, math.ceil(args.fidelity_steps / per_epoch))
        values: dict[str, list[float]] = {k: [] for k in FIDELITY_KEYS}
        start = time.perf_counter()
        for seed in range(args.fidelity_seeds):
            subset = torch.randperm(full, generator=torch.Generator().manual_seed(1000 + seed))[:m]
            data = DigitsDataModule(batch_size=dm.batch_size)
            data.setup()  # the same split as dm (seed 0); setup() does nothing once the splits exist
            data.train_dataset = Subset(train, subset.tolist())
            kwargs = {}
            if args.fidelity_scale is not None:
                kwargs["scale"] = args.fidelity_scale
            if args.fidelity_noise is not None:
                kwargs["noise"] = args.fidelity_noise
            if args.fidelity_lr is not None:
                kwargs["lr"] = args.fidelity_lr
            with quiet_lightning():
                trainer = fit_explainers(
                    model,
                    data,
                    [GPEX(seed=seed, probe_size=0, **kwargs)],
                    epochs=epochs,
                    accelerator=accelerator,
                    devices=1,
                    logger=False,
                    enable_progress_bar=False,
                    num_sanity_val_steps=0,
                    check_val_every_n_epoch=epochs,
                )
            for key in FIDELITY_KEYS:
                values[key].append(float(trainer.callback_metrics[f"gpex/{key}"]))
        seconds = (time.perf_counter() - start) / args.fidelity_seeds
        rows.append(FidelityRow(m, epochs, epochs * per_epoch, seconds, values))
        print(f"  fidelity M={m:,}: pearson {statistics.mean(values['pearson']):.3f}", file=sys.stderr)
    return rows, full


def print_fidelity(args: argparse.Namespace, rows: list[FidelityRow], full: int) -> None:
    print(
        f"## 4. Fidelity versus inducing points (post hoc on the digits SmallCNN trained {args.cnn_epochs} epochs; "
        f"training set {full}, validation 270)\n"
    )
    settings = (
        ", ".join(
            f"{name}={value}"
            for name, value in (
                ("scale", args.fidelity_scale),
                ("noise", args.fidelity_noise),
                ("lr", args.fidelity_lr),
            )
            if value is not None
        )
        or "GPEX defaults"
    )
    print(
        f"`fit_explainers(model, subset datamodule, [GPEX(seed=s)])` with {settings}; the random training subset of "
        f"M examples is the inducing set; ≈{args.fidelity_steps} kernel-net steps for every M; validation metrics "
        f"(`trainer.callback_metrics['gpex/...']`) after the last epoch, mean [min, max] over "
        f"{args.fidelity_seeds} seed(s).\n"
    )

    def cell(xs: list[float]) -> str:
        mean = statistics.mean(xs)
        return f"{mean:.3f}" if len(xs) == 1 else f"{mean:.3f} [{min(xs):.3f}, {max(xs):.3f}]"

    table(
        ["M", "epochs", "steps", *FIDELITY_KEYS, "wall s / fit"],
        [
            [f"{r.m:,}", str(r.epochs), str(r.steps), *(cell(r.values[k]) for k in FIDELITY_KEYS), f"{r.seconds:.1f}"]
            for r in rows
        ],
    )


# ---------------------------------------------------------------------------------------------- main
def describe_machine(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    what = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU {cpu}"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, gpytorch {gpytorch.__version__}, lightning {lightning.__version__}, "
        f"python {platform.python_version()}; device {device} ({what}); torch threads {threads} of "
        f"{os.cpu_count()} cores; load average {load}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sections", default="algebra,step,svgp", help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--fidelity", action="store_true", help="also run the (slower) fidelity section")
    parser.add_argument("--max-m", type=int, default=262144, help="largest M for algebra and step (1,024·4^k)")
    parser.add_argument("--step-max-m", type=int, default=262144, help="largest M for the callback step")
    parser.add_argument("--batch", type=int, default=64, help="B: queries and gradient-carrying rows per step")
    parser.add_argument("--heads", type=int, default=10, help="L for the algebra section")
    parser.add_argument("--dim", type=int, default=20, help="D for the algebra section")
    parser.add_argument("--repeats", type=int, default=50, help="interleaved timing rounds (one step per size each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="algebra steps in the refresh window (0: the cache's refresh period, at most --max-window)",
    )
    parser.add_argument("--max-window", type=int, default=4096, help="cap of the automatic window (steps)")
    parser.add_argument("--refresh-repeats", type=int, default=3, help="direct refresh() calls timed per size")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock or process CPU time (steadier on a shared CPU; not for cuda)",
    )
    parser.add_argument("--svgp-max-m", type=int, default=4096, help="largest SVGP M tried")
    parser.add_argument(
        "--svgp-budget",
        type=float,
        default=15.0,
        help="skip an SVGP size whose predicted s/step exceeds this; also bounds its repeats",
    )
    parser.add_argument("--svgp-repeats", type=int, default=5, help="timed SVGP steps per size (after one warm-up)")
    parser.add_argument("--cnn-epochs", type=int, default=5, help="fidelity: epochs of SmallCNN training")
    parser.add_argument("--fidelity-sizes", default="100,200,400,800,all", help="fidelity: M values ('all' = full)")
    parser.add_argument("--fidelity-steps", type=int, default=400, help="fidelity: kernel-net steps for every M")
    parser.add_argument("--fidelity-seeds", type=int, default=3, help="fidelity: seeds per M")
    parser.add_argument("--fidelity-scale", type=float, default=None, help="fidelity: GPEX(scale=...) (paper: 0.1)")
    parser.add_argument("--fidelity-noise", type=float, default=None, help="fidelity: GPEX(noise=...) (paper: 1.0)")
    parser.add_argument("--fidelity-lr", type=float, default=None, help="fidelity: GPEX(lr=...) (paper: 1e-4)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.fidelity and "fidelity" not in chosen:
        chosen.append("fidelity")
    args.sections = chosen
    if args.max_m < 1024:
        parser.error("--max-m must be at least 1024")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available")
    device = torch.device(args.device)
    clock = Clock(device, args.clock)
    print(
        f"# GPEX scale benchmark\n\n{describe_machine(device, torch.get_num_threads())}; "
        f"{clock.name}-clock times, {args.warmup} warm-up step(s)\n"
    )

    algebra: list[AlgebraRow] = []
    steps: list[StepRow] = []
    svgp: list[SVGPRow] = []
    if "algebra" in args.sections:
        algebra = bench_algebra(args, device, clock)
        print_algebra(args, algebra, device)
    if "step" in args.sections:
        steps = bench_step(args, device, clock)
        print_step(args, steps, device)
    if "svgp" in args.sections:
        svgp = bench_svgp(args, device, clock)
        print_svgp(args, svgp, device)
    if steps and svgp:
        print_acceptance(steps, svgp)
    if "fidelity" in args.sections:
        fidelity, full = bench_fidelity(args, device)
        print_fidelity(args, fidelity, full)


if __name__ == "__main__":
    main()
