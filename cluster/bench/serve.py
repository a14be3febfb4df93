"""`kvrelay bench serve`: a load test of a running kvrelay server over gRPC or HTTP.

    kvrelay bench serve --server 127.0.0.1:50051 --workload sharegpt --num-requests 500 \\
        --request-rate 4,8,16 --json out.json --report out.md --plot-dir plots/
    kvrelay bench serve --protocol http --server 127.0.0.1:8000 --client-processes 4

An asyncio event loop drives every stream through `AsyncKvrelayClient` (gRPC) or
`bench_http.HttpBenchClient` (the OpenAI API's streaming completions); a request's times are taken
as its messages arrive (`metrics.RequestRecord`). With `--client-processes N` N processes
each run such a loop over their share of the schedule and their records are merged
(`loadgen.py`); each process's own CPU is reported, with a warning when one is saturated.
A run is: warm-up requests (waited for, excluded), a scrape of the server's Prometheus counters (with `--metrics-url`), the measured
requests sent on their arrival schedule, a second scrape. `--request-rate` or `--max-concurrency`
given as a comma-separated list makes a sweep: one run per value, same requests each time.
Bad flags raise ValueError naming the flag (the CLI prints one line, exit 2); a request that fails
is counted by its status code and the run goes on. docs/BENCH_SERVE.md has the definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loadgen import LoadGenerator, load_generator
from .metrics import (
    RequestRecord,
    ServerDelta,
    Slo,
    compute_metrics,
    parse_prometheus,
    server_delta,
)
from .report import BenchPoint, BenchRun, format_table, markdown, write_json, write_plots
from .workloads import (
    WORKLOADS,
    BenchRequest,
    LengthRange,
    arrival_offsets,
    calibration_text,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
    to_text,
    tokens_per_word,
)

log = logging.getLogger("kvrelay")

# Workers report counters with their polls (every 0.1 s when idle): wait this long after the last
# stream before the closing scrape so the run's last steps are in it.
_SCRAPE_SETTLE_S = 0.5
_CONNECT_TIMEOUT_S = 10.0
_MAX_CLIENT_PROCESSES = 256
_MAX_CONNECTIONS = 1024


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `kvrelay bench serve`. Values are checked by `BenchServeConfig`, not argparse,
    so that every bad value is one line naming its flag."""
    p.add_argument(
        "--server", default="127.0.0.1:50051", help="gRPC: HOST:PORT; http: the API's HOST:PORT or base URL"
    )
    p.add_argument("--protocol", default="grpc", help="grpc (default) or http (OpenAI /v1/completions)")
    p.add_argument(
        "--client-processes", default="1", help="load-generator processes, N or auto (by cores); default 1"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="gRPC connections per client process (streams round-robin over them); > 1 loads every "
        "process of a --router-processes server, which balances connections, not streams",
    )
    p.add_argument("--workload", default="random", help=f"one of {', '.join(WORKLOADS)}")
    p.add_argument("--num-requests", type=int, default=100, help="measured requests per run")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--warmup-requests", type=int, default=1, help="sent and awaited first, not measured")
    p.add_argument("--input-len", default="128", help="random: prompt tokens, N or LO:HI (uniform)")
    p.add_argument("--output-len", default="128", help="random, shared-prefix: output tokens, N or LO:HI")
    p.add_argument("--num-prefixes", type=int, default=8, help="shared-prefix: distinct system prompts")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens of a system prompt")
    p.add_argument("--suffix-len", default="32", help="shared-prefix: unique tokens after it, N or LO:HI")
    p.add_argument("--prompt-kind", default="ids", help="ids (token ids, default) or text")
    p.add_argument(
        "--want-text",
        action="store_true",
        help="gRPC, --prompt-kind ids: ask for text too (default: skip_text, no detokenization)",
    )
    p.add_argument("--request-rate", default="inf", help="req/s (inf: all at once); a list sweeps")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--max-concurrency", default=None, help="streams open at once; a list sweeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let EOS end requests before --output-len")
    p.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline, seconds")
    p.add_argument("--slo-ttft-ms", default="2000", help="goodput limit on TTFT (off: none)")
    p.add_argument("--slo-tpot-ms", default="100", help="goodput limit on TPOT (off: none)")
    p.add_argument("--slo-e2e-ms", default="off", help="goodput limit on E2E (off: none)")
    p.add_argument(
        "--metrics-url", default=None, help="the server's Prometheus endpoint, http://HOST:PORT/metrics"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results (with raw samples) here")
    p.add_argument("--report", type=Path, default=None, help="write a markdown report here")
    p.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: expected at least one value, got {text!r}")
    return values


def _slo_ms(text: str, flag: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag}: expected milliseconds or 'off', got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{flag} must be > 0 ms (or 'off'), got {text}")
    return value / 1000.0


def _csv(values: tuple[float | int | None, ...]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class BenchServeConfig:
    server: str
    workload: str
    num_requests: int
    duration_s: float | None
    warmup_requests: int
    input_len: LengthRange
    output_len: LengthRange
    num_prefixes: int
    prefix_len: int
    suffix_len: LengthRange
    prompt_kind: str
    rates: tuple[float, ...]
    concurrencies: tuple[int | None, ...]
    burstiness: float
    seed: int
    temperature: float
    ignore_eos: bool
    request_timeout_s: float
    slo: Slo
    protocol: str = "grpc"  # or "http"
    # Token-id prompts over gRPC ask for no text (skip_text: the router does not detokenize them, as
    # a token-in/token-out client would); want_text asks for it. Text prompts and HTTP always get text.
    want_text: bool = False
    client_processes: int = 1
    # gRPC connections per client process (cluster/bench/connections.py): > 1 spreads the streams
    # over several router processes, which SO_REUSEPORT balances by connection.
    connections: int = 1
    metrics_url: str | None = None
    json_path: Path | None = None
    report_path: Path | None = None
    plot_dir: Path | None = None
    progress: bool = True
    settings: dict[str, Any] = field(default_factory=dict, compare=False)  # the flags, for the report

    def __post_init__(self) -> None:
        checks = [
            (
                self.workload in WORKLOADS,
                f"--workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}",
            ),
            (self.num_requests >= 1, f"--num-requests must be >= 1, got {self.num_requests}"),
            (
                self.protocol in ("grpc", "http"),
                f"--protocol must be grpc or http, got {self.protocol!r}",
            ),
            (
                1 <= self.client_processes <= _MAX_CLIENT_PROCESSES,
                f"--client-processes must be 1 to {_MAX_CLIENT_PROCESSES} (or auto), got {self.client_processes}",
            ),
            (
                1 <= self.connections <= _MAX_CONNECTIONS,
                f"--connections must be 1 to {_MAX_CONNECTIONS}, got {self.connections}",
            ),
            (
                self.connections == 1 or self.protocol == "grpc",
                "--connections is for --protocol grpc (the HTTP client keeps a connection per stream)",
            ),
            (self.warmup_requests >= 0, f"--warmup-requests must be >= 0, got {self.warmup_requests}"),
            (
                self.duration_s is None or self.duration_s > 0,
                f"--duration must be > 0 s, got {self.duration_s}",
            ),
            (self.num_prefixes >= 1, f"--num-prefixes must be >= 1, got {self.num_prefixes}"),
            (self.prefix_len >= 1, f"--prefix-len must be >= 1, got {self.prefix_len}"),
            (
                self.prompt_kind in ("ids", "text"),
                f"--prompt-kind must be ids or text, got {self.prompt_kind!r}",
            ),
            (
                all(r > 0 for r in self.rates),
                f"--request-rate must be > 0 (inf: all at once), got {_csv(self.rates)}",
            ),
            (
                all(c is None or c >= 1 for c in self.concurrencies),
                f"--max-concurrency must be >= 1, got {_csv(self.concurrencies)}",
            ),
            (
                self.burstiness > 0 and math.isfinite(self.burstiness),
                f"--burstiness must be a finite number > 0, got {self.burstiness}",
            ),
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (self.request_timeout_s > 0, f"--request-timeout must be > 0 s, got {self.request_timeout_s}"),
            (
                len(self.rates) == 1 or len(self.concurrencies) == 1,
                "--request-rate and --max-concurrency: sweep one of them, not both",
            ),
        ]
        for path, flag in ((self.json_path, "--json"), (self.report_path, "--report")):
            checks.append(
                (
                    path is None or path.parent.is_dir(),
                    f"{flag}: directory {path and path.parent} does not exist",
                )
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def sweep(self) -> str | None:
        if len(self.rates) > 1:
            return "rate"
        return "concurrency" if len(self.concurrencies) > 1 else None

    @property
    def points(self) -> list[tuple[float, int | None]]:
        return [(r, c) for r in self.rates for c in self.concurrencies]


def parse_client_processes(text: str) -> int:
    from .loadgen import auto_client_processes

    if str(text).strip().lower() == "auto":
        return auto_client_processes()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--client-processes: expected an integer or auto, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> BenchServeConfig:
    conc: tuple[int | None, ...] = (None,)
    if args.max_concurrency is not None:
        raw = _float_list(args.max_concurrency, "--max-concurrency")
        if not all(c.is_integer() for c in raw):
            raise ValueError(f"--max-concurrency: expected integers, got {args.max_concurrency!r}")
        conc = tuple(int(c) for c in raw)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None}
    for k in ("command", "bench_command", "verbose", "json", "report", "plot_dir", "no_progress"):
        settings.pop(k, None)
    return BenchServeConfig(
        server=args.server,
        workload=args.workload,
        num_requests=args.num_requests,
        duration_s=args.duration,
        warmup_requests=args.warmup_requests,
        input_len=LengthRange.parse(args.input_len, "--input-len"),
        output_len=LengthRange.parse(args.output_len, "--output-len"),
        num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len,
        suffix_len=LengthRange.parse(args.suffix_len, "--suffix-len"),
        prompt_kind=args.prompt_kind,
        rates=_float_list(args.request_rate, "--request-rate"),
        concurrencies=conc,
        burstiness=args.burstiness,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        request_timeout_s=args.request_timeout,
        protocol=args.protocol,
        want_text=args.want_text,
        client_processes=parse_client_processes(args.client_processes),
        connections=args.connections,
        slo=Slo(
            _slo_ms(args.slo_ttft_ms, "--slo-ttft-ms"),
            _slo_ms(args.slo_tpot_ms, "--slo-tpot-ms"),
            _slo_ms(args.slo_e2e_ms, "--slo-e2e-ms"),
        ),
        metrics_url=args.metrics_url,
        json_path=args.json,
        report_path=args.report,
        plot_dir=args.plot_dir,
        progress=not args.no_progress,
        settings=settings,
    )


def build_requests(cfg: BenchServeConfig, info: Any) -> list[BenchRequest]:
    """Warm-up requests then measured ones, checked against the server's ModelInfo."""
    n, limit, vocab = cfg.warmup_requests + cfg.num_requests, int(info.max_model_len), int(info.vocab_size)
    if cfg.workload == "random":
        if cfg.input_len.hi + cfg.output_len.hi > limit:
            raise ValueError(
                f"--input-len/--output-len: {cfg.input_len.hi} + {cfg.output_len.hi} tokens exceed "
                f"the server's max_model_len {limit}"
            )
        reqs = random_requests(n, cfg.input_len, cfg.output_len, vocab, cfg.seed)
    elif cfg.workload == "sharegpt":
        reqs = sharegpt_requests(n, vocab, limit, cfg.seed)
    else:
        total = cfg.prefix_len + cfg.suffix_len.hi + cfg.output_len.hi
        if total > limit:
            raise ValueError(
                f"--prefix-len/--suffix-len/--output-len: {cfg.prefix_len} + {cfg.suffix_len.hi} + "
                f"{cfg.output_len.hi} tokens exceed the server's max_model_len {limit}"
            )
        reqs = shared_prefix_requests(
            n, cfg.num_prefixes, cfg.prefix_len, cfg.suffix_len, cfg.output_len, vocab, cfg.seed
        )
    if cfg.prompt_kind == "text" and not info.accepts_text:
        raise ValueError(f"--prompt-kind text: the server's model {info.model!r} has no tokenizer")
    return reqs


async def text_prompts(client: Any, requests: list[BenchRequest], max_model_len: int) -> list[BenchRequest]:
    """Text versions of the requests, sized with the server's own tokens per word (one 1-token
    calibration request, not measured)."""
    text = calibration_text(max_model_len)
    r = await client.generate(text, max_tokens=1, timeout=_CONNECT_TIMEOUT_S)
    return to_text(requests, tokens_per_word(text, r.usage.prompt_tokens))


async def send_one(client: Any, req: BenchRequest, cfg: BenchServeConfig) -> RequestRecord:
    """Streams one request, timing every message; a failure is recorded, never raised."""
    from ..client import KvrelayError

    rec = RequestRecord(sent=time.perf_counter(), prompt_tokens=req.prompt_len)
    try:
        stream = client.stream(
            req.prompt,
            max_tokens=req.output_len,
            temperature=cfg.temperature,
            ignore_eos=cfg.ignore_eos,
            skip_text=not isinstance(req.prompt, str) and not cfg.want_text,
            timeout=cfg.request_timeout_s,
        )
        async for chunk in stream:
            rec.messages.append((time.perf_counter(), len(chunk.token_ids)))
            if chunk.usage is not None:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.cached_prompt_tokens = chunk.usage.cached_prompt_tokens
    except KvrelayError as e:
        rec.error = e.code.name
    except Exception as e:  # a client-side failure of one request must not end the run
        rec.error = f"CLIENT_{type(e).__name__}"
    rec.ended = time.perf_counter()
    return rec


def open_client(cfg: BenchServeConfig) -> Any:
    """The client of --protocol, not yet connected: an async context manager with `wait_ready`,
    `model_info` and `generate` (gRPC's `AsyncKvrelayClient`, or `HttpBenchClient`)."""
    if cfg.protocol == "http":
        try:
            from .http_client import HttpBenchClient
        except ImportError:
            raise ValueError("--protocol http needs httpx: pip install 'kvrelay[bench]'") from None

        # connections >= the streams open at once (None: no limit), so keep-alive is never short
        concs = [c for c in cfg.concurrencies if c is not None]
        limit = max(concs) if len(concs) == len(cfg.concurrencies) else None
        return HttpBenchClient(cfg.server, limit)
    from ..client import AsyncKvrelayClient

    if cfg.connections > 1:
        from .connections import GrpcConnections

        return GrpcConnections(cfg.server, cfg.connections)
    return AsyncKvrelayClient(cfg.server)


async def send_request(client: Any, req: BenchRequest, cfg: BenchServeConfig) -> RequestRecord:
    if cfg.protocol == "http":
        return await client.send(req, cfg.temperature, cfg.ignore_eos, cfg.request_timeout_s)
    return await send_one(client, req, cfg)


async def drive(
    client: Any,
    requests: list[BenchRequest],
    offsets: Any,
    max_concurrency: int | None,
    cfg: BenchServeConfig,
    on_done: Any = None,
    start: float | None = None,
) -> list[RequestRecord]:
    """Sends each request at its offset (seconds from `start`, a `time.perf_counter()` value;
    default now) with at most max_concurrency streams open; a request waiting for a slot is sent
    when one frees (its TTFT starts then). With --duration, nothing is sent after that many
    seconds. Returns the records of requests sent."""
    start = time.perf_counter() if start is None else start
    deadline = math.inf if cfg.duration_s is None else start + cfg.duration_s
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None

    async def one(req: BenchRequest) -> RequestRecord | None:
        if slots is None:
            rec = await send_request(client, req, cfg)
        else:
            async with slots:
                if time.perf_counter() >= deadline:
                    return None
                rec = await send_request(client, req, cfg)
        if on_done is not None:
            on_done()
        return rec

    tasks: list[asyncio.Task[RequestRecord | None]] = []
    for req, offset in zip(requests, offsets, strict=True):
        delay = start + float(offset) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(one(req)))
    return [r for r in await asyncio.gather(*tasks) if r is not None]


def scrape(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return parse_prometheus(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"--metrics-url {url}: cannot read Prometheus metrics: {e}") from None


async def run_point(
    gen: LoadGenerator, cfg: BenchServeConfig, requests: list[BenchRequest], rate: float, conc: int | None
) -> BenchPoint:
    """One warm-up + measured run at this rate and concurrency."""
    from tqdm import tqdm

    warm, measured = requests[: cfg.warmup_requests], requests[cfg.warmup_requests :]
    if warm:
        await gen.run(warm, [0.0] * len(warm), conc)
    before = scrape(cfg.metrics_url) if cfg.metrics_url else None
    offsets = [float(o) for o in arrival_offsets(len(measured), rate, cfg.burstiness, cfg.seed + 1)]
    desc = f"rate {rate:g}" + ("" if conc is None else f", concurrency {conc}")
    with tqdm(total=len(measured), desc=desc, unit="req", disable=True if not cfg.progress else None) as bar:
        records, cpu = await gen.run(measured, offsets, conc, bar.update)
    delta: ServerDelta | None = None
    if before is not None and cfg.metrics_url:
        await asyncio.sleep(_SCRAPE_SETTLE_S)
        try:
            delta = server_delta(before, scrape(cfg.metrics_url))
        except ValueError as e:
            log.warning("no server-side figures for this run: %s", e)
    point = BenchPoint(rate, conc, compute_metrics(records, cfg.slo, delta), cpu)
    if point.client_warning is not None:
        sys.stderr.write(f"kvrelay: warning: {desc}: {point.client_warning}\n")
    return point


async def run(cfg: BenchServeConfig) -> BenchRun:
    from ..client import KvrelayError

    async with load_generator(cfg) as gen:
        try:
            await gen.client.wait_ready(_CONNECT_TIMEOUT_S)
            info = await gen.client.model_info(timeout=_CONNECT_TIMEOUT_S)
            requests = build_requests(cfg, info)
            if cfg.prompt_kind == "text":
                requests = await text_prompts(gen.client, requests, int(info.max_model_len))
        except KvrelayError as e:
            raise ValueError(f"--server {cfg.server}: {e.code.name}: {e.details}") from None
        points = [await run_point(gen, cfg, requests, rate, conc) for rate, conc in cfg.points]
    server = {"model": info.model, "max_model_len": info.max_model_len, "vocab_size": info.vocab_size}
    return BenchRun(cfg.settings | {"protocol": cfg.protocol}, server, points, cfg.sweep)


def run_bench_serve(args: argparse.Namespace) -> int:
    """`kvrelay bench serve`: 0 when some measured request succeeded, 1 when none did. Bad flags
    (and an unreachable server) raise ValueError naming the flag."""
    cfg = config_from_args(args)
    if cfg.metrics_url:
        scrape(cfg.metrics_url)  # an unreachable endpoint is a bad flag: say so before any load
    result = asyncio.run(run(cfg))
    sys.stdout.write(format_table(result))
    write_outputs(cfg, result)
    return 0 if any(p.metrics.completed for p in result.points) else 1


def write_outputs(cfg: BenchServeConfig, result: BenchRun) -> None:
    flag = "--plot-dir"
    try:
        plots = write_plots(cfg.plot_dir, result) if cfg.plot_dir is not None else []
        flag = "--json"
        if cfg.json_path is not None:
            write_json(cfg.json_path, result)
        flag = "--report"
        if cfg.report_path is not None:
            rel = [Path(os.path.relpath(p, cfg.report_path.parent)) for p in plots]
            cfg.report_path.write_text(markdown(result, rel), encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{flag}: cannot write: {e.strerror or e}") from None
