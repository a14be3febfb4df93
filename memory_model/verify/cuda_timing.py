"""GPU timing for the benchmarks: CUDA events around the calls, median of the runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_cuda_ms(fn: Callable[[], object], iters: int, warmup: int = 1, batch: int = 1) -> float:
    """Median milliseconds of one call of `fn` on the current stream of the current device,
    after `warmup` untimed calls. Each of the `iters` samples brackets `batch` back-to-back
    calls with one pair of events and divides: batch=1 times a call as a caller sees it
    (its host launch cost included when the GPU waits on it), a larger batch the GPU's time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)
