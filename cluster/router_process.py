"""One router process of `kvrelay serve --router-processes N` (the controller: cluster/router_procs.py).

It runs `GenerationRouter` (the gRPC API, and the OpenAI HTTP API when `http_port` is set) over a
`DataPlanePool`: zmq to every worker, no Ray. It binds the same gRPC and HTTP ports as its siblings
with SO_REUSEPORT, so the kernel spreads client connections over the routers.

The controller talks to it over one `multiprocessing` pipe (tuples, controller -> router):

    ("endpoint", WorkerEndpoint | None, rank)  a worker restarted at a new endpoint, or is down
    ("drain", grace_s)                         drain (a second one, with 0, cuts the grace short)

and back (router -> controller):

    ("ready", grpc_port, http_port | None)     serving: both servers accept calls
    ("serving", bool)                          its health changed (SERVING / NOT_SERVING)
    ("stopped",)                               drained and stopped; the process exits 0 next

With disaggregated prefill/decode, submits are relayed over the same pipe ("handoff",
"abort_prefill" and their answers: cluster/handoff_relay.py).

A pipe that closes (the controller died) is a drain with no grace: no router outlives its
controller. SIGINT and SIGTERM are ignored here: a Ctrl-C reaches the whole process group, and the
controller is the one that orders the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .config import ServerConfig
from .dataplane import WorkerEndpoint
from .interfaces import ModelDescription

if TYPE_CHECKING:
    from .handoff_relay import HandoffRelay

log = logging.getLogger("kvrelay")


@dataclass(frozen=True)
class RouterSpec:
    """What one router process is started with (pickled across the spawn)."""

    index: int  # its slot, 0..N-1 (a restarted router keeps the slot)
    router_id: str  # its identity on every worker's data plane: new for each incarnation
    config: ServerConfig  # its share of the admission budget; port and http_port already bound
    model: ModelDescription
    endpoints: tuple[WorkerEndpoint, ...]  # by rank (the decode workers when disaggregated)
    log_level: int = logging.INFO
    # Disaggregated prefill/decode: submits are relayed to the controller (cluster/handoff_relay.py).
    disaggregated: bool = False


def router_main(spec: RouterSpec, conn: Connection) -> None:
    """The process's entry point (multiprocessing spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[router {spec.index}]: %(message)s",
    )
    try:
        asyncio.run(_serve(spec, conn))
    except Exception:
        log.exception("router process %d failed", spec.index)
        sys.exit(1)


async def _serve(spec: RouterSpec, conn: Connection) -> None:
    from .auth import load_security
    from .dataplane import DataPlanePool
    from .grpc_server import build_server
    from .handoff_relay import HandoffRelay, RelayedDecodePool
    from .http_server import HttpServer
    from .metrics import REFRESH_S
    from .router import GenerationRouter

    config = spec.config
    security = load_security(config)
    pool: Any = DataPlanePool(spec.model, spec.endpoints, router_id=spec.router_id)
    relay = None
    if spec.disaggregated:
        relay = HandoffRelay(conn, spec.router_id)
        pool = RelayedDecodePool(pool, relay)
    # Worker request ids are per router: this incarnation's tag keeps them apart from its
    # siblings' and from those of the process it replaced (the worker may hold those ~10 s more).
    router = GenerationRouter(pool, config, worker_id_prefix=spec.router_id.rsplit("-", 1)[-1] + ".")
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), _read_pipe, conn, inbox, loop, relay)
    server = http = None
    try:
        await router.start()
        server, port = build_server(router, config, security, reuse_port=True)
        await server.start()
        http_port = None
        if config.http_port is not None:
            http = HttpServer(router, config, security, reuse_port=True)
            http_port = await http.start()
        conn.send(("ready", port, http_port))
        grace = await _until_drain(router, pool, conn, inbox, REFRESH_S)
        drain = asyncio.ensure_future(router.drain(grace))
        cut = asyncio.ensure_future(_next_drain(inbox))
        await asyncio.wait({drain, cut}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.info("second drain order: ending the grace period now")
            await router.drain(0.0)
        cut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await server.stop(1.0)
        log.info("drained; stopping the servers and the data plane")
    finally:
        loop.remove_reader(conn.fileno())
        if http is not None:
            await http.stop()
        if server is not None:
            await server.stop(0)
        await router.stop()  # the pool says BYE: each worker aborts what this router still had
    log.info("stopped")
    with contextlib.suppress(OSError):
        conn.send(("stopped",))


async def _until_drain(
    router: Any, pool: Any, conn: Connection, inbox: asyncio.Queue[tuple[Any, ...]], refresh_s: float
) -> float:
    """Serve the controller's orders until it says drain; returns the grace. Every refresh_s (or
    order) the multiprocess gauges are written and a change of health is reported."""
    serving: bool | None = None
    while True:
        try:
            msg = await asyncio.wait_for(inbox.get(), refresh_s)
        except asyncio.TimeoutError:
            msg = None
        router.metrics.refresh()
        if router.serving != serving:
            serving = router.serving
            conn.send(("serving", serving))
        if msg is None:
            continue
        if msg[0] == "endpoint":
            pool.set_endpoint(msg[1], msg[2])
        elif msg[0] == "drain":
            return float(msg[1])
        else:
            log.warning("ignored an unknown order from the controller: %r", msg[0])


async def _next_drain(inbox: asyncio.Queue[tuple[Any, ...]]) -> None:
    while (await inbox.get())[0] != "drain":
        pass


def _read_pipe(
    conn: Connection,
    inbox: asyncio.Queue[tuple[Any, ...]],
    loop: asyncio.AbstractEventLoop,
    relay: HandoffRelay | None,
) -> None:
    """Reader callback: one message from the controller, or (EOF) a drain with no grace. A
    handoff's answer goes straight to the relay (it is awaited during a drain too)."""
    from .handoff_relay import REPLIES

    try:
        while conn.poll():
            msg = conn.recv()
            if relay is not None and msg[0] in REPLIES:
                relay.on_reply(msg)
            else:
                inbox.put_nowait(msg)
    except (EOFError, OSError):
        log.error("the controller is gone: stopping now")
        loop.remove_reader(conn.fileno())
        if relay is not None:
            relay.close("the controller is gone")
        inbox.put_nowait(("drain", 0.0))
        inbox.put_nowait(("drain", 0.0))
