"""`kvrelay serve --router-processes N` (N > 1): a controller and N router processes (docs/ROUTERS.md).

The controller (this module, the `kvrelay serve` process) owns Ray and the `RayWorkerPool`: worker
placement, restarts, the data-plane endpoints. It spawns N router processes
(cluster/router_process.py) with `multiprocessing`'s spawn, not as Ray actors: a router must bind
this host's port beside its siblings (SO_REUSEPORT), so it must run on this host, which a Ray actor
need not; a child process also gives a sentinel to watch and a pipe to order it with, and keeps Ray's
signal and log handling out of the serving path.

- Ports: the controller reserves the gRPC and HTTP ports first (a bound, never-listening socket with
  SO_REUSEPORT, held until exit), so port 0's pick is known and a restarted router gets the same one.
- Admission: max_queued_requests and max_queued_tokens are split evenly (each router gets
  total // N, at least 1). A connection lands on one router by the kernel's reuseport hash, and
  each process enforces its share without coordinating with the others.
- Endpoints: a worker that Ray restarts gets a new endpoint; the pool tells the controller, which
  tells every router (`DataPlanePool.set_endpoint`).
- Health: each router's gRPC health reports its own state; the controller's `health_port` reports
  SERVING only while every router does.
- Metrics: one endpoint on `metrics_port`, prometheus-client's multiprocess mode (cluster/metrics.py).
- A router process that dies is restarted (at most MAX_ROUTER_RESTARTS times per slot, logged), with
  a new data-plane identity: its clients' connections dropped (UNAVAILABLE), and each worker aborts
  the dead identity's requests when it stops sending keepalives (worker/dataplane.py).
- Disaggregated prefill/decode (`DisaggregatedPool`): the routers stream from the decode workers
  and relay each submit to this process, which orchestrates the handoff (cluster/handoff_relay.py).
- SIGTERM/SIGINT: every router drains with `drain_grace_s` (a second signal cuts it short); then the
  pool stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from .config import ServerConfig
from .dataplane import WorkerEndpoint
from .handoff_relay import MESSAGES as HANDOFF_MESSAGES
from .handoff_relay import serve_handoff
from .interfaces import ModelDescription
from .metrics_dir import make_metrics_dir, remove_metrics_dir
from .router_process import RouterSpec, router_main

log = logging.getLogger("kvrelay")

MAX_ROUTER_RESTARTS = 5  # per slot, over the server's life; past it the slot stays empty (logged)
_READY_S = 120.0  # a router's start: imports, tokenizer load, one heartbeat from every worker
_EXIT_MARGIN_S = 15.0  # beyond the drain grace, for a router to stop its servers and say BYE


def split_budget(config: ServerConfig, n: int) -> ServerConfig:
    """One router's config: an even share of the admission budget (at least 1 of each)."""
    return dataclasses.replace(
        config,
        max_queued_requests=max(1, config.max_queued_requests // n),
        max_queued_tokens=max(1, config.max_queued_tokens // n),
    )


def reserve_port(host: str, port: int, key: str) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket holding host:port for the routers (0: a free
    port; read it with getsockname). ValueError naming `key` when the port is taken."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"{key}: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


@dataclasses.dataclass
class _Router:
    """One slot's current process (the controller's view)."""

    index: int
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    ready: asyncio.Future[tuple[int, int | None]]
    serving: bool = False
    restarts: int = 0
    # Sends to the router, in order, off the event loop: a pipe send blocks while the router's
    # buffer is full, and a router blocked sending a large handoff to this loop would then wait
    # for it forever. The loop only ever reads, so every send completes.
    sender: ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kvrelay-router-pipe")
    )


class RouterProcesses:
    """N router processes over the controller's workers: start, forward, restart, drain."""

    def __init__(
        self,
        config: ServerConfig,
        n: int,
        model: ModelDescription,
        endpoints: list[WorkerEndpoint],
        metrics_dir: str | None,
        on_health: Callable[[bool], None] = lambda serving: None,
        handoff_pool: Any = None,
    ) -> None:
        """handoff_pool: a `DisaggregatedPool` whose handoffs the routers relay here
        (cluster/handoff_relay.py); None for colocated workers."""
        self._config = split_budget(config, n)
        self._handoff_pool = handoff_pool
        self._handoffs: set[asyncio.Future[None]] = set()
        self._n = n
        self._model = model
        self._endpoints = {e.rank: e for e in endpoints}  # latest known, by rank
        self._down: set[int] = set()
        self._metrics_dir = metrics_dir
        self._on_health = on_health
        self._ctx = multiprocessing.get_context("spawn")
        self._routers: list[_Router] = []
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._all_serving = False

    @classmethod
    def for_pool(
        cls,
        pool: Any,
        config: ServerConfig,
        n: int,
        ports: tuple[int, int | None],
        metrics_dir: str | None,
        on_health: Callable[[bool], None] = lambda serving: None,
    ) -> RouterProcesses:
        """N routers over a started pool (a `RayWorkerPool`: `endpoints`, `on_endpoint_change`),
        serving the reserved (grpc, http) ports; the controller keeps health and metrics itself."""
        port, http_port = ports
        own = dataclasses.replace(config, port=port, http_port=http_port, health_port=None, metrics_port=None)
        handoff_pool = pool if hasattr(pool, "handoff") else None  # disaggregated
        routers = cls(own, n, pool.model, pool.endpoints(), metrics_dir, on_health, handoff_pool)
        pool.on_endpoint_change(routers.set_endpoint)
        return routers

    @property
    def routers(self) -> list[_Router]:
        return self._routers

    @property
    def all_serving(self) -> bool:
        return len(self._routers) == self._n and all(
            r.serving and r.process.is_alive() for r in self._routers
        )

    async def start(self) -> tuple[int, int | None]:
        """Spawn every router; returns (grpc port, http port) once each accepts calls."""
        self._routers = [self._spawn(i, 0) for i in range(self._n)]
        gathering = asyncio.gather(*(r.ready for r in self._routers))
        # Interrupted (a signal during start-up), gather ends with CancelledError: retrieve it.
        gathering.add_done_callback(lambda f: f.cancelled() or f.exception())
        ports = await asyncio.wait_for(gathering, _READY_S)
        return ports[0]

    def set_endpoint(self, endpoint: WorkerEndpoint | None, rank: int) -> None:
        """The pool's endpoint listener: forward to every router (and to routers started later)."""
        if endpoint is None:
            self._down.add(rank)
        else:
            self._down.discard(rank)
            self._endpoints[rank] = endpoint
        for r in self._routers:
            self._send(r, ("endpoint", endpoint, rank))

    async def drain(self, grace_s: float) -> None:
        """Order every router to drain (again, with 0, to cut a drain short)."""
        self._stopping = True
        for r in self._routers:
            self._send(r, ("drain", grace_s))

    async def wait_stopped(self, timeout_s: float) -> None:
        """Wait for every router to exit; kill the ones still running after timeout_s."""
        deadline = self._loop.time() + timeout_s
        for r in self._routers:
            left = max(0.0, deadline - self._loop.time())
            await asyncio.to_thread(r.process.join, left)
            if r.process.is_alive():
                log.warning("router process %d did not stop in time: killing it", r.index)
                r.process.kill()
                await asyncio.to_thread(r.process.join, 5)
        self.close()

    def close(self) -> None:
        self._stopping = True
        for t in self._handoffs:  # their routers are gone: nobody waits for the answers
            t.cancel()
        for r in self._routers:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(r.conn.fileno())
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(r.process.sentinel)
            if r.process.is_alive():
                r.process.kill()
                r.process.join(5)
            r.sender.shutdown(wait=False)  # a send still blocked fails now that the router is gone
            r.conn.close()
            self._mark_dead(r)

    # ---- one router --------------------------------------------------------------------
    def _spawn(self, index: int, restarts: int) -> _Router:
        spec = RouterSpec(
            index=index,
            router_id=f"router{index}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            config=self._config,
            model=self._model,
            endpoints=tuple(self._endpoints[rank] for rank in sorted(self._endpoints)),
            log_level=logging.getLogger().getEffectiveLevel(),
            disaggregated=self._handoff_pool is not None,
        )
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=router_main, args=(spec, theirs), name=f"kvrelay-router-{index}")
        with _env(_metrics_env(self._metrics_dir)):  # read when the child imports prometheus_client
            process.start()
        theirs.close()
        router = _Router(index, process, ours, self._loop.create_future(), restarts=restarts)
        self._loop.add_reader(ours.fileno(), self._on_message, router)
        self._loop.add_reader(process.sentinel, self._on_exit, router)
        for rank in self._down:
            self._send(router, ("endpoint", None, rank))
        log.info("router process %d started (pid %d, %s)", index, process.pid, spec.router_id)
        return router

    def _send(self, r: _Router, msg: tuple[Any, ...]) -> None:
        with contextlib.suppress(RuntimeError):  # closed: the router is gone
            r.sender.submit(_send_now, r.conn, msg)

    def _on_message(self, r: _Router) -> None:
        try:
            msg = r.conn.recv()
        except (EOFError, OSError):
            self._loop.remove_reader(r.conn.fileno())
            return
        if msg[0] == "ready" and not r.ready.done():
            r.ready.set_result((msg[1], msg[2]))
        elif msg[0] == "serving":
            r.serving = bool(msg[1])
            self._publish_health()
        elif msg[0] in HANDOFF_MESSAGES and self._handoff_pool is not None:
            task = asyncio.ensure_future(
                serve_handoff(self._handoff_pool, msg, lambda reply: self._send(r, reply))
            )
            self._handoffs.add(task)
            task.add_done_callback(self._handoffs.discard)

    def _on_exit(self, r: _Router) -> None:
        self._loop.remove_reader(r.process.sentinel)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(r.conn.fileno())
        r.process.join(1.0)  # the sentinel closes as the process exits, a moment before it is reapable
        code = r.process.exitcode
        r.serving = False
        r.sender.shutdown(wait=False)
        r.conn.close()
        self._mark_dead(r)
        self._publish_health()
        if self._stopping:
            return
        if not r.ready.done():
            r.ready.set_exception(
                RuntimeError(f"router process {r.index} exited with {code} during start-up")
            )
            return
        if r.restarts >= MAX_ROUTER_RESTARTS:
            log.error(
                "router process %d exited with %s; %d restarts used: it stays down", r.index, code, r.restarts
            )
            return
        log.warning(
            "router process %d (pid %d) exited with %s: restarting it (%d/%d)",
            r.index, r.process.pid, code, r.restarts + 1, MAX_ROUTER_RESTARTS,
        )  # fmt: skip
        self._routers[r.index] = self._spawn(r.index, r.restarts + 1)

    def _mark_dead(self, r: _Router) -> None:
        if self._metrics_dir is not None and r.process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(r.process.pid, self._metrics_dir)

    def _publish_health(self) -> None:
        now = self.all_serving
        if now != self._all_serving:
            self._all_serving = now
            self._on_health(now)


