"""`kvrelay bench router`: the gRPC router's own cost under many concurrent streams, no model compute.

    kvrelay bench router --streams 64,256,1024 --workers 2 --step-ms 20 --ttft-ms 20 --json out.json

The server is `kvrelay serve`'s own (`cluster/serve.py`: router, gRPC server, signals, drain) in a
spawned child process. Its workers emit, every `--step-ms`, one token for every request they hold
(a decode step that costs nothing). With `--pool dataplane` (the default) each worker is its own
OS process behind the real data plane (`synthetic_worker.py`: a `DataPlaneServer` over a
synthetic loop), reached through a `DataPlanePool` as router processes reach Ray workers; with
`--pool inprocess` they are asyncio tasks of the server process (`SyntheticPool`), which
measures the router alone. The load-test harness (`cluster/bench/serve.py`) runs in this process; for each
`--streams` value it sends one warm-up wave of that many requests (not measured), then
`--requests-per-stream` x streams requests with at most `streams` open at once.

The synthetic model has no tokenizer unless `--tokenizer` names one (a GGUF file or a directory with
tokenizer.json); then the router has a text path, which the harness's token-id prompts skip
(`skip_text`) unless `--want-text` asks for text: the pair measures what detokenizing costs per token.

Figures per point, over the measured run only:
- server CPU: the child's utime + stime (/proc/PID/stat, every thread) per wall-second. Pool CPU:
  with `--pool dataplane` the worker processes' own (ticks, data plane I/O), and router CPU is the
  whole server process (gRPC, router, metrics, the data plane's client side); in process, the
  synthetic workers' share of the server's (making the deltas) and router CPU the rest. Both also
  per delivered token (us/token): issue 14's per-token CPU of the router and the worker. Client CPU is the harness's, one figure per
  client process (`--client-processes`, as `bench serve`'s): near 1.0 the client, not the router,
  is the limit, and the run warns.
- added TTFT: client TTFT - the synthetic TTFT. A worker emits a request's first token at its first
  tick once the request has waited `--ttft-ms`, so the wait it imposes is ttft plus up to one step,
  by the tick's phase (which a closed loop of streams does not make uniform); the pool measures
  those waits, and their mean over the run is what is subtracted (both are reported). Single
  requests' added TTFT is thus noisy by up to a step; the mean is exact.
- added ITL: client inter-token latency - `--step-ms` (one token per tick per request).
Both include the client's own latency (one Python process), as any client-side figure does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .loadgen import LoadGenerator, load_generator
from .metrics import Slo, compute_metrics
from .report import client_cpu_warning
from .serve import (
    BenchServeConfig,
    add_bench_serve_args,
    parse_client_processes,
)
from .serve import config_from_args as bench_serve_config
from .synthetic_pool import SYNTHETIC_MODEL, SyntheticPool
from .synthetic_worker import WorkerProcesses
from .workloads import LengthRange, random_requests

if TYPE_CHECKING:
    from ..dataplane import WorkerEndpoint

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0
_PUBLISH_S = 0.05  # how often the server child publishes its pool's figures


def _serve_child(
    cfg: BenchRouterConfig, conn: Connection, pool_stats: Any, endpoints: list[WorkerEndpoint] | None
) -> None:
    """The spawned server: `kvrelay serve` with its pool made synthetic; SIGTERM drains and stops it.
    endpoints: the worker processes' (a DataPlanePool); None: a SyntheticPool in this process, whose
    `stats()` is kept in pool_stats (3 doubles of shared memory, read by the parent)."""
    from .. import serve
    from ..config import ServerConfig
    from ..dataplane import DataPlanePool

    most = max(cfg.streams)
    config = ServerConfig(
        port=0,
        max_queued_requests=max(1024, 2 * most),
        max_queued_tokens=max(4 << 20, 2 * most * (cfg.input_len + cfg.output_len)),
        # Headroom over the streams the harness keeps open on its one connection: at exactly that many,
        # a stream the client has seen end may still count on the server, and the next one is
        # refused (RST_STREAM REFUSED_STREAM, UNAVAILABLE at the client) -- an error, not a cost.
        max_concurrent_streams=2 * max(1024, most),
    )
    tokenizer = None if cfg.tokenizer is None else str(cfg.tokenizer)
    pool: SyntheticPool | DataPlanePool
    if endpoints is None:
        pool = SyntheticPool(cfg.workers, cfg.step_ms / 1e3, cfg.ttft_ms / 1e3, tokenizer)
    else:
        model = replace(SYNTHETIC_MODEL, model_dir=tokenizer)
        pool = DataPlanePool(model, endpoints, router_id=f"bench-router-{os.getpid()}")

    if cfg.router_processes > 1:
        assert isinstance(pool, DataPlanePool) and endpoints is not None
        sys.exit(asyncio.run(_serve_routers(cfg, config, pool.model, endpoints, conn)))

    async def publish_stats() -> None:
        while isinstance(pool, SyntheticPool):
            pool_stats[:] = pool.stats()
            await asyncio.sleep(_PUBLISH_S)

    async def main() -> int:
        task = asyncio.create_task(publish_stats())
        try:
            return await serve.serve(config, ready=conn.send, pool=pool)
        finally:
            task.cancel()

    if cfg.profile_path is None:
        sys.exit(asyncio.run(main()))
    profiler = cProfile.Profile()  # the event loop's thread: the router, gRPC handlers, the pool
    try:
        code = profiler.runcall(asyncio.run, main())
    finally:
        profiler.dump_stats(cfg.profile_path)
    sys.exit(code)


async def _serve_routers(
    cfg: BenchRouterConfig, config: Any, model: Any, endpoints: list[WorkerEndpoint], conn: Connection
) -> int:
    """The server child as a controller of cfg.router_processes router processes (the controller
    of `kvrelay serve --router-processes`, without Ray: the workers are the synthetic processes)."""
    from ..grpc_server import format_address
    from ..router_procs import RouterProcesses, reserve_port

    reserved = reserve_port(config.host, 0, "port")
    port = reserved.getsockname()[1]
    routers = RouterProcesses(replace(config, port=port), cfg.router_processes, model, endpoints, None)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await routers.start()
        conn.send(format_address(config.host, port))
        await stop.wait()
        await routers.drain(0.0)
        await routers.wait_stopped(_STOP_TIMEOUT_S / 2)
        return 0
    finally:
        routers.close()
        reserved.close()


def _child_pids(pid: int) -> list[int]:
    """The direct children of a process (Linux /proc/PID/task/TID/children)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


