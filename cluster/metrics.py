"""Prometheus metrics of the router and its workers, on their own registry.

Request latencies are observed by the router as streams progress. Worker metrics are read at
scrape time from the loads the workers sent with their latest poll (`WorkerLoad`), labelled
`worker="<rank>"`; the engine's cumulative counters reset when a worker restarts, which Prometheus
treats as a counter reset.

The HTTP endpoint (`serve_http`) runs on prometheus-client's own thread; the scrape only reads
plain attributes that the event loop replaces whole, never a structure it mutates in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.protocol import HANDOFF_WAIT_BUCKETS_S, WorkerLoad

# (rank, healthy, latest load) of every worker
WorkerSnapshot = Callable[[], Sequence[tuple[int, bool, WorkerLoad]]]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    def __init__(self, workers: WorkerSnapshot | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "kvrelay_time_to_first_token_seconds",
            "Time from a request's arrival to its first streamed token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "kvrelay_inter_token_latency_seconds",
            "Time between streamed tokens of one request (per token, averaged over a message).",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvrelay_e2e_request_latency_seconds",
            "Time from a request's arrival to the end of its stream, whatever its status.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "kvrelay_queue_time_seconds",
            "Time from a request's arrival until it is sent to a worker (validation, tokenizing, batching).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "kvrelay_requests",
            "Generate calls by final gRPC status code.",
            ["code"],
            registry=r,
        )
        self.http_requests = Counter(
            "kvrelay_http_requests",
            "OpenAI HTTP API responses by route and HTTP status (a stream counts when it starts).",
            ["route", "status"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "kvrelay_generation_tokens", "Tokens streamed to clients.", registry=r
        )
        self.in_flight = Gauge("kvrelay_requests_in_flight", "Admitted streams not yet ended.", registry=r)
        self.queued = Gauge(
            "kvrelay_requests_queued", "Admitted requests not yet sent to a worker.", registry=r
        )
        if workers is not None:
            r.register(_WorkerCollector(workers))

    def serve_http(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Serve /metrics on host:port (0: any free port); returns the bound port and a stop function."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ValueError(f"metrics_port: cannot listen on {host}:{port}: {e.strerror}") from None

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return int(server.server_port), stop


def add_worker_stats(stats: pb.ServerStats, workers: Sequence[tuple[int, bool, WorkerLoad]]) -> None:
    """ServerStats' per-worker part, from the same snapshot the Prometheus collector reads."""
    for rank, healthy, load in workers:
        stats.num_healthy_workers += healthy
        stats.workers.add(
            rank=rank,
            healthy=healthy,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            kv_usage=load.kv_usage,
            prefix_cache_queries=load.prefix_cache_queries,
            prefix_cache_hits=load.prefix_cache_hits,
            num_preemptions=load.num_preemptions,
            num_graph_replays=load.num_graph_replays,
            num_eager_steps=load.num_eager_steps,
        )


class _WorkerCollector(Collector):
    def __init__(self, workers: WorkerSnapshot) -> None:
        self._workers = workers

    def describe(self) -> list[Any]:
        return []  # unchecked collector: its families depend on the workers present at scrape time

    def collect(self) -> Iterator[Any]:
        snapshot = list(self._workers())
        gauges = {
            "healthy": GaugeMetricFamily(
                "kvrelay_worker_healthy", "1 while the worker serves, 0 while it is down.", labels=["worker"]
            ),
            "running": GaugeMetricFamily(
                "kvrelay_worker_running_requests",
                "Requests in the worker's running batch.",
                labels=["worker"],
            ),
            "waiting": GaugeMetricFamily(
                "kvrelay_worker_waiting_requests",
                "Requests waiting in the worker's scheduler.",
                labels=["worker"],
            ),
            "kv": GaugeMetricFamily(
                "kvrelay_worker_kv_usage_ratio", "Used KV blocks / total KV blocks.", labels=["worker"]
            ),
            "hit_rate": GaugeMetricFamily(
                "kvrelay_worker_prefix_cache_hit_rate",
                "Prompt tokens found in the prefix cache / prompt tokens looked up, since the worker started.",
                labels=["worker"],
            ),
            "outstanding": GaugeMetricFamily(
                "kvrelay_worker_outstanding_tokens",
                "Tokens the worker's admitted requests still have to compute or produce.",
                labels=["worker"],
            ),
            "quarantined": GaugeMetricFamily(
                "kvrelay_worker_kv_quarantined_blocks",
                "KV blocks held back after a given-up handoff until its producer finishes or dies.",
                labels=["worker"],
            ),
        }
        counters = {
            "queries": CounterMetricFamily(
                "kvrelay_worker_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                labels=["worker"],
            ),
            "hits": CounterMetricFamily(
                "kvrelay_worker_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                labels=["worker"],
            ),
            "preemptions": CounterMetricFamily(
                "kvrelay_worker_preemptions", "Requests preempted for lack of KV blocks.", labels=["worker"]
            ),
            "graph": CounterMetricFamily(
                "kvrelay_worker_graph_replays", "Engine steps run as a CUDA graph replay.", labels=["worker"]
            ),
            "eager": CounterMetricFamily(
                "kvrelay_worker_eager_steps", "Engine steps run eagerly (no graph fit).", labels=["worker"]
            ),
            "handoffs": CounterMetricFamily(
                "kvrelay_worker_kv_handoffs",
                "Disaggregated serving: prompts whose KV a decode worker received or gave up on.",
                labels=["worker", "result"],
            ),
        }
        handoff_wait = HistogramMetricFamily(
            "kvrelay_worker_kv_handoff_wait_seconds",
            "Disaggregated serving, decode workers: from a request's reservation to its KV's arrival "
            "(reserve answer, prefill queue and compute, copy, signal).",
            labels=["worker"],
        )
        for rank, healthy, load in snapshot:
            w = [str(rank)]
            gauges["healthy"].add_metric(w, 1.0 if healthy else 0.0)
            gauges["running"].add_metric(w, load.num_running)
            gauges["waiting"].add_metric(w, load.num_waiting)
            gauges["kv"].add_metric(w, load.kv_usage)
            q = load.prefix_cache_queries
            gauges["hit_rate"].add_metric(w, load.prefix_cache_hits / q if q else 0.0)
            gauges["outstanding"].add_metric(w, load.outstanding_tokens)
            counters["queries"].add_metric(w, q)
            counters["hits"].add_metric(w, load.prefix_cache_hits)
            counters["preemptions"].add_metric(w, load.num_preemptions)
            counters["graph"].add_metric(w, load.num_graph_replays)
            counters["eager"].add_metric(w, load.num_eager_steps)
            gauges["quarantined"].add_metric(w, load.num_quarantined_blocks)
            counters["handoffs"].add_metric([*w, "received"], load.num_handoffs_received)
            counters["handoffs"].add_metric([*w, "given_up"], load.num_handoffs_given_up)
            if load.handoff_wait_counts:
                cumulative = list(itertools.accumulate(load.handoff_wait_counts))
                bounds = [*(str(b) for b in HANDOFF_WAIT_BUCKETS_S), "+Inf"]
                handoff_wait.add_metric(
                    w, list(zip(bounds, cumulative, strict=True)), load.handoff_wait_sum_s
                )
        yield from gauges.values()
        yield from counters.values()
        yield handoff_wait
