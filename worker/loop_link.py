"""The engine loop's end of a data plane that runs in a process of its own (issue 14, item 2).

Served in one process, the engine loop shared the GIL with the data plane's I/O thread, and their
Python work ran one at a time: on one H200, a thread that holds the GIL 20% of the time slowed the
offline 1B run at batch 256 from 63.7k to 50.1k tok/s, and the I/O thread's share when served is
about that. So, as vLLM's EngineCore keeps its busy loop apart from the API server, the worker's
`DataPlaneServer` (routers' sockets, request owners, heartbeats, encoding for each router) runs in a
child process (`worker/dataplane_front.py`), and the loop's process keeps only:

- the output sink, on the loop thread: one msgpack frame per iteration that produced something
  (the step's deltas and the load; the engine counters at most every `STATS_PERIOD_S`, and when the
  engine goes idle), pushed on a local ipc socket: one encode and one non-blocking send a step;
- a bridge thread that sits in zmq's poll (GIL released) and wakes only per SUBMIT or ABORT, not
  per token: it queues submits on the loop, whose answers go back from the loop thread when applied
  (before the step that runs them publishes anything, as with the in-process server);
- `claim`/`release` (the actor's Ray calls) forwarded on the same socket, so a claim reaches the data
  plane before any delta of the claimed requests (one socket, one order).

The child checks that its parent lives (it exits when orphaned, the actor SIGKILLed) and the
actor's `shutdown` stops it after the loop's final deltas. Frames are `worker/wire.py`'s, with the
link's own kinds (OUT, ANSWER, ...), which a router may not send.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import zmq

from . import wire
from .cpu_time import process_cpu_seconds
from .engine_loop import EngineLoop
from .protocol import EngineLoopBroken, WorkerLoad
from .request import RequestOutput
from .wire import Kind, WireError

log = logging.getLogger("kvrelay")

# The engine counters (EngineStats) ride on OUT frames at most this often while busy: they cost
# more to encode than a step's deltas, and the data plane sends them on heartbeats only (0.1 s).
STATS_PERIOD_S = 0.05
_START_TIMEOUT_S = 60.0


class LoopLink:
    """Starts the data plane's process for `loop` and is the loop's output sink."""

    def __init__(
        self,
        loop: EngineLoop,
        host: str,
        *,
        incarnation: str,
        heartbeat_s: float = 0.1,
        router_timeout_s: float = 10.0,
    ) -> None:
        self._loop = loop
        # ipc endpoints are unix-socket paths, at most 107 bytes: a long TMPDIR falls back to /tmp.
        tmp = tempfile.gettempdir()
        self._dir = tempfile.mkdtemp(prefix="kvrelay-link-", dir=tmp if len(tmp) <= 64 else "/tmp")
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        # Loop -> data plane (the loop thread's frames, the bridge's answers, the actor's claims):
        # shared by threads, so every send is under _lock.
        self._tx = ctx.socket(zmq.PUSH)
        self._tx.setsockopt(zmq.SNDHWM, 0)  # never drop a delta
        self._tx.setsockopt(zmq.LINGER, 1000)
        self._tx.bind(f"ipc://{self._dir}/to-dataplane")
        self._rx = ctx.socket(zmq.PULL)  # data plane -> loop: READY, then SUBMIT/ABORT (bridge thread)
        self._rx.setsockopt(zmq.RCVHWM, 0)
        self._rx.setsockopt(zmq.LINGER, 0)
        self._rx.bind(f"ipc://{self._dir}/to-loop")
        self._lock = threading.Lock()
        self._stats_at = 0.0
        self._last_key: tuple[int, int, int] | None = None
        self._closing = False
        config = {
            "host": host,
            "incarnation": incarnation,
            "heartbeat_s": heartbeat_s,
            "router_timeout_s": router_timeout_s,
            "rx": f"ipc://{self._dir}/to-dataplane",
            "tx": f"ipc://{self._dir}/to-loop",
            "parent": os.getpid(),
        }
        # The child imports what this process could: its sys.path (a Ray runtime env may have put
        # kvrelay there rather than in site-packages).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay.worker.dataplane_front", json.dumps(config)], env=env
        )
        try:
            self.address = self._wait_ready()
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            self._close_sockets()
            raise
        # The CPU figures so far (model load, graph capture), or the first heartbeats would read 0
        # for them until the first step, and a rate taken across that step would count them all.
        self._send(self._out_frame([], loop.load, True, loop.thread_cpu_s()))
        loop.set_output_sink(self)
        self._thread = threading.Thread(target=self._bridge, name="kvrelay-loop-link", daemon=True)
        self._thread.start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._rx.poll(100):
                kind, fields = wire.unpack(self._rx.recv())
                if kind is Kind.READY and len(fields) == 1 and isinstance(fields[0], str):
                    return fields[0]
                raise RuntimeError(f"the data plane process sent {kind.name} before READY")
            if self._proc.poll() is not None:
                raise RuntimeError(f"the data plane process exited with {self._proc.returncode} before READY")
        raise RuntimeError(f"the data plane process was not ready within {_START_TIMEOUT_S:.0f} s")

    # ---- the output sink (loop thread) ---------------------------------------------------------
    def publish(self, outputs: list[RequestOutput], load: WorkerLoad) -> None:
        now = time.monotonic()
        key = (load.num_running, load.num_waiting, load.num_free_blocks)
        idle = load.num_running + load.num_waiting == 0
        with_stats = now - self._stats_at >= STATS_PERIOD_S or (idle and key != self._last_key)
        if not outputs and not with_stats and key == self._last_key:
            return
        self._last_key = key
        if with_stats:
            self._stats_at = now
        self._send(self._out_frame(outputs, load, with_stats, time.thread_time()))  # on the loop thread

    @staticmethod
    def _out_frame(
        outputs: list[RequestOutput], load: WorkerLoad, with_stats: bool, loop_cpu_s: float
    ) -> bytes:
        return wire.pack(
            Kind.OUT,
            [wire.encode_delta(d) for d in outputs],
            wire.encode_load(load, with_stats=with_stats),
            loop_cpu_s,
            time.process_time(),
        )

    def broken(self, why: str) -> None:
        self._send(wire.pack(Kind.BROKEN, why))

    # ---- the actor's calls ---------------------------------------------------------------------
    def claim(self, request_ids: Sequence[str], router_id: str) -> None:
        """Deltas of these ids go to `router_id` (see DataPlaneServer.claim)."""
        self._send(wire.pack(Kind.CLAIM, list(request_ids), router_id))

    def release(self, request_ids: Sequence[str]) -> None:
        self._send(wire.pack(Kind.RELEASE, list(request_ids)))

    def release_all(self) -> None:
        self._send(wire.pack(Kind.RELEASE_ALL))

    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The data plane process's."""
        return self._proc.pid

    def cpu_s(self) -> float:
        """CPU seconds of the data plane's process so far (utime + stime, from /proc)."""
        try:
            return process_cpu_seconds(self._proc.pid)
        except (OSError, IndexError, ValueError):  # it just exited
            return 0.0

    def close(self, timeout_s: float = 5.0) -> None:
        """After the loop's shutdown (its final deltas and BROKEN sent): the data plane sends them
        and ERROR to its routers, then exits."""
        time.sleep(0.05)
        self._send(wire.pack(Kind.STOP))
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the data plane process did not stop within %.0f s; killing it", timeout_s)
            self._proc.kill()
            self._proc.wait()
        self._closing = True
        self._thread.join(1.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._lock:
            self._tx.close(0)
        self._rx.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _send(self, frame: bytes) -> None:
        with self._lock:
            if not self._tx.closed:
                self._tx.send(frame, zmq.NOBLOCK)

    # ---- the bridge thread ---------------------------------------------------------------------
    def _bridge(self) -> None:
        while not self._closing:
            try:
                if not self._rx.poll(100):
                    continue
                frame = self._rx.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                return  # closed
            try:
                kind, fields = wire.unpack(frame)
                if kind is Kind.SUBMIT:
                    self._submit(*fields)
                elif kind is Kind.ABORT:
                    self._loop.abort([rid for rid in fields[0] if isinstance(rid, str)])
                else:
                    raise WireError(f"{kind.name} is not the data plane's message")
            except (WireError, TypeError, ValueError) as e:  # our own process sent it: a bug
                log.error("loop link: dropped a malformed message: %s", e)

    def _submit(self, token: int, items: list[object]) -> None:
        try:
            fut = self._loop.submit_future([wire.decode_request(x) for x in items])
        except EngineLoopBroken as e:
            self._send(wire.pack(Kind.ANSWER, token, None, str(e)))
            return
        fut.add_done_callback(lambda f: self._answer(token, f))

    def _answer(self, token: int, fut: Future[dict[str, str]]) -> None:
        """On the loop thread, as the loop applies the submit (before its first output)."""
        try:
            self._send(wire.pack(Kind.ANSWER, token, fut.result(), None))
        except EngineLoopBroken as e:
            self._send(wire.pack(Kind.ANSWER, token, None, str(e)))
