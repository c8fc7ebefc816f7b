"""Shared timing for the benchmarks: variants run interleaved, and the medians are read as ratios.

Each script times its variants in one process, alternately (A B C A B C ...): a warm-up round
first, then ``repeats`` rounds that each run every variant once, in order. A shared machine speeds
up and slows down over minutes (other jobs, caches, clock changes). Interleaving spreads that drift
over all variants alike, instead of charging it to whichever variant ran during a slow spell.
A single sample is noisy, about ±5% here, so the scripts report each variant's median, which an
outlier cannot move, and its ratio to a reference variant timed alongside it. Read the ratios, not
the seconds: the seconds depend on the machine and on its load at the time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, over ``repeats`` rounds that call every variant once, in
    order, after one warm-up round that is not recorded. ``setup[name]``, where given, runs untimed
    before each call of that variant (to switch the active adapter, say)."""
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_number in range(repeats + 1):
        for name, variant in variants.items():
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            variant()
            seconds = time.perf_counter() - start
            if round_number:  # round 0 warms up
                samples[name].append(seconds)
    return samples


def median(samples: Sequence[float]) -> float:
    """The middle sample (the mean of the middle two for an even count)."""
    return statistics.median(samples)


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (0 to 1): nearest rank in sorted order, no interpolation."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(samples: Mapping[str, Sequence[float]], reference: str, title: str) -> None:
    """Print ``title`` with the machine line (torch threads, repeats), then one row per variant:
    its median seconds and that median divided by the median of ``reference``."""
    print(f"{title}, {torch.get_num_threads()} threads, median of {len(samples[reference])} interleaved runs")
    medians = {name: median(values) for name, values in samples.items()}
    width = max(len(name) for name in ["variant", *samples]) + 2
    ratio = f"/ {reference}"
    print(f"{'variant':<{width}}{'median s':>10}  {ratio}")
    for name, seconds in medians.items():
        print(f"{name:<{width}}{seconds:>10.3f}  {seconds / medians[reference]:>{len(ratio)}.3f}")


def resident_kib(field: str) -> int:
    """A size from /proc/self/status in KiB: VmRSS (resident now) or VmHWM (its peak since the last
    ``/proc/self/clear_refs`` reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")
