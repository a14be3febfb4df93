"""The load generator's processes: `kvrelay bench serve --client-processes N`.

One Python process drives only as many streams as one core can parse; past that its event loop,
not the server, sets the pace (AIPerf is multi-process for this reason). With N > 1 the harness
spawns N client processes, each with its own asyncio loop and its own client (gRPC channel or
HTTP connection pool), started once and kept for every point of a run.

For a point, the parent splits the schedule round-robin: process i gets requests i, i+k, i+2k, ...
(k = the processes in use) with their original arrival offsets, so the merged schedule is the one
asked for. A `--max-concurrency` C is split too (C // k each, the first C % k get one more); when
C < N only C processes take part. Every process starts its schedule at one common instant, a
`time.perf_counter()` value the parent picks: on Linux that clock is CLOCK_MONOTONIC, one clock
for every process of the machine, so the children's `RequestRecord`s merge into one
`compute_metrics` as if one process had taken them.

Each child measures its own CPU (every thread: `time.process_time`) over its run and returns it
per wall second with its records; the parent shows progress from one shared counter per child.
With one process (the default) the parent drives the requests itself and measures its own CPU the
same way. `LoadGenerator` is the one entry point: `bench serve` and `bench router` both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .metrics import RequestRecord
from .workloads import BenchRequest

if TYPE_CHECKING:
    from .serve import BenchServeConfig

_START_TIMEOUT_S = 120.0  # a child imports grpc/httpx and connects before it is ready
_START_MARGIN_S = 0.25  # the common start is this far ahead, so every child has its command
_POLL_S = 0.1
_CONNECT_TIMEOUT_S = 10.0


def auto_client_processes(cpu_count: int | None = None) -> int:
    """`--client-processes auto`: a quarter of the cores, 1 to 8 (the server shares the machine
    in a local run; one client process keeps up with tens of thousands of tokens per second)."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(8, cores // 4))


@dataclass(frozen=True)
class Share:
    """One process's part of a point's schedule."""

    requests: list[BenchRequest]
    offsets: list[float]  # seconds after the common start, the original ones
    max_concurrency: int | None


def split_schedule(
    requests: Sequence[BenchRequest], offsets: Sequence[float], max_concurrency: int | None, processes: int
) -> list[Share]:
    """Round-robin shares of the schedule for up to `processes` processes (fewer when the
    concurrency is lower: a process with no slot could never send)."""
    assert processes >= 1 and len(requests) == len(offsets)
    k = processes if max_concurrency is None else max(1, min(processes, max_concurrency))
    shares = []
    for i in range(k):
        conc = None if max_concurrency is None else max_concurrency // k + (i < max_concurrency % k)
        shares.append(Share(list(requests[i::k]), [float(o) for o in offsets[i::k]], conc))
    return [s for s in shares if s.requests]


@dataclass(frozen=True)
class ShareResult:
    records: list[RequestRecord]
    cpu: float  # CPU seconds per wall second over the run


