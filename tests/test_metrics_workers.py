"""The per-worker families of the Prometheus endpoint, read through the real registry."""

from __future__ import annotations

from kvrelay.cluster.metrics import ServerMetrics
from kvrelay.worker.protocol import HANDOFF_WAIT_BUCKETS_S, EngineStats, WorkerLoad


def _load(**kw: object) -> WorkerLoad:
    return WorkerLoad(
        num_running=1,
        num_waiting=0,
        kv_usage=0.5,
        num_free_blocks=10,
        outstanding_tokens=3,
        stats=EngineStats(num_running=1, kv_usage=0.5, num_free_blocks=10, **kw),  # type: ignore[arg-type]
    )


def test_handoff_wait_histogram_is_cumulative_per_worker() -> None:
    counts = [0] * (len(HANDOFF_WAIT_BUCKETS_S) + 1)
    counts[0], counts[4], counts[-1] = 2, 3, 1  # <= 0.5 ms, (5, 10] ms, > 5 s
    loads = [
        (0, True, _load(handoff_wait_counts=tuple(counts), handoff_wait_sum_s=7.25)),
        (1, True, _load()),  # a colocated worker: no handoffs, no histogram
    ]
    registry = ServerMetrics(lambda: loads).registry
    value = registry.get_sample_value
    name = "kvrelay_worker_kv_handoff_wait_seconds"
    assert value(f"{name}_bucket", {"worker": "0", "le": "0.0005"}) == 2
    assert value(f"{name}_bucket", {"worker": "0", "le": "0.005"}) == 2
    assert value(f"{name}_bucket", {"worker": "0", "le": "0.01"}) == 5
    assert value(f"{name}_bucket", {"worker": "0", "le": "5.0"}) == 5
    assert value(f"{name}_bucket", {"worker": "0", "le": "+Inf"}) == 6
    assert value(f"{name}_count", {"worker": "0"}) == 6
    assert value(f"{name}_sum", {"worker": "0"}) == 7.25
    assert value(f"{name}_count", {"worker": "1"}) is None
