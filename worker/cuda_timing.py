"""GPU timing for the benchmarks: CUDA events around each call, median of the runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_cuda_ms(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Median milliseconds of `fn` on the current stream of the current device, after `warmup`
    untimed calls; each timed call is bracketed by its own pair of events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