class ServerChild:
    """The server process."""

    def __init__(self, cfg: BenchRouterConfig, workers: WorkerProcesses | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._workers = workers
        self._pool_stats = ctx.Array("d", 3, lock=False)
        receive, send = ctx.Pipe(duplex=False)
        endpoints = None if workers is None else workers.endpoints
        self.proc = ctx.Process(
            target=_serve_child,
            args=(cfg, send, self._pool_stats, endpoints),
            daemon=cfg.router_processes == 1,  # a daemonic process may not start router processes
        )
        self.proc.start()
        send.close()
        if not receive.poll(_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the router server did not start in {_START_TIMEOUT_S:g} s")
        try:
            self.address: str = receive.recv()
        except EOFError:
            self.stop()
            raise RuntimeError(
                f"the router server exited during start-up (code {self.proc.exitcode})"
            ) from None

    def stats(self) -> tuple[dict[int, float], float, float, int]:
        """({pid: CPU seconds} of the server process and its router processes, pool CPU seconds,
        summed synthetic TTFTs, first tokens): the pool's from the worker processes when there are
        any, else `SyntheticPool.stats()`."""
        from kvrelay.worker.cpu_time import process_cpu_seconds

        assert self.proc.pid is not None
        server_cpu = {self.proc.pid: process_cpu_seconds(self.proc.pid)}
        for child in _child_pids(self.proc.pid):  # router processes (--router-processes > 1)
            with contextlib.suppress(OSError):  # it exited meanwhile
                server_cpu[child] = process_cpu_seconds(child)
        if self._workers is not None:
            _, waits, firsts = self._workers.pool_stats()
            return server_cpu, self._workers.cpu_seconds(), waits, firsts
        pool_cpu, waits, firsts = self._pool_stats[:]
        return server_cpu, pool_cpu, waits, int(firsts)

    def stop(self) -> None:
        if self.proc.is_alive():
            assert self.proc.pid is not None
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.join(_STOP_TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ---- config, measurement, output --------------------------------------------------------------
@dataclass(frozen=True)
class BenchRouterConfig:
    streams: tuple[int, ...]
    workers: int = 2
    step_ms: float = 20.0
    ttft_ms: float = 20.0
    input_len: int = 128
    output_len: int = 64
    requests_per_stream: int = 2
    seed: int = 0
    client_processes: int = 1  # load-generator processes (`bench serve --client-processes`)
    json_path: Path | None = None
    profile_path: Path | None = None  # cProfile of the server process (pstats format)
    tokenizer: Path | None = None  # the router detokenizes the synthetic output with it; None: no text
    want_text: bool = False  # the harness asks for text (skip_text false); only matters with a tokenizer
    pool: str = "dataplane"  # "dataplane": worker processes behind the data plane; "inprocess": asyncio tasks
    # Router processes on one port (`kvrelay serve --router-processes`, docs/ROUTERS.md); > 1 needs
    # the dataplane pool. The kernel hashes each connection to one router, so every client process
    # opens `connections` of them (bench serve --connections) and the streams spread over all.
    router_processes: int = 1
    connections: int = 1

    def __post_init__(self) -> None:
        checks = [
            (
                bool(self.streams) and all(s >= 1 for s in self.streams),
                f"--streams must be >= 1, got {self.streams}",
            ),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (
                self.pool in ("dataplane", "inprocess"),
                f"--pool must be dataplane or inprocess, got {self.pool!r}",
            ),
            (math.isfinite(self.step_ms) and self.step_ms > 0, f"--step-ms must be > 0, got {self.step_ms}"),
            (
                math.isfinite(self.ttft_ms) and self.ttft_ms >= 0,
                f"--ttft-ms must be >= 0, got {self.ttft_ms}",
            ),
            (self.input_len >= 1, f"--input-len must be >= 1, got {self.input_len}"),
            (self.output_len >= 1, f"--output-len must be >= 1, got {self.output_len}"),
            (
                self.input_len + self.output_len <= SYNTHETIC_MODEL.max_model_len,
                f"--input-len/--output-len: {self.input_len} + {self.output_len} tokens exceed "
                f"max_model_len {SYNTHETIC_MODEL.max_model_len}",
            ),
            (self.client_processes >= 1, f"--client-processes must be >= 1, got {self.client_processes}"),
            (
                self.router_processes == 1 or (self.router_processes > 1 and self.pool == "dataplane"),
                f"--router-processes must be >= 1 (> 1 needs --pool dataplane), got {self.router_processes}",
            ),
            (
                self.requests_per_stream >= 1,
                f"--requests-per-stream must be >= 1, got {self.requests_per_stream}",
            ),
            (
                self.json_path is None or self.json_path.parent.is_dir(),
                f"--json: directory {self.json_path and self.json_path.parent} does not exist",
            ),
            (
                self.tokenizer is None or self.tokenizer.exists(),
                f"--tokenizer: {self.tokenizer} does not exist",
            ),
            (
                self.profile_path is None or self.profile_path.parent.is_dir(),
                f"--profile: directory {self.profile_path and self.profile_path.parent} does not exist",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of_ms(samples_s: Sequence[float], minus_ms: float) -> Percentiles:
        if not samples_s:
            return Percentiles(math.nan, math.nan, math.nan)
        a = np.asarray(samples_s) * 1e3 - minus_ms
        p50, p90, p99 = (float(x) for x in np.percentile(a, (50, 90, 99)))
        return Percentiles(p50, p90, p99)


@dataclass(frozen=True)
class RouterPoint:
    """One measured run at one number of concurrent streams."""

    streams: int
    requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    output_tokens: int
    wall_s: float  # the CPU window: the measured requests, first sent to last ended
    server_cpu: float  # CPU-seconds per wall-second, whole server process
    # Per process of the server over the run: the serving process first, then each router process
    # (--router-processes > 1), whose spread shows how evenly the connections fell on the routers.
    server_cpu_per_process: tuple[float, ...]
    pool_cpu: float  # the synthetic workers' (their processes, or their share of the server's)
    router_cpu: float  # the server's, less the pool's share when the pool runs in it
    client_cpu: float  # the harness, summed over its processes
    client_cpu_per_process: tuple[float, ...]  # each client process's, over the measured run
    request_throughput: float  # as the harness reports them
    output_throughput: float
    synthetic_ttft_ms: float  # mean wait the pool imposed before first tokens (ttft + tick phase)
    added_ttft_ms: Percentiles
    added_itl_ms: Percentiles
    # CPU microseconds per delivered output token: router (as router_cpu) and workers (as pool_cpu).
    router_cpu_us_per_token: float = math.nan
    worker_cpu_us_per_token: float = math.nan


def add_bench_router_args(p: argparse.ArgumentParser) -> None:
    """Values are checked by `BenchRouterConfig`, so every bad one is one line naming its flag."""
    p.add_argument("--streams", default="64,256,1024", help="concurrent streams; a comma list sweeps")
    p.add_argument("--workers", type=int, default=2, help="synthetic workers")
    p.add_argument(
        "--pool",
        default="dataplane",
        help="dataplane: worker processes behind the zmq data plane (default); inprocess: asyncio tasks",
    )
    p.add_argument("--step-ms", type=float, default=20.0, help="synthetic decode step: one token per request")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="synthetic time to first token")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (token ids)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens of every request")
    p.add_argument("--requests-per-stream", type=int, default=2, help="measured requests = this x streams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--client-processes", default="1", help="load-generator processes, N or auto (as bench serve's)"
    )
    p.add_argument(
        "--router-processes",
        type=int,
        default=1,
        help="router processes on one port (> 1: give --connections so every router gets streams)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=None,
        help="gRPC connections per client process (default: 4 x router processes, 1 with one router)",
    )
    p.add_argument("--json", type=Path, default=None, help="write settings and figures here")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a GGUF file or a directory with tokenizer.json: the router gets a text path (default: none)",
    )
    p.add_argument(
        "--want-text",
        action="store_true",
        help="with --tokenizer: the harness asks for text, so the router detokenizes every stream",
    )
    p.add_argument(
        "--profile", type=Path, default=None, help="cProfile the server process into this file (pstats)"
    )


def config_from_args(args: argparse.Namespace) -> BenchRouterConfig:
    try:
        streams = tuple(int(t) for t in args.streams.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--streams: expected comma-separated integers, got {args.streams!r}") from None
    return BenchRouterConfig(
        streams=streams,
        workers=args.workers,
        step_ms=args.step_ms,
        ttft_ms=args.ttft_ms,
        input_len=args.input_len,
        output_len=args.output_len,
        requests_per_stream=args.requests_per_stream,
        seed=args.seed,
        client_processes=parse_client_processes(args.client_processes),
        json_path=args.json,
        profile_path=args.profile,
        tokenizer=args.tokenizer,
        want_text=args.want_text,
        pool=args.pool,
        router_processes=args.router_processes,
        connections=args.connections
        if args.connections is not None
        else (1 if args.router_processes == 1 else 4 * args.router_processes),
    )


def _harness_config(cfg: BenchRouterConfig, server: ServerChild) -> BenchServeConfig:
    """The load-test harness's settings for this run (its streams are set per point)."""
    argv = [
        "--server", server.address, "--no-progress", "--client-processes", str(cfg.client_processes),
        "--connections", str(cfg.connections),
        "--workload", "random", "--prompt-kind", "ids", "--input-len", str(cfg.input_len),
        "--output-len", str(cfg.output_len), "--seed", str(cfg.seed),
        *(["--want-text"] if cfg.want_text else []),
    ]  # fmt: skip
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    return bench_serve_config(p.parse_args(argv))


async def measure(
    cfg: BenchRouterConfig, server: ServerChild, gen: LoadGenerator, streams: int
) -> RouterPoint:
    """One wave of `streams` requests (warm-up, not measured), then requests_per_stream waves with
    `streams` open at once; the CPU window is the measured run alone."""
    n = cfg.requests_per_stream * streams
    fixed_in, fixed_out = (
        LengthRange(cfg.input_len, cfg.input_len),
        LengthRange(cfg.output_len, cfg.output_len),
    )
    reqs = random_requests(streams + n, fixed_in, fixed_out, SYNTHETIC_MODEL.vocab_size, cfg.seed + streams)
    await gen.run(reqs[:streams], [0.0] * streams, streams)
    await asyncio.sleep(2 * _PUBLISH_S)
    (cpu0, pool0, waits0, firsts0), t0 = server.stats(), time.perf_counter()
    records, client_cpu = await gen.run(reqs[streams:], [0.0] * n, streams)
    wall = time.perf_counter() - t0
    await asyncio.sleep(2 * _PUBLISH_S)
    cpu1, pool1, waits1, firsts1 = server.stats()
    m = compute_metrics(records, Slo())
    per_process = tuple((cpu1[pid] - cpu0.get(pid, 0.0)) / wall for pid in cpu1)
    server_cpu, pool_cpu = sum(per_process), (pool1 - pool0) / wall
    router_cpu = server_cpu if cfg.pool == "dataplane" else server_cpu - pool_cpu
    per_token_us = 1e6 * wall / max(m.output_tokens, 1)
    synthetic_ttft_ms = (waits1 - waits0) / max(firsts1 - firsts0, 1) * 1e3
    return RouterPoint(
        streams=streams,
        requests=m.completed + m.failed,
        completed=m.completed,
        failed=m.failed,
        errors=dict(m.errors),
        output_tokens=m.output_tokens,
        wall_s=wall,
        server_cpu=server_cpu,
        server_cpu_per_process=per_process,
        pool_cpu=pool_cpu,
        router_cpu=router_cpu,
        client_cpu=sum(client_cpu),
        client_cpu_per_process=client_cpu,
        request_throughput=m.request_throughput,
        output_throughput=m.output_throughput,
        synthetic_ttft_ms=synthetic_ttft_ms,
        added_ttft_ms=Percentiles.of_ms(m.samples["ttft"], synthetic_ttft_ms),
        added_itl_ms=Percentiles.of_ms(m.samples["itl"], cfg.step_ms),
        router_cpu_us_per_token=router_cpu * per_token_us,
        worker_cpu_us_per_token=pool_cpu * per_token_us,
    )


async def _run_points(cfg: BenchRouterConfig, server: ServerChild) -> list[RouterPoint]:
    async with load_generator(_harness_config(cfg, server)) as gen:
        await gen.client.wait_ready(_START_TIMEOUT_S)
        return [await measure(cfg, server, gen, s) for s in cfg.streams]


def run_points(cfg: BenchRouterConfig) -> list[RouterPoint]:
    """Every --streams value in turn, on one server (and one set of worker processes)."""
    workers = None
    if cfg.pool == "dataplane":
        workers = WorkerProcesses.start(cfg.workers, cfg.step_ms / 1e3, cfg.ttft_ms / 1e3)
    try:
        server = ServerChild(cfg, workers)
        try:
            return asyncio.run(_run_points(cfg, server))
        finally:
            server.stop()
    finally:
        if workers is not None:
            workers.stop()


def format_table(points: Sequence[RouterPoint]) -> str:
    header = (
        "streams", "syn ttft", "srv cpu", "pool cpu", "router cpu", "client cpu", "req/s", "out tok/s",
        "router us/tok", "worker us/tok", "+ttft p50/p90/p99 ms", "+itl p50/p90/p99 ms", "failed",
    )  # fmt: skip

    def pct(p: Percentiles) -> str:
        return f"{p.p50:.1f}/{p.p90:.1f}/{p.p99:.1f}"

    rows = [
        (
            str(p.streams),
            f"{p.synthetic_ttft_ms:.1f}",
            f"{p.server_cpu:.2f}",
            f"{p.pool_cpu:.2f}",
            f"{p.router_cpu:.2f}"
            + (
                ""
                if len(p.server_cpu_per_process) == 1
                else " (" + "/".join(f"{c:.2f}" for c in p.server_cpu_per_process) + ")"
            ),
            "/".join(f"{c:.2f}" for c in p.client_cpu_per_process),
            f"{p.request_throughput:.1f}",
            f"{p.output_throughput:.0f}",
            f"{p.router_cpu_us_per_token:.1f}",
            f"{p.worker_cpu_us_per_token:.1f}",
            pct(p.added_ttft_ms),
            pct(p.added_itl_ms),
            str(p.failed),
        )
        for p in points
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return (
        "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])
        + "\n"
    )


def run_bench_router(args: argparse.Namespace) -> int:
    """`kvrelay bench router`: 0 when every measured request completed, else 1. Bad flags raise
    ValueError naming the flag."""
    cfg = config_from_args(args)
    points = run_points(cfg)
    where = "worker processes over the data plane" if cfg.pool == "dataplane" else "in-process workers"
    sys.stdout.write(f"{cfg.workers} synthetic {where}, step {cfg.step_ms:g} ms, ttft {cfg.ttft_ms:g} ms, ")
    sys.stdout.write(f"{os.cpu_count()} CPUs; CPU figures are CPU-seconds per wall-second\n")
    sys.stdout.write(format_table(points))
    for p in points:
        warning = client_cpu_warning(p.client_cpu_per_process)
        if warning is not None:
            sys.stderr.write(f"kvrelay: warning: {p.streams} streams: {warning}\n")
    if cfg.json_path is not None:
        paths = {k: str(v) for k, v in asdict(cfg).items() if isinstance(v, Path)}  # JSON has no Path
        settings = asdict(cfg) | paths | {"cpu_count": os.cpu_count()}
        doc = {
            "settings": settings,
            "points": [
                asdict(p) | {"client_cpu_warning": client_cpu_warning(p.client_cpu_per_process)}
                for p in points
            ],
        }
        try:
            cfg.json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--json: cannot write: {e.strerror or e}") from None
    return 0 if all(p.failed == 0 for p in points) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay bench router")
    add_bench_router_args(p)
    try:
        return run_bench_router(p.parse_args(argv))
    except ValueError as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