# ---- the child ------------------------------------------------------------------------------
def _child(cfg: BenchServeConfig, conn: Connection, done: Any, index: int) -> None:
    """A client process: connects, says ready, then runs each `Share` it is sent until None."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child_loop(cfg, conn, done, index))


async def _child_loop(cfg: BenchServeConfig, conn: Connection, done: Any, index: int) -> None:
    from .serve import drive, open_client

    async with open_client(cfg) as client:
        try:
            await client.wait_ready(_CONNECT_TIMEOUT_S)
            await client.model_info(timeout=_CONNECT_TIMEOUT_S)  # the HTTP client learns the model id
        except Exception as e:
            conn.send(("error", f"--server {cfg.server}: {getattr(e, 'details', None) or e}"))
            return
        conn.send(("ready", None))

        def count() -> None:
            done[index] += 1

        while True:
            cmd = await asyncio.to_thread(conn.recv)
            if cmd is None:
                return
            share, start = cmd
            cpu0 = time.process_time()
            try:
                records = await drive(
                    client, share.requests, share.offsets, share.max_concurrency, cfg, count, start=start
                )
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))
                return
            wall = time.perf_counter() - start
            cpu = (time.process_time() - cpu0) / wall if wall > 0 else 0.0
            conn.send(("done", ShareResult(records, cpu)))


# ---- the parent -----------------------------------------------------------------------------
class ClientProcesses:
    """N spawned client processes, for every point of one run. Close with `close()`."""

    def __init__(self, cfg: BenchServeConfig, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self._done = ctx.Array("q", processes, lock=False)  # requests finished, one slot per child
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for i in range(processes):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_child, args=(cfg, theirs, self._done, i), daemon=True)
                proc.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)
            for i, conn in enumerate(self._conns):
                self._expect(conn, i, "ready", _START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _expect(self, conn: Connection, i: int, kind: str, timeout_s: float | None) -> Any:
        if timeout_s is not None and not conn.poll(timeout_s):
            raise RuntimeError(f"client process {i}: no answer in {timeout_s:g} s")
        try:
            got, value = conn.recv()
        except EOFError:
            raise RuntimeError(f"client process {i} exited (code {self._procs[i].exitcode})") from None
        if got == "error":
            raise ValueError(value)  # the child's own message (an unreachable --server names it)
        assert got == kind, (got, kind)
        return value

    async def drive(
        self,
        requests: Sequence[BenchRequest],
        offsets: Sequence[float],
        max_concurrency: int | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> tuple[list[RequestRecord], tuple[float, ...]]:
        """Runs the schedule across the processes: every record (in no particular order) and
        each taking part process's CPU per wall second."""
        shares = split_schedule(requests, offsets, max_concurrency, len(self._procs))
        self._done[:] = [0] * len(self._procs)
        start = time.perf_counter() + _START_MARGIN_S
        for conn, share in zip(self._conns, shares, strict=False):
            conn.send((share, start))
        busy = list(range(len(shares)))
        results: dict[int, ShareResult] = {}
        reported = 0
        while busy:
            await asyncio.sleep(_POLL_S)
            for i in [i for i in busy if self._conns[i].poll()]:
                results[i] = self._expect(self._conns[i], i, "done", None)
                busy.remove(i)
            for i in busy:
                if not self._procs[i].is_alive():
                    raise RuntimeError(f"client process {i} died (code {self._procs[i].exitcode})")
            total = sum(self._done[:])
            if on_progress is not None and total > reported:
                on_progress(total - reported)
                reported = total
        records = [r for i in sorted(results) for r in results[i].records]
        return records, tuple(results[i].cpu for i in sorted(results))

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()


# ---- the one entry point --------------------------------------------------------------------------
class LoadGenerator:
    """The load generator of one run: `client` (this process's: set-up calls, and the requests when
    --client-processes is 1) and, with more, the client processes, spawned at the first run and
    kept for the rest. Open with `load_generator(cfg)`."""

    def __init__(self, cfg: BenchServeConfig, client: Any) -> None:
        self.cfg = cfg
        self.client = client
        self._procs: ClientProcesses | None = None

    async def run(
        self,
        requests: Sequence[BenchRequest],
        offsets: Sequence[float],
        max_concurrency: int | None,
        on_progress: Callable[[int], Any] | None = None,
    ) -> tuple[list[RequestRecord], tuple[float, ...]]:
        """Sends the schedule; every record and each client process's CPU per wall second."""
        from .serve import drive

        if self.cfg.client_processes > 1:
            if self._procs is None:
                self._procs = await asyncio.to_thread(ClientProcesses, self.cfg, self.cfg.client_processes)
            return await self._procs.drive(requests, offsets, max_concurrency, on_progress)
        done = None if on_progress is None else (lambda: on_progress(1))
        cpu0, t0 = time.process_time(), time.perf_counter()
        records = await drive(self.client, list(requests), offsets, max_concurrency, self.cfg, done)
        wall = time.perf_counter() - t0
        return records, ((time.process_time() - cpu0) / wall if wall > 0 else 0.0,)

    async def close(self) -> None:
        if self._procs is not None:
            await asyncio.to_thread(self._procs.close)
            self._procs = None


@contextlib.asynccontextmanager
async def load_generator(cfg: BenchServeConfig) -> AsyncIterator[LoadGenerator]:
    """A `LoadGenerator` over a client of --protocol (not yet waited ready: the caller's set-up
    turns its errors into messages naming --server)."""
    from .serve import open_client

    async with open_client(cfg) as client:
        gen = LoadGenerator(cfg, client)
        try:
            yield gen
        finally:
            await gen.close()
