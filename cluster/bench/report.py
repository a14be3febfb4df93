"""What `kvrelay bench serve` writes: the terminal table, JSON, a markdown report and PNG plots.
matplotlib is imported only when plots are asked for (Agg backend, no display needed)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .metrics import BenchMetrics, Distribution, ServerDelta, Slo

_LATENCIES = ("ttft", "tpot", "itl", "e2e")
# A client process above this many CPU seconds per wall second is (nearly) saturated: its event
# loop delays sends and receipts, so latencies and throughput measure the load generator too.
CLIENT_CPU_LIMIT = 0.9


def client_cpu_warning(cpu: tuple[float, ...] | list[float], limit: float = CLIENT_CPU_LIMIT) -> str | None:
    """The warning to print when any client process is at or above `limit` CPU; None otherwise."""
    busy = [(i, c) for i, c in enumerate(cpu) if c >= limit]
    if not busy:
        return None
    which = ", ".join(f"process {i}: {c:.2f}" for i, c in busy)
    return (
        f"client CPU saturated ({which} CPU-s per wall-s, limit {limit:g}): the load generator, not "
        "the server, may be the bottleneck; use more --client-processes"
    )


_LATENCY_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}


@dataclass(frozen=True)
class BenchPoint:
    """One measured run: its arrival settings and its figures."""

    rate: float  # requests per second; inf: every request at once
    max_concurrency: int | None  # None: unbounded
    metrics: BenchMetrics
    # The load generator's own CPU over the measured run, one figure per client process: CPU
    # seconds (every thread) per wall second. Near 1.0 the client, not the server, may be the limit.
    client_cpu: tuple[float, ...] = ()

    @property
    def client_warning(self) -> str | None:
        return client_cpu_warning(self.client_cpu)

    @property
    def label(self) -> str:
        conc = "unbounded" if self.max_concurrency is None else str(self.max_concurrency)
        return f"rate {_num(self.rate)} req/s, concurrency {conc}"


@dataclass(frozen=True)
class BenchRun:
    """A whole invocation: its settings (for reproduction), the server it ran against, its points
    (one, or one per swept value, in sweep order)."""

    settings: dict[str, Any]
    server: dict[str, Any]  # model, max_model_len, vocab_size
    points: list[BenchPoint]
    sweep: str | None  # "rate", "concurrency" or None


def _num(x: float | int | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ms(x: float) -> str:
    return _num(x * 1000.0)


def _point_rows(p: BenchPoint) -> list[tuple[str, str]]:
    m = p.metrics
    rows = [
        ("Duration (s)", _num(m.duration_s)),
        ("Completed requests", str(m.completed)),
        ("Failed requests", str(m.failed)),
        ("Prompt tokens", str(m.prompt_tokens)),
        ("Output tokens", str(m.output_tokens)),
        ("Request throughput (req/s)", _num(m.request_throughput)),
        ("Output token throughput (tok/s)", _num(m.output_throughput)),
        ("Total token throughput (tok/s)", _num(m.total_token_throughput)),
        (f"Goodput (req/s, {_slo_text(m)})", _num(m.goodput)),
    ]
    for name in _LATENCIES:
        d: Distribution = getattr(m, name)
        title = _LATENCY_TITLES[name]
        rows += [
            (
                f"{title} mean / p50 / p90 / p99 (ms)",
                " / ".join(_ms(v) for v in (d.mean, d.p50, d.p90, d.p99)),
            )
        ]
    for code, count in m.errors.items():
        rows.append((f"Errors {code}", str(count)))
    if m.server is not None:
        s = m.server
        rows += [
            ("Server prefix-cache hit rate", _num(s.prefix_cache_hit_rate, 4)),
            ("Server preemptions", _num(s.preemptions, 0)),
            ("Server graph replay share", _num(s.graph_replay_share, 4)),
        ]
        if s.steps:
            per_token = 1e6 / max(m.output_tokens, 1)  # CPU-s -> us per delivered output token
            rows += [
                ("Engine step mean (ms)", _num(s.mean_step_ms, 3)),
                ("Router CPU per output token (us)", _num(s.router_cpu_s * per_token, 1)),
                (
                    "Worker CPU per output token: loop / I/O / process (us)",
                    " / ".join(
                        _num(v * per_token, 1)
                        for v in (s.worker_loop_cpu_s, s.worker_io_cpu_s, s.worker_process_cpu_s)
                    ),
                ),
            ]
    if p.client_cpu:
        rows.append(("Client CPU per process (CPU-s/s)", " / ".join(f"{c:.2f}" for c in p.client_cpu)))
    if p.client_warning is not None:
        rows.append(("WARNING", p.client_warning))
    return rows


def _slo_text(m: BenchMetrics) -> str:
    parts = [
        f"{name} <= {_ms(v)} ms"
        for name, v in (("TTFT", m.slo.ttft_s), ("TPOT", m.slo.tpot_s), ("E2E", m.slo.e2e_s))
        if v is not None
    ]
    return ", ".join(parts) or "no SLO"


def format_table(run: BenchRun) -> str:
    """The terminal table: one block per point, then one summary line per point in a sweep."""
    lines: list[str] = []
    for p in run.points:
        rows = _point_rows(p)
        width = max(len(k) for k, _ in rows) + 2
        lines.append(f"==== {p.label} ====")
        lines += [f"{k:<{width}}{v}" for k, v in rows]
        lines.append("")
    if run.sweep is not None:
        header, body = _summary(run)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        for r in [header, *body]:
            lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines).rstrip() + "\n"


def _summary(run: BenchRun) -> tuple[list[str], list[list[str]]]:
    header = ["rate", "conc", "ok", "failed", "req/s", "out tok/s", "goodput", "p99 TTFT ms", "p99 TPOT ms"]
    body = [
        [
            _num(p.rate),
            _num(p.max_concurrency),
            str(p.metrics.completed),
            str(p.metrics.failed),
            _num(p.metrics.request_throughput),
            _num(p.metrics.output_throughput),
            _num(p.metrics.goodput),
            _ms(p.metrics.ttft.p99),
            _ms(p.metrics.tpot.p99),
        ]
        for p in run.points
    ]
    return header, body


def _finite(x: Any) -> Any:
    """JSON has no NaN or inf: they become null and the string "inf"."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def to_json(run: BenchRun, *, samples: bool = True) -> dict[str, Any]:
    points = []
    for p in run.points:
        m = asdict(p.metrics)
        if not samples:
            m.pop("samples")
        if p.metrics.server is not None:
            m["server"]["prefix_cache_hit_rate"] = p.metrics.server.prefix_cache_hit_rate
            m["server"]["graph_replay_share"] = p.metrics.server.graph_replay_share
        points.append(
            {
                "rate": p.rate,
                "max_concurrency": p.max_concurrency,
                "metrics": m,
                "client_cpu": list(p.client_cpu),
                "client_cpu_warning": p.client_warning,
            }
        )
    return _finite({"settings": run.settings, "server": run.server, "sweep": run.sweep, "points": points})


