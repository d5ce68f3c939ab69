"""Peak resident memory of this process, for benchmarks on the CPU (tracemalloc does not see torch's allocations)."""

from __future__ import annotations


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/status") as status:
        return 1024 * next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (and so ``ru_maxrss``) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False
