"""The router's side of the data plane (`worker/dataplane.py`): one zmq DEALER per worker.

`DataPlaneClient` is a `WorkerClient` over one worker's `DataPlaneServer`; `DataPlanePool` is a
`WorkerPool` of them with no Ray at all, for router processes that do not own the workers (the
process that owns them, `RayWorkerPool`, is told their endpoints by Ray and hands them on).

Each router process connects with its own `router_id` (the DEALER's identity), so any number of
routers share every worker; a worker sends each router only the deltas of its own requests,
and heartbeats (LOAD) with its load to all of them.

Health without Ray: a worker that sends nothing (no heartbeat, no delta) for `timeouts.stall_s`,
that sends ERROR (its engine loop broke), or that holds work and makes no progress for
`timeouts.no_progress_s` is down: `on_worker_down` once, every pending submit fails with
ConnectionError. It is up again (`on_worker_up`) once a heartbeat arrives from the incarnation of
the endpoint last set for it (`set_endpoint`: Ray restarted it at a new address).

Threading: everything runs on the router's asyncio loop (zmq.asyncio sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from kvrelay.worker import wire
from kvrelay.worker.protocol import EngineStats, TokenDelta, WorkerLoad, WorkRequest
from kvrelay.worker.wire import Kind, WireError

from .interfaces import ModelDescription, WorkerClient, WorkerPool
from .pool_timeouts import PoolTimeouts
from .ray_util import ProgressWatchdog

log = logging.getLogger("kvrelay")

# A router says HELLO this often as a keepalive: a worker forgets a router silent for 10 s.
KEEPALIVE_S = 1.0
# At most this many queued messages are handled per wake-up before yielding to the event loop.
_BURST = 256

DeltasCallback = Callable[[int, list[TokenDelta]], None]


@dataclass(frozen=True)
class WorkerEndpoint:
    """What a router process needs to reach one worker (picklable: it crosses to router actors)."""

    rank: int
    address: str  # "tcp://ip:port" of the worker's DataPlaneServer
    incarnation: str  # changes when Ray restarts the actor


def empty_load(model: ModelDescription) -> WorkerLoad:
    blocks = model.kv_capacity_tokens // model.block_size
    return WorkerLoad(0, 0, 0.0, blocks, 0, num_kv_blocks=blocks)


class DataPlaneClient:
    """One worker as the router sees it (`cluster.interfaces.WorkerClient`)."""

    def __init__(
        self,
        rank: int,
        router_id: str,
        load: WorkerLoad,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.rank = rank
        self.router_id = router_id
        self._ctx = ctx or zmq.asyncio.Context.instance()
        # Sends and non-blocking receives go through a plain shadow of the socket (zmq.asyncio wraps
        # even those in futures); readability is the socket's FD watched by the event loop.
        self._sock: zmq.asyncio.Socket | None = None
        self._plain: zmq.Socket[bytes] | None = None
        self._readable = asyncio.Event()
        self._reader: tuple[asyncio.AbstractEventLoop, int] | None = None  # (loop, fd) watched
        self.endpoint: WorkerEndpoint | None = None
        self._healthy = False
        self._load = load
        self._empty = load
        self._seq = itertools.count()
        self._pending: dict[int, asyncio.Future[dict[str, str]]] = {}
        self._last_heard = 0.0
        self._last_hello = 0.0
        self._incarnation_heard: str | None = None  # of the latest heartbeat from endpoint's worker
        self._gone: str | None = None  # set by the owner (set_endpoint(None)): serve returns it
        self.num_messages = 0  # received: tests and benchmarks read it

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def load(self) -> WorkerLoad:
        return self._load

    @property
    def holds_work(self) -> bool:
        """Requests running or waiting as of the latest load, or a submit not yet answered."""
        return self._load.num_running + self._load.num_waiting > 0 or bool(self._pending)

    # ---- WorkerClient ----------------------------------------------------------------------------
    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        """Raises ConnectionError when the worker is down or goes down before it answers."""
        if not self._healthy or self._plain is None:
            raise ConnectionError(f"worker {self.rank} is unavailable")
        seq = next(self._seq)
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            self._send(wire.submit(seq, requests))  # never blocks: no high-water mark
            return await fut
        finally:
            self._pending.pop(seq, None)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Best effort: a down worker's requests are already gone."""
        if self._healthy and self._plain is not None and request_ids:
            self._send(wire.pack(Kind.ABORT, list(request_ids)))

    # ---- connection ------------------------------------------------------------------------------
    def connect(self, endpoint: WorkerEndpoint) -> None:
        """(Re)connect to this endpoint and say HELLO; healthy once its incarnation heartbeats."""
        assert endpoint.rank == self.rank, f"endpoint of worker {endpoint.rank} given to worker {self.rank}"
        self.close()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.router_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint.address)
        self._sock = sock
        self._plain = zmq.Socket.shadow(sock.underlying)
        self.endpoint = endpoint
        self._incarnation_heard = None
        self._gone = None
        self._last_heard = time.monotonic()
        self._say_hello()

    def close(self, *, bye: bool = False) -> None:
        if self._reader is not None:  # before the socket (and its FD) goes
            loop, fd = self._reader
            if not loop.is_closed():
                loop.remove_reader(fd)
            self._reader = None
        if self._sock is not None and self._plain is not None:
            if bye:
                with contextlib.suppress(zmq.ZMQError):
                    self._plain.send(wire.pack(Kind.BYE), zmq.NOBLOCK)
            self._sock.close(linger=100 if bye else 0)
            self._sock = self._plain = None

    @property
    def gone(self) -> str | None:
        """Why the owner said the worker is down, until the next connect."""
        return self._gone

    def forget_endpoint(self, why: str) -> None:
        """The owner says the worker is down: `serve` returns `why` within KEEPALIVE_S."""
        self._gone = why

    def mark_down(self) -> None:
        self._healthy = False
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"worker {self.rank} is unavailable"))

    def mark_up(self) -> None:
        self._load = self._empty
        self._healthy = True

    def _say_hello(self) -> None:
        self._last_hello = time.monotonic()
        self._send(wire.pack(Kind.HELLO, self.router_id), zmq.NOBLOCK)

    def _send(self, frame: bytes, flags: int = 0) -> None:
        assert self._plain is not None
        self._plain.send(frame, flags)
        # zmq's FD signals edges, not levels: a send processes the socket's pending commands and
        # may consume the signal of a message that arrived meanwhile, after which the FD stays
        # quiet and the receive loop would sleep until its timeout (seen: +1 s on ~10% of TTFTs).
        self._check_readable()

    def _check_readable(self) -> None:
        """Wake the receive loop if a message is waiting (reading EVENTS also resets the FD)."""
        if self._plain is not None and int(self._plain.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._readable.set()

    # ---- the receive loop ------------------------------------------------------------------------
    async def wait_heartbeat(self, timeout_s: float) -> bool:
        """After connect: True once the endpoint's incarnation heartbeats, False after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self._incarnation_heard is None or self._incarnation_heard != self._want():
            left = deadline - time.monotonic()
            if left <= 0 or self._sock is None:
                return False
            frame = await self._recv(min(left, KEEPALIVE_S))
            if frame is not None:
                self._dispatch(frame, None)
        return True

    async def serve(self, on_deltas: DeltasCallback, timeouts: PoolTimeouts) -> str:
        """Receive until the worker is down; returns why (the pool then calls on_worker_down)."""
        watchdog = ProgressWatchdog(timeouts.no_progress_s)
        while True:
            if self._sock is None:
                return f"worker {self.rank} has no endpoint"
            if self._gone is not None:
                return self._gone
            frame = await self._recv(min(timeouts.stall_s, KEEPALIVE_S))
            now = time.monotonic()
            if now - self._last_hello >= KEEPALIVE_S:
                self._say_hello()
            if frame is None:
                if now - self._last_heard >= timeouts.stall_s:
                    return f"worker {self.rank} sent no heartbeat for {timeouts.stall_s:g} s"
                continue
            progressed = False
            for _ in range(_BURST):
                outcome = self._dispatch(frame, on_deltas)
                if isinstance(outcome, str):
                    return outcome
                progressed |= outcome
                frame = self._recv_nowait()
                if frame is None:
                    break
            stalled_s = watchdog.observe(time.monotonic(), holds_work=self.holds_work, progressed=progressed)
            if stalled_s is not None:
                return f"worker {self.rank} stalled: no progress for {stalled_s:.1f} s"

    async def _recv(self, timeout_s: float) -> bytes | None:
        """The next message, or None after timeout_s (or a wake-up that found none)."""
        assert self._plain is not None
        if self._reader is None:
            loop = asyncio.get_running_loop()
            fd = int(self._plain.getsockopt(zmq.FD))
            loop.add_reader(fd, self._check_readable)
            self._reader = (loop, fd)
        frame = self._recv_nowait()
        if frame is not None:
            return frame
        self._readable.clear()
        self._check_readable()  # a message that arrived between the look and the clear
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._readable.wait(), timeout_s)
        return self._recv_nowait()

    def _recv_nowait(self) -> bytes | None:
        assert self._plain is not None
        try:
            return self._plain.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def _want(self) -> str | None:
        return None if self.endpoint is None else self.endpoint.incarnation

    def _dispatch(self, frame: bytes, on_deltas: DeltasCallback | None) -> bool | str:
        """Handle one message: whether it showed progress, or why the worker is down (ERROR)."""
        self.num_messages += 1
        try:
            kind, fields = wire.unpack(frame)
            if kind is Kind.DELTAS:
                deltas = [wire.decode_delta(x) for x in fields[0]]
                load, _ = wire.decode_load(fields[1])
                load.stats = self._load.stats  # the counters come with heartbeats
                self._last_heard = time.monotonic()
                progressed = bool(deltas) or _moved(load, self._load)
                self._load = load
                if deltas and on_deltas is not None:
                    _call(on_deltas, self.rank, deltas)
                return progressed
            if kind is Kind.LOAD:
                load, _ = wire.decode_load(fields[0])
                incarnation = fields[1]
                if incarnation != self._want():  # a previous incarnation's last words
                    return False
                self._incarnation_heard = incarnation
                self._last_heard = time.monotonic()
                progressed = _moved(load, self._load)
                self._load = load
                return progressed
            if kind is Kind.SUBMITTED:
                seq, refused = fields
                fut = self._pending.get(seq)
                if fut is not None and not fut.done():
                    fut.set_result({str(k): str(v) for k, v in refused.items()})
                return False
            if kind is Kind.ERROR:
                log.error("worker %d failed: %s", self.rank, fields[0])
                return f"worker {self.rank} failed: {fields[0]}"
            raise WireError(f"{kind.name} is not a worker's message")
        except (WireError, ValueError, TypeError, IndexError, AttributeError) as e:
            log.warning("data plane: dropped a malformed message from worker %d: %s", self.rank, e)
            return False


def _moved(new: WorkerLoad, old: WorkerLoad) -> bool:
    """Whether a worker's load shows progress: anything but its CPU clocks, which tick on every
    heartbeat even while its engine is stalled."""
    if new == old:
        return False
    return dataclasses.replace(new, stats=_no_cpu(new.stats)) != dataclasses.replace(
        old, stats=_no_cpu(old.stats)
    )


def _no_cpu(stats: EngineStats) -> EngineStats:
    return dataclasses.replace(stats, loop_cpu_s=0.0, io_cpu_s=0.0, process_cpu_s=0.0)


def _call(fn: Callable[..., None], *args: Any) -> None:
    """The router's bug must not stop the receive loop: log it and keep receiving."""
    try:
        fn(*args)
    except Exception:
        log.exception("pool callback %s(%r) raised", getattr(fn, "__name__", fn), args[0])


@dataclasses.dataclass(frozen=True)
class PoolCallbacks:
    on_deltas: DeltasCallback
    on_worker_down: Callable[[int, str], None]
    on_worker_up: Callable[[int], None]


async def watch_worker(
    client: DataPlaneClient,
    cb: PoolCallbacks,
    timeouts: PoolTimeouts,
    recover: Callable[[DataPlaneClient, str], Awaitable[None]],
    died: Callable[[DataPlaneClient], Awaitable[str]] | None = None,
) -> None:
    """Serve one worker for as long as the pool runs: down when it fails, up when it is back.

    recover(client, why): returns once the client was given (connect) the endpoint to try next.
    died(client): returns why when the control plane sees the worker die (Ray); None: only the
    data plane's own signs (silence, ERROR, no progress) count.
    """
    while True:
        serving = asyncio.ensure_future(client.serve(cb.on_deltas, timeouts))
        waits: list[asyncio.Future[str]] = [serving]
        if died is not None:
            waits.append(asyncio.ensure_future(died(client)))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in waits:
                f.cancel()
        why = next(iter(done)).result()
        client.mark_down()
        _call(cb.on_worker_down, client.rank, why)
        while True:
            await recover(client, why)
            if await client.wait_heartbeat(timeouts.stall_s):
                break
            why = f"worker {client.rank} did not heartbeat after it came back"
        client.mark_up()
        log.info("worker %d is serving again", client.rank)
        _call(cb.on_worker_up, client.rank)


class DataPlanePool:
    """`WorkerPool` over workers that another process owns: zmq only, no Ray."""

    def __init__(
        self,
        model: ModelDescription,
        endpoints: Sequence[WorkerEndpoint],
        *,
        router_id: str,
        timeouts: PoolTimeouts | None = None,
    ) -> None:
        ranks = sorted(e.rank for e in endpoints)
        if ranks != list(range(len(endpoints))) or not endpoints:
            raise ValueError(f"endpoints: need one per rank 0..N-1, got ranks {ranks}")
        if not router_id:
            raise ValueError("router_id must be a non-empty string")
        self._model = model
        self._timeouts = timeouts or PoolTimeouts()
        self._initial = {e.rank: e for e in endpoints}
        self._ctx = zmq.asyncio.Context()
        self._workers = [
            DataPlaneClient(rank, router_id, empty_load(model), self._ctx) for rank in range(len(endpoints))
        ]
        # rank -> set when set_endpoint gives it a new endpoint (kept in _next until connected)
        self._changed: dict[int, asyncio.Event] = {}
        self._next: dict[int, WorkerEndpoint] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def workers(self) -> Sequence[DataPlaneClient]:
        return self._workers

    @property
    def model(self) -> ModelDescription:
        return self._model

    async def start(
        self,
        on_deltas: DeltasCallback,
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        """Connect to every worker; one that does not heartbeat within stall_s starts down."""
        cb = PoolCallbacks(on_deltas, on_worker_down, on_worker_up)
        self._changed = {w.rank: asyncio.Event() for w in self._workers}
        for w in self._workers:
            w.connect(self._initial[w.rank])
        answered = await asyncio.gather(*(w.wait_heartbeat(self._timeouts.stall_s) for w in self._workers))
        for w, ok in zip(self._workers, answered, strict=True):
            if ok:
                w.mark_up()
            self._tasks.append(asyncio.create_task(self._run(w, cb, ok), name=f"kvrelay-dataplane-{w.rank}"))

    async def _run(self, w: DataPlaneClient, cb: PoolCallbacks, up: bool) -> None:
        if not up:
            _call(cb.on_worker_down, w.rank, f"worker {w.rank} did not answer at start")
            await self._recover(w, "")
            while not await w.wait_heartbeat(self._timeouts.stall_s):
                await self._recover(w, "")
            w.mark_up()
            _call(cb.on_worker_up, w.rank)
        await watch_worker(w, cb, self._timeouts, self._recover)

    async def _recover(self, w: DataPlaneClient, why: str) -> None:
        """Returns once w is connected to the endpoint to try next: the one set_endpoint gave, or
        (unless the owner said the worker is down) the same one again after probe_interval_s."""
        event = self._changed[w.rank]
        if w.gone is not None and w.rank not in self._next:
            await event.wait()
        elif w.rank not in self._next:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), self._timeouts.probe_interval_s)
        event.clear()
        endpoint = self._next.pop(w.rank, None) or w.endpoint
        if endpoint is not None:
            w.connect(endpoint)

    def set_endpoint(self, endpoint: WorkerEndpoint | None, rank: int) -> None:
        """Worker `rank` restarted at `endpoint`, or is down (None). A healthy worker is taken
        down first (its requests died with the old incarnation), then up once the new one
        heartbeats."""
        w = self._workers[rank]
        if endpoint is None:
            self._next.pop(rank, None)
            w.forget_endpoint(f"worker {rank} is down (its owner says so)")
            return
        if endpoint == w.endpoint and w.gone is None:
            return
        assert endpoint.rank == rank, f"endpoint of worker {endpoint.rank} set for worker {rank}"
        self._next[rank] = endpoint
        w.forget_endpoint(f"worker {rank} restarted (incarnation {endpoint.incarnation})")
        if rank in self._changed:
            self._changed[rank].set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for w in self._workers:
            w.close(bye=True)
            w.mark_down()
        self._ctx.term()


if TYPE_CHECKING:

    def _implements(pool: DataPlanePool, client: DataPlaneClient) -> tuple[WorkerPool, WorkerClient]:
        return pool, client
