"""Disaggregated prefill/decode through several router processes (docs/ROUTERS.md).

A router process has no Ray, and a disaggregated submit needs it: the decode worker's `reserve`
is a Ray call, and the prefill side (which prefill worker, the handoffs in flight, a prefill
worker's failure or death settled with its decode workers) lives in the controller's
`DisaggregatedPool`. So a router process relays each submit to the controller, which orchestrates
the handoff and answers; tokens never pass through the controller:

    router process                       controller (DisaggregatedPool)        workers
    submit(decode rank, requests) ──pipe──▶ handoff(rank, requests, router_id)
                                            reserve ──Ray──────────────────▶ decode (its deltas
                                                                               go to router_id)
                                            submit ──data plane────────────▶ prefill ──KV──▶ decode
    ◀──pipe── (refused, ids to run locally)
    submit(the "local" ones) ──data plane──────────────────────────────────▶ decode
    decode's deltas ◀──data plane─────────────────────────────────────────── decode

A request the decode worker cannot reserve for ("busy") runs there as a plain request: the router
submits it itself, so its deltas come to this router as any submit's do. Aborts go to the decode
worker directly and to the controller for the prefill side. The controller's work is per request
(one Ray call and one data-plane submit per batch), never per token.

Pipe messages (cluster/router_process.py's pipe; tuples):

    router -> controller  ("handoff", seq, rank, [WorkRequest], router_id)
                          ("abort_prefill", [request id])
    controller -> router  ("handoff_done", seq, {request id: refusal}, [request id to run locally])
                          ("handoff_failed", seq, why)      the decode worker is unavailable
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kvrelay.worker.protocol import TokenDelta, WorkerLoad, WorkRequest

from .dataplane import DataPlaneClient, DataPlanePool, WorkerEndpoint
from .interfaces import ModelDescription, WorkerClient, WorkerPool

log = logging.getLogger("kvrelay")

MESSAGES = ("handoff", "abort_prefill")  # router -> controller
REPLIES = ("handoff_done", "handoff_failed")  # controller -> router


class HandoffRelay:
    """The router process's end: sends handoffs over the controller pipe, matches the replies."""

    def __init__(self, conn: Connection, router_id: str) -> None:
        self._conn = conn
        self._router_id = router_id
        self._seq = itertools.count()
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, str], list[str]]]] = {}
        self._gone: str | None = None

    async def handoff(self, rank: int, requests: list[WorkRequest]) -> tuple[dict[str, str], list[str]]:
        """(refused id -> message, ids the router runs on the decode worker itself).
        ConnectionError: the decode worker is unavailable, or the controller is gone."""
        if self._gone is not None:
            raise ConnectionError(self._gone)
        seq = next(self._seq)
        fut: asyncio.Future[tuple[dict[str, str], list[str]]] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = fut
        try:
            try:
                self._conn.send(("handoff", seq, rank, requests, self._router_id))
            except OSError:  # (the future's own ConnectionError is one too: not caught here)
                raise ConnectionError("the controller is gone") from None
            return await fut
        finally:
            self._waiting.pop(seq, None)

    def abort_prefill(self, request_ids: list[str]) -> None:
        with contextlib.suppress(OSError):  # a controller that is gone takes the prefill side too
            self._conn.send(("abort_prefill", request_ids))

    def on_reply(self, msg: tuple[Any, ...]) -> None:
        """A REPLIES message read from the pipe (on the event loop)."""
        fut = self._waiting.get(msg[1])
        if fut is None or fut.done():
            return
        if msg[0] == "handoff_done":
            fut.set_result((msg[2], msg[3]))
        else:
            fut.set_exception(ConnectionError(msg[2]))

    def close(self, why: str) -> None:
        """The pipe closed: every waiting handoff fails UNAVAILABLE, and so does every later one."""
        self._gone = why
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))


class RelayedDecodeClient:
    """A decode worker as a router process sees it: load, health and deltas over the data plane;
    submit through the controller's handoff (`HandoffRelay`)."""

    def __init__(self, inner: DataPlaneClient, relay: HandoffRelay) -> None:
        self._inner = inner
        self._relay = relay
        self.rank = inner.rank

    @property
    def healthy(self) -> bool:
        return self._inner.healthy

    @property
    def load(self) -> WorkerLoad:
        return self._inner.load

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        if not self._inner.healthy:
            raise ConnectionError(f"worker {self.rank} is unavailable")
        refused, local_ids = await self._relay.handoff(self.rank, list(requests))
        if local_ids:
            local = set(local_ids)
            refused.update(await self._inner.submit([r for r in requests if r.request_id in local]))
        return refused

    async def abort(self, request_ids: Sequence[str]) -> None:
        await self._inner.abort(request_ids)
        self._relay.abort_prefill(list(request_ids))


class RelayedDecodePool:
    """A router process's `WorkerPool` over the decode workers of a disaggregated controller."""

    def __init__(self, inner: DataPlanePool, relay: HandoffRelay) -> None:
        self._inner = inner
        self.relay = relay
        self._clients = [RelayedDecodeClient(w, relay) for w in inner.workers]

    @property
    def workers(self) -> Sequence[RelayedDecodeClient]:
        return self._clients

    @property
    def model(self) -> ModelDescription:
        return self._inner.model

    async def start(
        self,
        on_deltas: Callable[[int, list[TokenDelta]], None],
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        await self._inner.start(on_deltas, on_worker_down, on_worker_up)

    def set_endpoint(self, endpoint: WorkerEndpoint | None, rank: int) -> None:
        self._inner.set_endpoint(endpoint, rank)

    async def stop(self) -> None:
        self.relay.close("the router is stopping")
        await self._inner.stop()


async def serve_handoff(pool: Any, msg: tuple[Any, ...], reply: Callable[[tuple[Any, ...]], None]) -> None:
    """The controller's end: one MESSAGES message from a router, over a `DisaggregatedPool`."""
    if msg[0] == "abort_prefill":
        await pool.abort_prefill(list(msg[1]))
        return
    _, seq, rank, requests, router_id = msg
    try:
        refused, local = await pool.handoff(rank, requests, router_id)
    except ConnectionError as e:
        reply(("handoff_failed", seq, str(e)))
    except Exception as e:  # a bug here must not hang the router's submit
        log.exception("handoff for router %s failed", router_id)
        reply(("handoff_failed", seq, f"handoff failed: {type(e).__name__}"))
    else:
        reply(("handoff_done", seq, refused, [r.request_id for r in local]))


if TYPE_CHECKING:

    def _implements(pool: RelayedDecodePool, client: RelayedDecodeClient) -> tuple[WorkerPool, WorkerClient]:
        return pool, client
