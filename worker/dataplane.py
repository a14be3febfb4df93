"""The worker's data plane: submits, aborts and token deltas over one zmq ROUTER socket, no Ray.

Ray stays the control plane (actor lifecycle, restarts, stats); this carries the per-step
traffic. One I/O thread owns the socket (zmq sockets are single-threaded) and:

- receives routers' messages (`worker/wire.py`): HELLO registers a router (identity = its
  router_id), SUBMIT queues requests on the `EngineLoop` without waiting for the loop (the
  answer goes out as SUBMITTED when the loop applied them), ABORT stops that router's own
  requests, BYE aborts all of them and forgets the router;
- pushes deltas: the loop's output hook wakes the thread once per step that published output;
  it takes the outbox (merged while it was busy sending) and sends each router a DELTAS message
  with only the deltas of requests that router submitted (request_id -> router identity);
- sends LOAD(load, incarnation) every heartbeat_s to every router, idle or not, and ERROR(message)
  instead once the loop is broken, so routers take the worker down at once;
- forgets a router that has sent nothing for router_timeout_s and aborts its requests (their
  streams died with it; routers send HELLO as a keepalive), and aborts requests `claim`ed for a
  router it does not know (a controller's reserve for a router that died: docs/ROUTERS.md).

Nothing a router sent is unpickled: frames are msgpack, decoded into our dataclasses, and a
malformed frame is logged and dropped. The loop thread's only extra work per step is the hook
(one flag check and at most one inproc send).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import zmq

from . import hop_trace, wire
from .protocol import SHUT_DOWN, EngineLoopBroken, EngineStats, StepBatch, TokenDelta, WorkerLoad, WorkRequest
from .wire import Kind, WireError

log = logging.getLogger("kvrelay")

_ids = itertools.count()


class ServedLoop(Protocol):
    """What the server needs of a loop: `EngineLoop`, or a synthetic one (`kvrelay bench router`)."""

    @property
    def load(self) -> WorkerLoad: ...

    def set_output_hook(self, hook: Callable[[], None] | None) -> None: ...

    def submit_future(self, requests: Sequence[WorkRequest]) -> Future[dict[str, str]]: ...

    def abort(self, request_ids: Sequence[str]) -> None: ...

    def take(self) -> StepBatch:
        """Everything published since the last take; EngineLoopBroken once the loop stopped."""
        ...

    def thread_cpu_s(self) -> float: ...


class DataPlaneServer:
    def __init__(
        self,
        loop: ServedLoop,
        host: str = "127.0.0.1",
        *,
        incarnation: str = "",
        heartbeat_s: float = 0.1,
        router_timeout_s: float = 10.0,
        process_cpu_s: Callable[[], float] = time.process_time,
        extra_sockets: Sequence[tuple[zmq.Socket[bytes], Callable[[], None]]] = (),
    ) -> None:
        """extra_sockets: (socket, handler) pairs the I/O thread also polls, calling the handler
        (on the I/O thread, which then owns the socket) when the socket is readable; the data
        plane's own process reads its link to the engine loop so (worker/dataplane_front.py)."""
        if not heartbeat_s > 0 or not router_timeout_s > heartbeat_s:
            raise ValueError(
                f"heartbeat_s ({heartbeat_s}) must be > 0 and < router_timeout_s ({router_timeout_s})"
            )
        self._loop = loop
        self._process_cpu_s = process_cpu_s  # the worker's CPU (its processes, when the loop is in another)
        self._extra = list(extra_sockets)
        self.incarnation = incarnation
        self._heartbeat_s = heartbeat_s
        self._router_timeout_s = router_timeout_s
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a router reconnecting under its id takes over
        self._sock.setsockopt(zmq.SNDHWM, 0)  # never drop a delta; a router that stops reading is down
        self._sock.setsockopt(zmq.RCVHWM, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        # Wake-ups of the I/O thread (output hook, submit answers, claims): inproc PAIR. The sender
        # is shared by the loop thread and Ray's threads, so sends go under a lock; `_woken` keeps
        # it to one pending wake-up.
        wake_addr = f"inproc://kvrelay-dataplane-{next(_ids)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._woken = False
        self._wake_closed = False  # set (under the lock) when the I/O thread closed the sockets
        # Guarded by _owner_lock: request id -> the identity of the router that submitted it.
        self._owner_lock = threading.Lock()
        self._owners: dict[str, bytes] = {}
        # Claims not yet checked against the routers this server knows: id -> (identity, when).
        # A claim for a router that is gone (it died, and was forgotten, before the controller's
        # reserve for it landed) would run unobserved to its end: the heartbeat aborts it.
        self._claims: dict[str, tuple[bytes, float]] = {}
        # I/O thread only:
        self._routers: dict[bytes, float] = {}  # identity -> when it was last heard from
        self._answers: deque[tuple[bytes, int, Future[dict[str, str]], dict[str, str]]] = deque()
        self._broken: str | None = None
        self._stopping = False
        self.io_cpu_s = 0.0  # the I/O thread's CPU seconds, updated every wake-up
        self.num_messages_in = 0
        self.num_malformed = 0
        loop.set_output_hook(self._wake)
        self._thread = threading.Thread(target=self._run, name="kvrelay-dataplane", daemon=True)
        self._thread.start()

    # ---- other threads -----------------------------------------------------------------------
    def claim(self, request_ids: Sequence[str], router_id: str) -> None:
        """Deltas of these ids go to `router_id` (requests added by a Ray call, not a SUBMIT: a
        decode worker's reserved handoffs)."""
        ident = router_id.encode()
        now = time.monotonic()
        with self._owner_lock:
            for rid in request_ids:
                self._owners[rid] = ident
                self._claims[rid] = (ident, now)

    def release_all(self) -> None:
        """Forget every request's owner (the loop was reset: it holds none of them any more)."""
        with self._owner_lock:
            self._owners.clear()
            self._claims.clear()

    def release(self, request_ids: Sequence[str]) -> None:
        with self._owner_lock:
            for rid in request_ids:
                self._owners.pop(rid, None)
                self._claims.pop(rid, None)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout_s)
        self._loop.set_output_hook(None)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._woken or self._wake_closed:
                return
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
                self._woken = True
            except zmq.ZMQError:  # never raise into the engine loop's thread
                pass

    # ---- the I/O thread ----------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        for sock, _ in self._extra:
            poller.register(sock, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while not self._stopping:
                timeout_ms = max(0.0, next_beat - time.monotonic()) * 1e3 + 1
                events = dict(poller.poll(int(timeout_ms)))
                if self._wake_rx in events:
                    self._drain_wakes()
                if self._sock in events:
                    self._receive()
                for sock, handle in self._extra:
                    if sock in events:
                        handle()
                self._send_answers()
                self._push()
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + self._heartbeat_s
                self.io_cpu_s = time.thread_time()
        except Exception:
            log.exception("the data plane's I/O thread crashed")
        finally:
            self._sock.close(0)
            self._wake_rx.close(0)
            with self._wake_lock:
                self._wake_closed = True
                self._wake_tx.close(0)

    def _drain_wakes(self) -> None:
        # Cleared and drained under the lock `_wake` sends under: `_woken` is True exactly while a
        # wake-up is pending. (Clearing it, then draining outside the lock, could swallow a wake-up
        # sent in between and leave `_woken` stuck True: every later hook was then skipped and the
        # thread only woke on heartbeats, delivering tokens in 100 ms bursts.) Whatever the drained
        # wake-ups announced is taken by the `_push` and `_send_answers` that follow.
        with self._wake_lock:
            self._woken = False
            while True:
                try:
                    self._wake_rx.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return

    def _receive(self) -> None:
        for _ in range(1000):  # bounded so outputs and heartbeats are never starved
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.num_messages_in += 1
            if len(frames) != 2:
                self._malformed(frames[0] if frames else b"?", f"{len(frames)} frames, not 2")
                continue
            ident, payload = frames
            try:
                kind, fields = wire.unpack(payload)
                self._handle(ident, kind, fields)
            except WireError as e:
                self._malformed(ident, str(e))

    def _malformed(self, ident: bytes, why: str) -> None:
        self.num_malformed += 1
        log.warning("data plane: dropped a malformed message from %r: %s", ident[:64], why)

    def _handle(self, ident: bytes, kind: Kind, fields: list[Any]) -> None:
        if kind is Kind.HELLO:
            known = ident in self._routers
            self._routers[ident] = time.monotonic()
            if not known:
                log.info("data plane: router %r connected", ident.decode(errors="replace"))
                self._send(ident, self._beat_frame(self._loop.load))
            return
        if ident not in self._routers:
            raise WireError(f"{kind.name} before HELLO")
        self._routers[ident] = time.monotonic()
        if kind is Kind.SUBMIT:
            if len(fields) != 2 or not isinstance(fields[0], int) or not isinstance(fields[1], list):
                raise WireError("SUBMIT is [seq, [request]]")
            self._submit(ident, fields[0], fields[1])
        elif kind is Kind.ABORT:
            if len(fields) != 1 or not isinstance(fields[0], list):
                raise WireError("ABORT is [[id]]")
            with self._owner_lock:
                ids = [rid for rid in fields[0] if isinstance(rid, str) and self._owners.get(rid) == ident]
            if ids:
                self._loop.abort(ids)
        elif kind is Kind.BYE:
            self._forget(ident, "said BYE")
        else:
            raise WireError(f"{kind.name} is not a router's message")

    def _submit(self, ident: bytes, seq: int, items: list[Any]) -> None:
        requests: list[WorkRequest] = []
        refused: dict[str, str] = {}
        with self._owner_lock:
            for item in items:
                try:
                    r = wire.decode_request(item)
                except WireError as e:
                    rid = item[0] if isinstance(item, list) and item and isinstance(item[0], str) else None
                    if rid is None:
                        raise
                    refused[rid] = str(e)
                    continue
                if r.request_id in self._owners:  # another router's, or its final delta is unsent
                    refused[r.request_id] = f"request_id {r.request_id!r} is already in use"
                    continue
                self._owners[r.request_id] = ident
                requests.append(r)
        if not requests:
            self._send(ident, wire.pack(Kind.SUBMITTED, seq, refused))
            return
        if hop_trace.ENABLED:
            hop_trace.mark("worker_recv", [r.request_id for r in requests])
        try:
            fut = self._loop.submit_future(requests)
        except EngineLoopBroken as e:
            self._send(ident, wire.pack(Kind.ERROR, str(e)))
            return
        self._answers.append((ident, seq, fut, refused))
        fut.add_done_callback(lambda _: self._wake())

    def _send_answers(self) -> None:
        while self._answers and self._answers[0][2].done():
            ident, seq, fut, refused = self._answers.popleft()
            try:
                refused.update(fut.result())
            except EngineLoopBroken as e:
                self._send(ident, wire.pack(Kind.ERROR, str(e)))
                continue
            if refused:
                self.release(list(refused))
            self._send(ident, wire.pack(Kind.SUBMITTED, seq, refused))

    def _push(self) -> None:
        """Take what the loop published and send each router its own deltas."""
        try:
            batch = self._loop.take()
        except EngineLoopBroken as e:
            if self._broken is None:
                self._broken = str(e)
                # A loop shut down on purpose (the actor stops) is not an error worth paging on.
                shut_down = str(e) == SHUT_DOWN
                (log.info if shut_down else log.error)("data plane: the engine loop stopped: %s", e)
                for ident in self._routers:
                    self._send(ident, wire.pack(Kind.ERROR, self._broken))
            return
        if not batch.deltas:
            return
        assert batch.load is not None
        by_router: dict[bytes, list[TokenDelta]] = {}
        orphans: list[TokenDelta] = []
        with self._owner_lock:
            for d in batch.deltas:
                owner = self._owners.pop(d.request_id, None) if d.finished else self._owners.get(d.request_id)
                if owner is None:
                    orphans.append(d)
                else:
                    by_router.setdefault(owner, []).append(d)
        if orphans:  # owner unknown (added outside the data plane): every router, which ignore ids not theirs
            for ident in self._routers:
                by_router.setdefault(ident, []).extend(orphans)
        for ident, ds in by_router.items():
            self._send(ident, wire.deltas(ds, batch.load))
        if hop_trace.ENABLED:
            hop_trace.mark("worker_send_first", [d.request_id for d in batch.deltas if _has_first(d)])
        if batch.load.num_running + batch.load.num_waiting == 0:
            # Gone idle: the counters (which ride on heartbeats only) go out now, so a scrape right
            # after the last stream ended sees its final figures.
            frame = self._beat_frame(batch.load)
            for ident in self._routers:
                self._send(ident, frame)

    def _heartbeat(self, now: float) -> None:
        for ident, seen in list(self._routers.items()):
            if now - seen > self._router_timeout_s:
                self._forget(ident, f"was silent for {now - seen:.1f} s")
        if self._claims:
            self._abort_orphan_claims(now)
        if not self._routers:
            return
        frame = (
            wire.pack(Kind.ERROR, self._broken)
            if self._broken is not None
            else self._beat_frame(self._loop.load)
        )
        for ident in self._routers:
            self._send(ident, frame)

    def _beat_frame(self, load: WorkerLoad) -> bytes:
        load = dataclasses.replace(load, stats=self.with_cpu(load.stats))
        return wire.pack(Kind.LOAD, wire.encode_load(load), self.incarnation)

    def with_cpu(self, stats: EngineStats) -> EngineStats:
        """stats with this worker's CPU seconds: the loop thread's, the I/O thread's, the process's."""
        return dataclasses.replace(
            stats,
            loop_cpu_s=self._loop.thread_cpu_s(),
            io_cpu_s=self.io_cpu_s,
            process_cpu_s=self._process_cpu_s(),
        )

    def _abort_orphan_claims(self, now: float) -> None:
        """Claims older than one heartbeat whose router this server does not know: abort them. A
        known router's claims need no more checking (forgetting it aborts all it owns)."""
        orphans = []
        with self._owner_lock:
            for rid, (ident, at) in list(self._claims.items()):
                if now - at < self._heartbeat_s:
                    continue
                del self._claims[rid]
                if ident not in self._routers and self._owners.get(rid) == ident:
                    # Its owner stays the router that is gone: the final ABORT delta is then
                    # unroutable and dropped, not sent to every router as an unowned one.
                    orphans.append(rid)
        if orphans:
            log.info("data plane: aborting %d requests claimed for routers that are gone", len(orphans))
            self._loop.abort(orphans)

    def _forget(self, ident: bytes, why: str) -> None:
        self._routers.pop(ident, None)
        with self._owner_lock:
            ids = [rid for rid, owner in self._owners.items() if owner == ident]
            for rid in ids:
                del self._owners[rid]
        log.info(
            "data plane: router %r %s; aborting its %d requests",
            ident.decode(errors="replace"),
            why,
            len(ids),
        )
        if ids:
            self._loop.abort(ids)

    def _send(self, ident: bytes, frame: bytes) -> None:
        try:
            self._sock.send_multipart([ident, frame], zmq.NOBLOCK)
        except zmq.Again:  # unroutable is silently dropped by ROUTER; Again only under a full pipe
            log.warning("data plane: a message to router %r was dropped (its pipe is full)", ident[:64])


def _has_first(d: TokenDelta) -> bool:
    """The delta carries its request's first token."""
    return bool(d.token_ids) and d.completion_tokens == len(d.token_ids)