def _send_now(conn: Connection, msg: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError, ValueError):  # a dead router: its exit is handled apart
        conn.send(msg)


async def _check_integrity(pool: Any) -> None:
    """After every router stopped: each worker's engine invariants (no KV block held by a request
    that no router owns any more). Logged, not fatal: the server is stopping either way."""
    try:
        await pool.check_integrity()
    except Exception as e:
        log.error("KV block integrity after drain: %s", e)
    else:
        log.info("KV block integrity after drain: ok on every healthy worker")


def _metrics_env(path: str | None) -> dict[str, str | None]:
    from .metrics import MULTIPROC_ENV

    return {MULTIPROC_ENV: path}


@contextlib.contextmanager
def _env(values: dict[str, str | None]) -> Any:
    """os.environ with values set (None: unset) while a child process is spawned, then restored."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def serve_controller(
    config: ServerConfig, n: int, *, ready: Callable[[str], None] | None = None
) -> int:
    """`kvrelay serve` with n > 1 router processes: serve until SIGTERM/SIGINT, then drain every
    router, stop the pool, return 0. ready(address) as in `cluster.serve.serve`."""
    from grpc_health.v1 import health, health_pb2

    from .grpc_server import build_health_only, format_address
    from .metrics import serve_aggregated
    from .serve import _Signals, make_pool

    signals = _Signals(asyncio.get_running_loop())
    reserved = [reserve_port(config.host, config.port, "port")]
    port = reserved[0].getsockname()[1]
    http_port = None
    if config.http_port is not None:
        reserved.append(reserve_port(config.host, config.http_port, "http_port"))
        http_port = reserved[1].getsockname()[1]
    pool: Any = make_pool(config)
    metrics_dir = make_metrics_dir() if config.metrics_port is not None else None
    health_servicer = health.aio.HealthServicer()
    status = health_pb2.HealthCheckResponse

    health_tasks: set[asyncio.Future[None]] = set()

    def on_health(serving: bool) -> None:
        for name in ("", "kvrelay.v1.Generation"):
            t = asyncio.ensure_future(
                health_servicer.set(name, status.SERVING if serving else status.NOT_SERVING)
            )
            health_tasks.add(t)
            t.add_done_callback(health_tasks.discard)

    routers: RouterProcesses | None = None
    health_server = None
    stop_metrics: Callable[[], None] | None = None
    try:
        noop: Callable[..., None] = lambda *args: None  # noqa: E731 (the routers handle requests)
        if not await signals.until_signal(pool.start(noop, noop, noop)):
            log.info("interrupted during start-up")
            return 0
        signals.install()
        on_health(False)
        routers = RouterProcesses.for_pool(pool, config, n, (port, http_port), metrics_dir, on_health)
        started = asyncio.ensure_future(routers.start())
        if not await signals.until_signal(started):
            log.info("interrupted during start-up")
            return 0
        if config.health_port is not None:
            health_server, bound = build_health_only(health_servicer, config.host, config.health_port)
            await health_server.start()
            log.info("gRPC health (plaintext) on %s", format_address(config.host, bound))
        if metrics_dir is not None:
            assert config.metrics_port is not None
            snapshot = lambda: [(w.rank, w.healthy, w.load) for w in pool.workers]  # noqa: E731
            mport, stop_metrics = serve_aggregated(config.host, config.metrics_port, metrics_dir, snapshot)
            log.info("metrics of %d routers on http://%s/metrics", n, format_address(config.host, mport))
        address = format_address(config.host, port)
        log.info("%d router processes serving %s", n, address)
        if ready is not None:
            ready(address)
        else:
            print(f"kvrelay serving on {address}", flush=True)
            if http_port is not None:
                print(f"kvrelay http on {format_address(config.host, http_port)}", flush=True)
        await signals.first.wait()
        log.info("draining %d routers (grace %.1f s)", n, config.drain_grace_s)
        await routers.drain(config.drain_grace_s)
        stopped = asyncio.ensure_future(routers.wait_stopped(config.drain_grace_s + _EXIT_MARGIN_S))
        if not await signals.until_signal(asyncio.shield(stopped), which=signals.second):
            log.info("second signal: ending the grace period now")
            await routers.drain(0.0)
        await stopped
        await _check_integrity(pool)
        return 0
    finally:
        signals.restore()
        if routers is not None:
            routers.close()
        if stop_metrics is not None:
            stop_metrics()
        if health_server is not None:
            await health_server.stop(0)
        await pool.stop()
        for sock in reserved:
            sock.close()
        remove_metrics_dir(metrics_dir)
        log.info("stopped")
