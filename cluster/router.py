"""The gRPC router: the `kvrelay.v1.Generation` servicer, a thin adapter over `RouterCore`
(cluster/router_core.py owns streams, admission, routing, batching, drain and metrics).

A Generate call's prompt (text, token ids, or chat messages) and sampling params go to
`RouterCore.open`; its responses are the core's; its end is `RouterCore.close` with the status the
client saw. `RouterError`'s protocol-neutral status maps to the gRPC code of the same name; a
cancelled call is CANCELLED, or DEADLINE_EXCEEDED when its deadline passed. Anything unexpected is
logged with an id and reported as INTERNAL "internal error (id ...)"; what a client sees never
holds a path, an address or a traceback. A message that does not parse as the method's request is
INVALID_ARGUMENT (gRPC's own deserializer would make it INTERNAL).

Health (grpc.health.v1) follows `RouterCore.serving`. Authentication and TLS (cluster/auth.py) are
applied by `build_server`, before any handler here runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc

from .config import ServerConfig
from .interfaces import WorkerPool
from .metrics import add_worker_stats
from .router_core import RouterCore, RouterError, Status, Stream, internal_error
from .validation import model_info, prompt_of

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "kvrelay.v1.Generation"
Code = grpc.StatusCode


def grpc_code(status: Status) -> grpc.StatusCode:
    return Code[status.name]


class _Unparsable:
    """What the request deserializer yields for bytes that are not a valid message."""


_UNPARSABLE = _Unparsable()


def _parsed(request: object, cls: type[Message]) -> None:
    if not isinstance(request, cls):
        raise RouterError(Status.INVALID_ARGUMENT, f"request: not a valid {cls.DESCRIPTOR.full_name} message")


class GenerationRouter(RouterCore, pb_grpc.GenerationServicer):
    def __init__(self, pool: WorkerPool, config: ServerConfig, *, worker_id_prefix: str = "") -> None:
        super().__init__(pool, config, worker_id_prefix=worker_id_prefix)
        self.health = health.aio.HealthServicer()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        stream: Stream | None = None
        failure: RouterError | None = None
        status = Status.OK
        try:
            _parsed(request, pb.GenerateRequest)
            remaining = context.time_remaining()
            deadline = None if remaining is None else arrival + remaining
            try:
                prompt = prompt_of(request)
            except ValueError as e:
                raise RouterError(Status.INVALID_ARGUMENT, str(e)) from None
            stream = await self.open(prompt, request.sampling, request.request_id, deadline, arrival)
            async with contextlib.aclosing(self.responses(stream)) as responses:
                async for resp in responses:
                    yield resp
        except RouterError as f:
            failure, status = f, f.status
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError: the client cancelled (or its deadline passed) while we waited;
            # GeneratorExit: it went away while a response was being written (grpc closes us).
            expired = stream is not None and stream.expired
            status = Status.DEADLINE_EXCEEDED if expired else Status.CANCELLED
            raise
        except Exception:
            failure = internal_error(f"Generate (request_id {request.request_id[:64]!r})")
            status = failure.status
        finally:
            self.metrics.requests.labels(code=grpc_code(status).name).inc()
            self.close(stream, status, arrival)
        if failure is not None:
            await context.abort(grpc_code(failure.status), failure.message)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._unary(request, pb.GetModelInfoRequest, self._model_info, context)

    async def GetServerStats(
        self, request: pb.GetServerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStats:
        return await self._unary(request, pb.GetServerStatsRequest, self._server_stats, context)

    async def _unary(
        self,
        request: object,
        cls: type[Message],
        answer: Callable[[], Any],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        """answer() for a parsed request; a failure ends the call with its status."""
        try:
            _parsed(request, cls)
            return answer()
        except RouterError as f:
            failure = f
        except Exception:
            failure = internal_error(cls.DESCRIPTOR.name)
        await context.abort(grpc_code(failure.status), failure.message)

    def _model_info(self) -> pb.ModelInfo:
        if self._limits is None:
            raise RouterError(Status.UNAVAILABLE, "the server is starting")
        return model_info(self._pool.model, self._limits)

    def _server_stats(self) -> pb.ServerStats:
        stats = pb.ServerStats(
            num_workers=len(self._pool.workers) if self._limits is not None else 0,
            num_queued=self._num_queued,
            num_in_flight=len(self._streams),
            num_requests_total=self._num_requests_total,
        )
        add_worker_stats(stats, self._worker_snapshot())
        return stats

    async def _sync_health(self) -> None:
        """Health follows the state when it runs (a late task never undoes a drain): SERVING while
        not draining and some worker is healthy."""
        response = health_pb2.HealthCheckResponse
        serving = self.serving
        for name in ("", SERVICE_NAME):
            await self.health.set(name, response.SERVING if serving else response.NOT_SERVING)