def _unfinite(x: Any) -> Any:
    return (
        {None: math.nan, "inf": math.inf, "-inf": -math.inf}.get(x, x)
        if not isinstance(x, list | dict)
        else x
    )


def from_json(data: dict[str, Any]) -> BenchRun:
    """The inverse of ``to_json`` (with samples): a run written on one machine, plotted on another."""
    points = []
    for p in data["points"]:
        m = dict(p["metrics"])
        for name in ("ttft", "tpot", "itl", "e2e"):
            m[name] = Distribution(**{k: _unfinite(v) for k, v in m[name].items()})
        m["slo"] = Slo(**m["slo"])
        server = m.get("server")
        if server is not None:
            m["server"] = ServerDelta(
                **{k: v for k, v in server.items() if k in ServerDelta.__dataclass_fields__}
            )
        for k in (
            "request_throughput",
            "output_throughput",
            "total_token_throughput",
            "goodput",
            "duration_s",
        ):
            m[k] = _unfinite(m[k])
        cpu = tuple(p.get("client_cpu", ()))  # absent in files written before it was measured
        points.append(BenchPoint(_unfinite(p["rate"]), p["max_concurrency"], BenchMetrics(**m), cpu))
    return BenchRun(data["settings"], data["server"], points, data["sweep"])


def write_json(path: Path, run: BenchRun) -> None:
    path.write_text(json.dumps(to_json(run), indent=1) + "\n", encoding="utf-8")


def markdown(run: BenchRun, plots: list[Path] | None = None) -> str:
    out = [
        "# kvrelay bench serve",
        "",
        f"Server: `{run.server.get('model')}` (max_model_len {run.server.get('max_model_len')}).",
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in run.settings.items()),
        "",
    ]
    if run.sweep is not None:
        header, body = _summary(run)
        out += ["## Sweep over " + run.sweep, "", _md_table(header, body), ""]
    for p in run.points:
        out += [
            f"## {p.label}",
            "",
            _md_table(["metric", "value"], [list(r) for r in _point_rows(p)]),
            "",
        ]
    for plot in plots or []:
        out += [f"![{plot.stem}]({plot.as_posix()})", ""]
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_plots(directory: Path, run: BenchRun) -> list[Path]:
    """Latency CDFs (one figure, a line per point) and, in a sweep, throughput and p99 TPOT against
    the swept value. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, _LATENCIES, strict=True):
        for p in run.points:
            xs = sorted(v * 1000.0 for v in p.metrics.samples[name])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=p.label)
        ax.set(
            title=f"{_LATENCY_TITLES[name]} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.01)
        )
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(directory / "latency_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    if run.sweep is not None:
        # an infinite rate has no place on the axis: it is in the table, not in the plot
        pts = [p for p in run.points if math.isfinite(_swept(run, p))]
        xs = [_swept(run, p) for p in pts]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(xs, [p.metrics.output_throughput for p in pts], marker="o", label="output tok/s")
        ax1.plot(xs, [p.metrics.total_token_throughput for p in pts], marker="o", label="total tok/s")
        ax1.set(title="Throughput", xlabel=run.sweep, ylabel="tokens/s")
        ax1.legend()
        ax2.plot(xs, [p.metrics.tpot.p99 * 1000.0 for p in pts], marker="o")
        ax2.set(title="p99 TPOT", xlabel=run.sweep, ylabel="ms")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(directory / f"sweep_{run.sweep}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _swept(run: BenchRun, p: BenchPoint) -> float:
    if run.sweep == "rate":
        return p.rate
    return math.inf if p.max_concurrency is None else float(p.max_concurrency)
