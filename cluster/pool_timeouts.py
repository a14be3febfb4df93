"""How long a pool waits on its workers (shared by the Ray pool and the data plane's)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PoolTimeouts:
    # How often an idle worker says it is alive: the data plane's heartbeat period (it was the
    # Ray poll's wait before the data plane; the name stays for callers).
    poll_s: float = 0.1
    stall_s: float = 3.0  # a worker silent this long (no heartbeat, no delta) is marked down
    # A worker holding unfinished work that makes no progress this long is marked down. Larger
    # than the longest single engine step (a step publishes nothing until it ends).
    no_progress_s: float = 30.0
    probe_interval_s: float = 0.5  # how often a down worker is asked whether it is back
    start_s: float = 600.0  # placement group + every worker's first ready() (model load, graphs)
    call_s: float = 30.0  # stats / check_integrity / shutdown of one worker

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"timeouts.{f.name} must be > 0 seconds, got {value}")
        for name in ("stall_s", "no_progress_s"):
            if self.poll_s >= getattr(self, name):
                raise ValueError(
                    f"timeouts.poll_s ({self.poll_s}) must be < timeouts.{name} ({getattr(self, name)})"
                )
