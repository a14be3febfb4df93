"""Prometheus metrics of the router and its workers, on their own registry.

Request latencies are observed by the router as streams progress. Worker metrics are read at
scrape time from the loads the workers sent with their latest poll (`WorkerLoad` and its
`EngineStats`, whose fields say how they are exported), labelled `worker="<rank>"`; the engine's
cumulative counters reset when a worker restarts, which Prometheus treats as a counter reset.

Several router processes (`kvrelay serve --router-processes N`, cluster/router_procs.py): each
router process runs with PROMETHEUS_MULTIPROC_DIR set (prometheus-client's multiprocess mode: its
metrics live in files of that directory); the controller serves one endpoint (`serve_aggregated`)
that merges them with a MultiProcessCollector and adds the worker metrics from its own pool. In
that mode a gauge cannot be a function read at scrape time, so `track_gauges` keeps the functions
and `refresh()` (the router process calls it every REFRESH_S) writes their values.

The HTTP endpoint (`serve_http`) runs on prometheus-client's own thread; the scrape only reads
plain attributes that the event loop replaces whole, never a structure it mutates in place.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.protocol import HANDOFF_WAIT_BUCKETS_S, EngineStats, Metric, WorkerLoad
from kvrelay.worker.step_timer import STEP_TIME_BUCKETS_S

# (rank, healthy, latest load) of every worker
WorkerSnapshot = Callable[[], Sequence[tuple[int, bool, WorkerLoad]]]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
# How stale a multiprocess gauge may be (the router process refreshes them this often).
REFRESH_S = 0.25
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    def __init__(self, workers: WorkerSnapshot | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Set in router processes: values go to per-pid files, summed over live processes.
        self.multiprocess = MULTIPROC_ENV in os.environ
        live: dict[str, Any] = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self._gauge_fns: list[tuple[Gauge, Callable[[], float]]] = []
        # This router process's CPU (kvrelay_router_process_cpu_seconds_total, ...): the router's
        # CPU per token in `bench serve`. A collector is read at scrape time in this process, which
        # the controller's endpoint never reaches: router processes count their CPU in a counter
        # (summed over every router) that `refresh` advances.
        self._cpu: Counter | None = None
        self._cpu_seen = 0.0
        if self.multiprocess:
            self._cpu = Counter(
                "kvrelay_router_process_cpu_seconds",
                "User and system CPU of the router processes, summed.",
                registry=r,
            )
        else:
            ProcessCollector(namespace="kvrelay_router", registry=r)
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
        self.in_flight = Gauge(
            "kvrelay_requests_in_flight", "Admitted streams not yet ended.", registry=r, **live
        )
        self.queued = Gauge(
            "kvrelay_requests_queued", "Admitted requests not yet sent to a worker.", registry=r, **live
        )
        if workers is not None:
            r.register(_WorkerCollector(workers))

    def track_gauges(self, in_flight: Callable[[], float], queued: Callable[[], float]) -> None:
        """The gauges' values: read at scrape time, or (multiprocess mode) written by `refresh`."""
        for gauge, fn in ((self.in_flight, in_flight), (self.queued, queued)):
            if self.multiprocess:
                self._gauge_fns.append((gauge, fn))
            else:
                gauge.set_function(fn)

    def refresh(self) -> None:
        for gauge, fn in self._gauge_fns:
            gauge.set(fn())
        if self._cpu is not None:
            t = os.times()
            cpu = t.user + t.system
            self._cpu.inc(max(0.0, cpu - self._cpu_seen))
            self._cpu_seen = cpu

    def serve_http(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Serve /metrics on host:port (0: any free port); returns the bound port and a stop function."""
        return _serve(self.registry, host, port)


def serve_aggregated(
    host: str, port: int, multiproc_dir: str, workers: WorkerSnapshot
) -> tuple[int, Callable[[], None]]:
    """The controller's one endpoint: every router process's metrics (files in multiproc_dir),
    plus the workers' (once, from the controller's pool). Returns the bound port and a stop."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    registry.register(_WorkerCollector(workers))
    return _serve(registry, host, port)


