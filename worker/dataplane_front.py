"""A worker's data plane in a process of its own: `DataPlaneServer` over the loop link.

Started by `worker/loop_link.py` (`python -m kvrelay.worker.dataplane_front CONFIG_JSON`); imports
no engine and no torch. `RemoteLoop` is the `ServedLoop` the server drives: its submits and aborts
go to the engine loop's process over the link, and the loop's OUT frames come back as deltas merged
per request until the server takes them, exactly as `EngineLoop`'s outbox does in one process.
The server's I/O thread owns the routers' socket and reads the link too; the main thread only
watches for STOP and for the parent.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import zmq

from . import wire
from .dataplane import DataPlaneServer
from .protocol import EngineLoopBroken, StepBatch, TokenDelta, WorkerLoad, WorkRequest, fold_delta
from .wire import Kind, WireError

log = logging.getLogger("kvrelay")

_PARENT_CHECK_S = 0.5


class RemoteLoop:
    """The engine loop of the parent process, as the data plane sees it (a `ServedLoop`)."""

    def __init__(self, tx: zmq.Socket[bytes]) -> None:
        self._tx = tx
        # Guards everything below and sends on _tx: the server's I/O thread uses them all, and
        # send_ready runs on the main thread.
        self._lock = threading.Lock()
        self._outbox: dict[str, TokenDelta] = {}
        self._load = WorkerLoad(0, 0, 0.0, 0, 0)
        self._pending: dict[int, Future[dict[str, str]]] = {}
        self._tokens = itertools.count()
        self._broken: str | None = None  # why the loop stopped (SHUT_DOWN when on purpose)
        self._loop_cpu_s = 0.0
        self._loop_process_cpu_s = 0.0

    # ---- ServedLoop ----------------------------------------------------------------------------
    @property
    def load(self) -> WorkerLoad:
        with self._lock:
            return self._load

    def set_output_hook(self, hook: Callable[[], None] | None) -> None:
        """Not needed: the link's frames are handled on the server's I/O thread (`serve`), which
        sends what they published in the same wake-up."""

    def submit_future(self, requests: Sequence[WorkRequest]) -> Future[dict[str, str]]:
        fut: Future[dict[str, str]] = Future()
        with self._lock:
            self._raise_if_stopped()
            token = next(self._tokens)
            self._pending[token] = fut
            self._tx.send(wire.pack(Kind.SUBMIT, token, [wire.encode_request(r) for r in requests]))
        return fut

    def abort(self, request_ids: Sequence[str]) -> None:
        with self._lock:
            if self._broken is None:
                self._tx.send(wire.pack(Kind.ABORT, list(request_ids)))

    def take(self) -> StepBatch:
        with self._lock:
            if not self._outbox:
                self._raise_if_stopped()
            deltas = list(self._outbox.values())
            self._outbox.clear()
            return StepBatch(deltas=deltas, load=self._load)

    def thread_cpu_s(self) -> float:
        return self._loop_cpu_s

    def send_ready(self, address: str) -> None:
        with self._lock:
            self._tx.send(wire.pack(Kind.READY, address))

    def process_cpu_s(self) -> float:
        """The worker's CPU: the loop's process (as last reported) and this one."""
        return self._loop_process_cpu_s + time.process_time()

    def _raise_if_stopped(self) -> None:
        if self._broken is not None:
            raise EngineLoopBroken(self._broken)

    # ---- frames from the loop (the server's I/O thread) ----------------------------------------
    def handle(self, kind: Kind, fields: list[Any]) -> None:
        if kind is Kind.OUT:
            self._out(*fields)
        elif kind is Kind.ANSWER:
            token, refused, error = fields
            with self._lock:
                fut = self._pending.pop(token, None)
            if fut is not None:
                fut.set_result(refused) if error is None else fut.set_exception(EngineLoopBroken(error))
        elif kind is Kind.BROKEN:
            with self._lock:
                self._broken = str(fields[0])
                pending, self._pending = self._pending, {}
            for fut in pending.values():
                fut.set_exception(EngineLoopBroken(self._broken))
        else:
            raise WireError(f"{kind.name} is not the loop's message")

    def _out(self, items: list[Any], load_fields: Any, loop_cpu_s: float, process_cpu_s: float) -> None:
        deltas = [wire.decode_delta(x) for x in items]
        load, with_stats = wire.decode_load(load_fields)
        with self._lock:
            if not with_stats:
                load.stats = self._load.stats  # the counters ride on some frames only
            self._load = load
            self._loop_cpu_s = float(loop_cpu_s)
            self._loop_process_cpu_s = float(process_cpu_s)
            for d in deltas:
                fold_delta(self._outbox, d)


def serve(config: dict[str, Any]) -> None:
    """Run the data plane until the loop says STOP or the parent process is gone.

    The link from the loop is read on the server's I/O thread (an extra socket of its poller): a
    step's deltas go out to the routers in the same wake-up that read them, with no second thread
    to wake and no GIL to hand over. The main thread only watches for STOP and for the parent."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    rx = ctx.socket(zmq.PULL)
    rx.setsockopt(zmq.RCVHWM, 0)
    rx.connect(config["rx"])
    tx = ctx.socket(zmq.PUSH)
    tx.setsockopt(zmq.SNDHWM, 0)
    tx.setsockopt(zmq.LINGER, 0)
    tx.connect(config["tx"])
    loop = RemoteLoop(tx)
    stop = threading.Event()
    servers: list[DataPlaneServer] = []  # the handler's, once built (the loop sends after READY)

    def read_link() -> None:
        server = servers[0]
        for _ in range(1000):  # bounded, as the routers' socket: heartbeats are never starved
            try:
                frame = rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, fields = wire.unpack(frame)
                if kind is Kind.STOP:
                    stop.set()
                elif kind is Kind.CLAIM:
                    server.claim(fields[0], fields[1])
                elif kind is Kind.RELEASE:
                    server.release(fields[0])
                elif kind is Kind.RELEASE_ALL:
                    server.release_all()
                else:
                    loop.handle(kind, fields)
            except (WireError, TypeError, ValueError) as e:  # our own process sent it: a bug
                log.error("data plane: dropped a malformed message from the loop: %s", e)

    servers.append(
        DataPlaneServer(
            loop,
            config["host"],
            incarnation=config["incarnation"],
            heartbeat_s=config["heartbeat_s"],
            router_timeout_s=config["router_timeout_s"],
            process_cpu_s=loop.process_cpu_s,
            extra_sockets=[(rx, read_link)],
        )
    )
    server = servers[0]
    loop.send_ready(server.address)
    parent = int(config["parent"])
    try:
        while not stop.wait(_PARENT_CHECK_S):
            if os.getppid() != parent:
                log.warning("data plane: the worker process %d is gone; exiting", parent)
                break
    finally:
        server.close()
        rx.close(0)
        tx.close(0)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
