"""The router and its loopback gRPC server over a real Ray pool of CPU workers, driven from a
`LoopThread`, with the pool's worker down/up callbacks recorded: the fault and soak tests share it.

Use: `served = start_served(...)` inside a module fixture that takes `ray_local`, then
`served.stop()`. `start_served(routers=2)` serves the same pool through 2 router processes
instead (`kvrelay serve --router-processes 2`'s controller, in the test process): `served.router`
is then None and `served.router_pids()` names the processes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_helpers import LoopThread
from router_helpers import OWN_CONNECTION

from kvrelay.cluster.client import KvrelayClient
from kvrelay.cluster.config import ServerConfig, load_config
from kvrelay.cluster.disagg import DisaggregatedPool
from kvrelay.cluster.grpc_server import build_server
from kvrelay.cluster.pool import PoolTimeouts, RayWorkerPool
from kvrelay.cluster.router import GenerationRouter
from kvrelay.cluster.router_procs import RouterProcesses, reserve_port

VOCAB = 320  # the tiny model's


class RecordingRouter(GenerationRouter):
    """The router, also recording when each worker went down (and why) and came back."""

    def __init__(self, pool: Any, config: ServerConfig) -> None:
        super().__init__(pool, config)
        self.cond = threading.Condition()
        self.down: list[tuple[int, str, float]] = []  # (rank, why, time.monotonic())
        self.up: list[tuple[int, float]] = []

    def on_worker_down(self, rank: int, why: str) -> None:
        with self.cond:
            self.down.append((rank, why, time.monotonic()))
            self.cond.notify_all()
        super().on_worker_down(rank, why)

    def on_worker_up(self, rank: int) -> None:
        with self.cond:
            self.up.append((rank, time.monotonic()))
            self.cond.notify_all()
        super().on_worker_up(rank)

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout_s), (
                f"timed out after {timeout_s} s waiting for {what}"
            )


@dataclass
class Served:
    lt: LoopThread
    pool: Any  # RayWorkerPool or DisaggregatedPool
    router: RecordingRouter | None  # None: router processes serve (`routers`)
    server: Any  # grpc.aio.Server (None with router processes)
    address: str
    routers: RouterProcesses | None = None
    reserved: list[socket.socket] = field(default_factory=list)  # the routers' ports, held while they run
    http_address: str = ""  # the routers' HTTP API (config http_port set), else ""
    stopped: bool = field(default=False)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def client(self, *, own_connection: bool = False, **kw: Any) -> KvrelayClient:
        """own_connection: a connection of this client's own (by default, clients of this process
        share one, which lands on one router process)."""
        options = OWN_CONNECTION if own_connection else []
        return KvrelayClient(self.address, timeout=120.0, channel_options=options, **kw)

    def router_pids(self) -> list[int]:
        """The processes serving the port: the router processes, or this one."""
        if self.routers is None:
            return [os.getpid()]
        return [r.process.pid for r in self.routers.routers]

    def used_blocks(self) -> list[int | None]:
        """KV blocks in use on each worker, by rank (None: the worker is down)."""
        return [None if s is None else s.num_used_blocks for s in self.lt.run(self.pool.stats())]

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until every worker is healthy and its engine holds no KV block (integrity checked)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.lt.run(self.pool.check_integrity())
            stats = self.lt.run(self.pool.stats())
            if all(
                s is not None and s.num_used_blocks == 0 and s.num_free_blocks == s.num_kv_blocks
                for s in stats
            ):
                return
            assert time.monotonic() < deadline, f"not idle after {timeout_s} s: {stats}"
            time.sleep(0.05)

    def wait_healthy(self, rank: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.pool.workers[rank].healthy:
            assert time.monotonic() < deadline, f"worker {rank} did not come back within {timeout_s} s"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.routers is not None:
            self.lt.run(self.routers.drain(0.0))
            self.lt.run(self.routers.wait_stopped(15.0), timeout_s=30)
            self.lt.run(self.pool.stop())
            for sock in self.reserved:
                sock.close()
        else:
            assert self.router is not None
            self.lt.run(self.server.stop(0))
            self.lt.run(self.router.stop())
        self.lt.close()


def start_served(
    *,
    num_workers: int = 2,
    num_kv_blocks: int = 512,
    max_restarts: int = 3,
    timeouts: PoolTimeouts | None = None,
    disaggregated: tuple[int, int] | None = None,
    engine: dict[str, Any] | None = None,
    routers: int = 1,
    config: dict[str, Any] | None = None,
) -> Served:
    """Router + server on 127.0.0.1 (any free port) over `num_workers` tiny-model CPU actors,
    or over (prefill, decode) workers of a DisaggregatedPool. The caller must hold a Ray
    cluster (the `ray_local` fixture). routers > 1: that many router processes instead of the
    in-process router (colocated workers only). config: more top-level config keys."""
    lt = LoopThread()
    engine = {"num_kv_blocks": num_kv_blocks, **(engine or {})}
    cfg = load_config(None, {"port": 0, "device": "cpu", "engine": engine, **(config or {})})
    pool: Any
    if disaggregated is None:
        pool = RayWorkerPool(
            cfg.engine, num_workers=num_workers, device="cpu", max_restarts=max_restarts, timeouts=timeouts
        )
    else:
        pool = DisaggregatedPool(
            cfg.engine, *disaggregated, "cpu", max_restarts=max_restarts, timeouts=timeouts
        )

    async def start() -> Served:
        router = RecordingRouter(pool, cfg)
        await router.start()
        server, port = build_server(router, cfg)
        await server.start()
        return Served(lt, pool, router, server, f"127.0.0.1:{port}")

    async def start_routers() -> Served:
        # As `serve_controller` does: the pool here, its workers' endpoints handed to the routers.
        noop: Callable[..., None] = lambda *args: None  # noqa: E731
        await pool.start(noop, noop, noop)
        reserved = [reserve_port("127.0.0.1", 0, "port")]
        if cfg.http_port is not None:
            reserved.append(reserve_port("127.0.0.1", cfg.http_port, "http_port"))
        port, *http = [sock.getsockname()[1] for sock in reserved]
        procs = RouterProcesses.for_pool(pool, cfg, routers, (port, http[0] if http else None), None)
        try:
            await procs.start()
        except BaseException:
            procs.close()
            for sock in reserved:
                sock.close()
            await pool.stop()
            raise
        return Served(
            lt, pool, None, None, f"127.0.0.1:{port}", routers=procs, reserved=reserved,
            http_address=f"127.0.0.1:{http[0]}" if http else "",
        )  # fmt: skip

    try:
        return lt.run(start() if routers == 1 else start_routers(), timeout_s=180)
    except BaseException:
        lt.close()
        raise