def _serve(registry: CollectorRegistry, host: str, port: int) -> tuple[int, Callable[[], None]]:
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ValueError(f"metrics_port: cannot listen on {host}:{port}: {e.strerror}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return int(server.server_port), stop


def add_worker_stats(stats: pb.ServerStats, workers: Sequence[tuple[int, bool, WorkerLoad]]) -> None:
    """ServerStats' per-worker part, from the same snapshot the Prometheus collector reads: each
    `WorkerStats` field from the load (routing's gauges) or else the engine's `EngineStats`."""
    for rank, healthy, load in workers:
        stats.num_healthy_workers += healthy
        values = {
            name: getattr(load, name) if hasattr(load, name) else getattr(load.stats, name)
            for name in _WORKER_STATS_FIELDS
        }
        stats.workers.add(rank=rank, healthy=healthy, **values)


_WORKER_STATS_FIELDS = [f.name for f in pb.WorkerStats.DESCRIPTOR.fields if f.name not in ("rank", "healthy")]
# The EngineStats fields that Prometheus shows, with how: metadata["metric"] (worker/protocol.py).
_ENGINE_METRICS = [(f.name, f.metadata["metric"]) for f in fields(EngineStats) if "metric" in f.metadata]


def _family(metric: Metric) -> Any:
    labels = ["worker", *(k for k, _ in metric.labels)]
    cls = GaugeMetricFamily if metric.kind == "gauge" else CounterMetricFamily
    return cls(metric.name, metric.doc, labels=labels)


class _WorkerCollector(Collector):
    def __init__(self, workers: WorkerSnapshot) -> None:
        self._workers = workers

    def describe(self) -> list[Any]:
        return []  # unchecked collector: its families depend on the workers present at scrape time

    def collect(self) -> Iterator[Any]:
        snapshot = list(self._workers())
        # Routing's gauges (from WorkerLoad) and the derived hit rate; then one family per
        # EngineStats metric name, in field order.
        gauges = {
            "healthy": GaugeMetricFamily(
                "kvrelay_worker_healthy", "1 while the worker serves, 0 while it is down.", labels=["worker"]
            ),
            "num_running": GaugeMetricFamily(
                "kvrelay_worker_running_requests",
                "Requests in the worker's running batch.",
                labels=["worker"],
            ),
            "num_waiting": GaugeMetricFamily(
                "kvrelay_worker_waiting_requests",
                "Requests waiting in the worker's scheduler.",
                labels=["worker"],
            ),
            "kv_usage": GaugeMetricFamily(
                "kvrelay_worker_kv_usage_ratio", "Used KV blocks / total KV blocks.", labels=["worker"]
            ),
            "hit_rate": GaugeMetricFamily(
                "kvrelay_worker_prefix_cache_hit_rate",
                "Prompt tokens found in the prefix cache / prompt tokens looked up, since the worker started.",
                labels=["worker"],
            ),
            "outstanding_tokens": GaugeMetricFamily(
                "kvrelay_worker_outstanding_tokens",
                "Tokens the worker's admitted requests still have to compute or produce.",
                labels=["worker"],
            ),
        }
        engine: dict[str, Any] = {}
        for _, metric in _ENGINE_METRICS:
            engine.setdefault(metric.name, _family(metric))
        handoff_wait = HistogramMetricFamily(
            "kvrelay_worker_kv_handoff_wait_seconds",
            "Disaggregated serving, decode workers: from a request's reservation to its KV's arrival "
            "(reserve answer, prefill queue and compute, copy, signal).",
            labels=["worker"],
        )
        step_time = HistogramMetricFamily(
            "kvrelay_worker_step_seconds",
            "Engine steps that ran the model, by duration (prepare to the last sampled token).",
            labels=["worker"],
        )
        for rank, healthy, load in snapshot:
            w, s = [str(rank)], load.stats
            gauges["healthy"].add_metric(w, 1.0 if healthy else 0.0)
            for name in ("num_running", "num_waiting", "kv_usage", "outstanding_tokens"):
                gauges[name].add_metric(w, getattr(load, name))
            q = s.prefix_cache_queries
            gauges["hit_rate"].add_metric(w, s.prefix_cache_hits / q if q else 0.0)
            for name, metric in _ENGINE_METRICS:
                engine[metric.name].add_metric([*w, *(v for _, v in metric.labels)], getattr(s, name))
            if s.handoff_wait_counts:
                cumulative = list(itertools.accumulate(s.handoff_wait_counts))
                bounds = [*(str(b) for b in HANDOFF_WAIT_BUCKETS_S), "+Inf"]
                handoff_wait.add_metric(w, list(zip(bounds, cumulative, strict=True)), s.handoff_wait_sum_s)
            if s.step_time_counts:
                cumulative = list(itertools.accumulate(s.step_time_counts))
                bounds = [*(repr(b) for b in STEP_TIME_BUCKETS_S), "+Inf"]
                step_time.add_metric(w, list(zip(bounds, cumulative, strict=True)), s.step_time_sum_s)
        yield from gauges.values()
        yield from engine.values()
        yield handoff_wait
        yield step_time
