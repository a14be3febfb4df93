"""Engine step time as a fixed-bucket histogram: cheap to record every step, small to ship in
`EngineStats`, and the same on a served worker and offline (`Engine.generate`), so the two can be
compared (issue 14 item 2: does the serving path slow the step?)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Upper bounds in seconds: 0.1 ms growing by 25% per bucket to ~6.5 s, then +Inf. A percentile read
# off the buckets is within one bucket's width (25%) of the true value; the mean is exact.
STEP_TIME_BUCKETS_S: tuple[float, ...] = tuple(1e-4 * 1.25**i for i in range(50))


class StepTimer:
    """Records step durations (the engine calls `record` once per step that ran the model)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(STEP_TIME_BUCKETS_S) + 1)
        self.sum_s = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(STEP_TIME_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds


@dataclass(frozen=True)
class StepTimeSummary:
    steps: int
    mean_ms: float
    p50_ms: float
    p99_ms: float


def summarize(counts: Sequence[int], sum_s: float) -> StepTimeSummary:
    """Mean (exact) and p50/p99 (geometric middle of the bucket that holds them) in ms."""
    total = sum(counts)
    if total == 0:
        return StepTimeSummary(0, 0.0, 0.0, 0.0)
    return StepTimeSummary(
        total, 1e3 * sum_s / total, _quantile(counts, total, 0.5), _quantile(counts, total, 0.99)
    )


def diff(later: Sequence[int], earlier: Sequence[int]) -> list[int]:
    """Counts recorded between two snapshots (an empty earlier one is all zeros)."""
    if not earlier:
        return list(later)
    return [a - b for a, b in zip(later, earlier, strict=True)]


def _quantile(counts: Sequence[int], total: int, q: float) -> float:
    rank = math.ceil(q * total)
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            hi = STEP_TIME_BUCKETS_S[min(i, len(STEP_TIME_BUCKETS_S) - 1)]
            lo = STEP_TIME_BUCKETS_S[i - 1] if 0 < i <= len(STEP_TIME_BUCKETS_S) - 1 else hi / 1.25
            return 1e3 * math.sqrt(lo * hi)
    raise AssertionError("rank beyond the total")
