"""The figures of `kvrelay bench serve`, computed from per-request records. Pure: no I/O, no clock.

Definitions (docs/BENCH_SERVE.md repeats them). All times are client-side, from one monotonic clock:
- TTFT: request sent -> first message that carries a token received.
- E2E: request sent -> stream ended (the last message received).
- TPOT: (E2E - TTFT) / (output tokens - 1), one sample per request; requests with one output token
  have none. The first token is not in it (its time is TTFT's).
- ITL: for each token-carrying message after the first, the gap since the previous token-carrying
  message divided by its n tokens, counted n times. The first message is not a sample, so TTFT
  never inflates ITL.
- Goodput: successful requests per second whose TTFT, TPOT (when it has one) and E2E (when an
  SLO is set) are all within the SLOs.
Only successful requests enter latencies and throughputs; failed ones count in `errors` by status.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did, filled in by the driver as the stream progresses (times in seconds
    from any one monotonic clock)."""

    sent: float
    messages: list[tuple[float, int]] = field(default_factory=list)  # (received at, tokens in it)
    ended: float | None = None  # when the stream ended or failed; None while open
    prompt_tokens: int = 0  # the server's count (usage) when known, else the intended length
    cached_prompt_tokens: int = 0
    error: str | None = None  # the gRPC status code's name when the request failed

    @property
    def ok(self) -> bool:
        return self.error is None and self.ended is not None

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.messages)

    def _token_messages(self) -> list[tuple[float, int]]:
        return [(t, n) for t, n in self.messages if n > 0]

    def ttft(self) -> float | None:
        msgs = self._token_messages()
        return msgs[0][0] - self.sent if msgs else None

    def e2e(self) -> float | None:
        return None if self.ended is None else self.ended - self.sent

    def tpot(self) -> float | None:
        ttft, e2e, n = self.ttft(), self.e2e(), self.output_tokens
        if ttft is None or e2e is None or n < 2:
            return None
        return (e2e - ttft) / (n - 1)

    def itls(self) -> list[float]:
        msgs = self._token_messages()
        out: list[float] = []
        for (prev, _), (now, n) in itertools.pairwise(msgs):
            out.extend([(now - prev) / n] * n)
        return out


@dataclass(frozen=True)
class Slo:
    """Per-request latency limits for goodput, in seconds; None: not checked. The defaults are the
    MLPerf Inference server-scenario limits for Llama-3.1-8B (TTFT 2 s, TPOT 100 ms)."""

    ttft_s: float | None = 2.0
    tpot_s: float | None = 0.1
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"slo {name} must be > 0 seconds or None, got {v}")

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_s, r.ttft()), (self.tpot_s, r.tpot()), (self.e2e_s, r.e2e()))
        return all(limit is None or value is None or value <= limit for limit, value in checks)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency's samples, in seconds (NaN when there are none)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(samples: Sequence[float]) -> Distribution:
        if not samples:
            return Distribution(0, math.nan, math.nan, math.nan, math.nan)
        a = np.asarray(samples, dtype=np.float64)
        # numpy's default "linear" method: the value at rank p/100 * (n - 1), interpolated.
        p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
        return Distribution(len(a), float(a.mean()), p50, p90, p99)


@dataclass(frozen=True)
class ServerDelta:
    """Server-side counters over the run (after - before), from the Prometheus endpoint."""

    prefix_cache_queries: float
    prefix_cache_hits: float
    preemptions: float
    graph_replays: float
    eager_steps: float
    # CPU seconds over the run (0 from servers that do not export them): the router process, and
    # the workers' engine loop threads, data-plane I/O threads and whole processes, summed.
    router_cpu_s: float = 0.0
    worker_loop_cpu_s: float = 0.0
    worker_io_cpu_s: float = 0.0
    worker_process_cpu_s: float = 0.0
    # The engines' steps and their summed duration (the step-time histogram's count and sum).
    steps: float = 0.0
    step_time_s: float = 0.0

    @property
    def mean_step_ms(self) -> float:
        return 1e3 * self.step_time_s / self.steps if self.steps else math.nan

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else math.nan

    @property
    def graph_replay_share(self) -> float:
        steps = self.graph_replays + self.eager_steps
        return self.graph_replays / steps if steps else math.nan


@dataclass(frozen=True)
class BenchMetrics:
    """The figures of one measured run (warm-up excluded)."""

    duration_s: float  # first request sent -> last request ended (failed ones included)
    completed: int
    failed: int
    errors: dict[str, int]  # status code name -> count
    prompt_tokens: int
    output_tokens: int
    request_throughput: float  # completed / duration
    output_throughput: float  # output tokens / duration
    total_token_throughput: float  # (prompt + output tokens) / duration
    goodput: float  # requests meeting every SLO / duration
    slo: Slo
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    samples: dict[str, list[float]]  # "ttft", "tpot", "itl", "e2e" -> raw values (for CDFs)
    server: ServerDelta | None = None


def compute_metrics(
    records: Sequence[RequestRecord], slo: Slo, server: ServerDelta | None = None
) -> BenchMetrics:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors = Counter(r.error or "UNFINISHED" for r in failed)
    last = max((r.ended for r in records if r.ended is not None), default=None)
    duration = last - min(r.sent for r in records) if last is not None else 0.0
    samples = {
        "ttft": _present(r.ttft() for r in ok),
        "tpot": _present(r.tpot() for r in ok),
        "itl": [x for r in ok for x in r.itls()],
        "e2e": _present(r.e2e() for r in ok),
    }
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(slo.met_by(r) for r in ok)

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else math.nan

    return BenchMetrics(
        duration_s=duration,
        completed=len(ok),
        failed=len(failed),
        errors=dict(sorted(errors.items())),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput=per_s(len(ok)),
        output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(prompt_tokens + output_tokens),
        goodput=per_s(good),
        slo=slo,
        ttft=Distribution.of(samples["ttft"]),
        tpot=Distribution.of(samples["tpot"]),
        itl=Distribution.of(samples["itl"]),
        e2e=Distribution.of(samples["e2e"]),
        samples=samples,
        server=server,
    )


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


# Prometheus sample names (counters carry the `_total` suffix) summed over the `worker` label.
_SERVER_COUNTERS = {
    "prefix_cache_queries": "kvrelay_worker_prefix_cache_queries_total",
    "prefix_cache_hits": "kvrelay_worker_prefix_cache_hits_total",
    "preemptions": "kvrelay_worker_preemptions_total",
    "graph_replays": "kvrelay_worker_graph_replays_total",
    "eager_steps": "kvrelay_worker_eager_steps_total",
    "router_cpu_s": "kvrelay_router_process_cpu_seconds_total",
    "worker_loop_cpu_s": "kvrelay_worker_loop_cpu_seconds_total",
    "worker_io_cpu_s": "kvrelay_worker_io_cpu_seconds_total",
    "worker_process_cpu_s": "kvrelay_worker_process_cpu_seconds_total",
    "steps": "kvrelay_worker_step_seconds_count",
    "step_time_s": "kvrelay_worker_step_seconds_sum",
}


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value summed over its labels, from the Prometheus text exposition format."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + float(s.value)
    return totals


def server_delta(before: dict[str, float], after: dict[str, float]) -> ServerDelta:
    """The run's share of the worker counters. A worker restarted mid-run resets its counters, so a
    negative difference is clamped to 0 (the figures then undercount)."""
    return ServerDelta(
        **{k: max(0.0, after.get(name, 0.0) - before.get(name, 0.0)) for k, name in _SERVER_COUNTERS.items()}
    )
