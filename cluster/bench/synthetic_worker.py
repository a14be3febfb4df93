"""Synthetic workers as OS processes behind the real data plane (`kvrelay bench router`).

Each process runs a `DataPlaneServer` (worker/dataplane.py) over a `SyntheticLoop`: a thread that
ticks every step_s with `SyntheticWorker.tick` (one token per held request, no model), publishes
the deltas like an engine loop and wakes the server's I/O thread through the same output hook.
The router reaches them through a `DataPlanePool`, so `bench router` measures the router and the
data plane as `kvrelay serve` runs them, with the workers' CPU out of the router's process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from kvrelay.worker.engine_loop import EngineLoopBroken
from kvrelay.worker.protocol import StepBatch, TokenDelta, WorkerLoad, WorkRequest

from ..dataplane import WorkerEndpoint
from .synthetic_pool import SyntheticWorker

_START_TIMEOUT_S = 30.0


class SyntheticLoop:
    """A `worker.dataplane.ServedLoop` whose step is `SyntheticWorker.tick` on a fixed schedule."""

    def __init__(self, worker: SyntheticWorker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._outbox: dict[str, TokenDelta] = {}  # merged until the I/O thread takes them
        self._hook: Callable[[], None] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="synthetic-loop", daemon=True)
        self._thread.start()

    @property
    def load(self) -> WorkerLoad:
        with self._lock:
            return self._worker.load

    def set_output_hook(self, hook: Callable[[], None] | None) -> None:
        self._hook = hook

    def submit_future(self, requests: Sequence[WorkRequest]) -> Future[dict[str, str]]:
        with self._lock:
            self._worker.add(requests)
        fut: Future[dict[str, str]] = Future()
        fut.set_result({})
        return fut

    def abort(self, request_ids: Sequence[str]) -> None:
        with self._lock:
            self._worker.cancel(request_ids)

    def take(self) -> StepBatch:
        with self._lock:
            if self._stopping and not self._outbox:
                raise EngineLoopBroken("the synthetic loop is shut down")
            deltas = list(self._outbox.values())
            self._outbox.clear()
            load = self._worker.load if deltas else WorkerLoad(0, 0, 0.0, 0, 0)
        return StepBatch(deltas=deltas, load=load)

    def thread_cpu_s(self) -> float:
        return self._worker.cpu_s

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(5)

    def _run(self) -> None:
        """Tick every step_s; a late tick is not made up with a burst (as `SyntheticWorker.run`)."""
        step = self._worker.step_s
        next_at = time.monotonic()
        while not self._stopping:
            next_at += step
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at -= delay
            time.sleep(max(delay, 0.0))
            with self._lock:
                deltas = self._worker.tick(time.monotonic())
                for d in deltas:
                    held = self._outbox.get(d.request_id)
                    if held is None:
                        self._outbox[d.request_id] = d
                    else:
                        held.merge(d)
            if deltas and self._hook is not None:
                self._hook()


def _worker_main(rank: int, step_s: float, ttft_s: float, conn: Connection, stats: Any) -> None:
    """One synthetic worker process: serve until SIGTERM; stats (3 doubles) as `SyntheticPool.stats`."""
    from kvrelay.worker.dataplane import DataPlaneServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = SyntheticWorker(rank, step_s, ttft_s)
    loop = SyntheticLoop(worker)
    server = DataPlaneServer(loop, "127.0.0.1", incarnation=f"synthetic-{rank}-{os.getpid()}")
    conn.send(server.address)
    while not stop.wait(0.05):
        stats[:] = (worker.cpu_s, worker.first_token_wait_s, float(worker.num_first_tokens))
    server.close()
    loop.stop()


@dataclasses.dataclass
class WorkerProcesses:
    """N synthetic worker processes; `endpoints` for a `DataPlanePool`."""

    procs: list[Any]
    endpoints: list[WorkerEndpoint]
    stats: list[Any]

    @classmethod
    def start(cls, n: int, step_s: float, ttft_s: float) -> WorkerProcesses:
        ctx = mp.get_context("spawn")
        procs: list[Any] = []
        endpoints: list[WorkerEndpoint] = []
        stats: list[Any] = []
        for rank in range(n):
            receive, send = ctx.Pipe(duplex=False)
            shared = ctx.Array("d", 3, lock=False)
            p = ctx.Process(target=_worker_main, args=(rank, step_s, ttft_s, send, shared), daemon=True)
            p.start()
            send.close()
            procs.append(p)
            stats.append(shared)
            if not receive.poll(_START_TIMEOUT_S):
                cls(procs, endpoints, stats).stop()
                raise RuntimeError(f"synthetic worker {rank} did not start in {_START_TIMEOUT_S:g} s")
            endpoints.append(WorkerEndpoint(rank, receive.recv(), f"synthetic-{rank}-{p.pid}"))
        return cls(procs, endpoints, stats)

    def pool_stats(self) -> tuple[float, float, int]:
        """(summed SyntheticWorker.cpu_s, summed first-token waits, first tokens), as last published."""
        rows = [s[:] for s in self.stats]
        return sum(r[0] for r in rows), sum(r[1] for r in rows), int(sum(r[2] for r in rows))

    def cpu_seconds(self) -> float:
        """Every worker process's CPU seconds (its tick thread, I/O thread and the rest)."""
        from kvrelay.worker.cpu_time import process_cpu_seconds

        return sum(process_cpu_seconds(p.pid) for p in self.procs if p.pid is not None and p.is_alive())

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
