"""The OpenAI-compatible HTTP API: a FastAPI app, a thin adapter over `RouterCore` like the gRPC
servicer, served by uvicorn on the same event loop (cluster/http_server.py).

    POST /v1/chat/completions   chat (rendered with the model's chat template by the core)
    POST /v1/completions        text or token-id prompts
    GET  /v1/models             the served model; its id is the model's name as the server was
                                given it: `tiny`, or the model path's last component
    GET  /health                200 while serving, 503 while starting, draining or without a worker

Streaming is server-sent events, one `data: {json}\\n\\n` per chunk, ending with `data: [DONE]`.
A failure after the stream started is one `data: {"error": ...}` chunk, then `[DONE]` (as vLLM).

Auth is the gRPC side's: with tokens configured, every route but /health needs
`Authorization: Bearer <token>` (checked before the body is read). Admission, limits, deadlines
and drain are the core's; errors are OpenAI's error JSON (cluster/http_errors.py).

A client that goes away aborts its request: a streaming response is cancelled by Starlette when
the connection drops, and a whole response races its generation against the connection's
`http.disconnect`; either way the core closes the stream and the worker aborts it within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import TokenSet
from .http_errors import HttpError, of_validation
from .openai_responses import JSON, Completion
from .openai_schema import ChatCompletionRequest, CompletionRequest
from .router_core import RouterCore, RouterError, Status, Stream, internal_error
from .validation import Prompt

_DONE = "data: [DONE]\n\n"
_UNAUTHENTICATED = "missing or invalid token: send the header 'Authorization: Bearer <token>'"


def served_model_name(model: str) -> str:
    """The id /v1/models lists and requests must name: `tiny`, or the model path's last part."""
    return Path(model.rstrip("/")).name or model


def _sse(obj: JSON) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class OpenAIApi:
    """The routes' handlers over one RouterCore."""

    def __init__(self, core: RouterCore, model: str, tokens: TokenSet | None, max_body_bytes: int) -> None:
        self.core = core
        self.model = served_model_name(model)
        self._aliases = {self.model, model}  # the path as given is accepted too
        self._tokens = tokens
        self._max_body_bytes = max_body_bytes
        self._created = int(time.time())

    # ---- routes --------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = self._parse(ChatCompletionRequest, await self._body(request))
        return await self._generate(
            request, req, req.prompt(), arrival, chat=True, want_logprobs=req.logprobs
        )

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = self._parse(CompletionRequest, await self._body(request))
        return await self._generate(
            request, req, req.prompt_of(), arrival, chat=False, want_logprobs=req.logprobs is not None
        )

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        limits = self.core.limits
        card: JSON = {"id": self.model, "object": "model", "created": self._created, "owned_by": "kvrelay"}
        if limits is not None:
            card["max_model_len"] = limits.max_model_len
            card["vocab_size"] = limits.vocab_size  # kvrelay's: load generators draw token ids below it
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if self.core.serving:
            return JSONResponse({"status": "serving"})
        why = "the server is shutting down" if self.core.draining else "no worker is available"
        return HttpError.of(RouterError(Status.UNAVAILABLE, why)).response()

    # ---- the request ------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._tokens is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self._tokens.check(token.strip() or None):
            raise HttpError(401, _UNAUTHENTICATED, "invalid_request_error", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        """The JSON body, after auth; refused when not JSON, too large or not an object."""
        self._authorize(request)
        ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(
                415,
                f"content-type: must be application/json, got {ctype or 'none'!r}",
                "invalid_request_error",
            )
        limit = self._max_body_bytes
        too_large = HttpError(413, f"request body: larger than {limit} bytes", "invalid_request_error")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError.bad_request(f"request body: not valid JSON ({e})") from None
        except RecursionError:
            raise HttpError.bad_request("request body: JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise HttpError.bad_request(f"request body: must be a JSON object, got {type(body).__name__}")
        return body

    def _parse(self, cls: type[Any], body: Any) -> Any:
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise of_validation(e) from None
        if req.model not in self._aliases:
            raise HttpError(
                404,
                f"model: {req.model[:256]!r} is not served here; GET /v1/models lists {self.model!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return req

    async def _generate(
        self, request: Request, req: Any, prompt: Prompt, arrival: float, *, chat: bool, want_logprobs: bool
    ) -> Response:
        try:
            # chat without max_tokens runs to the end of the context, as OpenAI and vLLM do
            stream = await self.core.open(
                prompt, req.sampling(), "", None, arrival, max_tokens_to_context=chat
            )
        except RouterError as e:
            self.core.close(None, e.status, arrival)
            raise HttpError.of(e) from None
        if stream.failed:  # refused at once (no worker): an HTTP status, not an SSE error event
            event = stream.events.get_nowait()
            assert isinstance(event, RouterError), event
            self.core.close(stream, event.status, arrival)
            raise HttpError.of(event)
        codec = self.core.codec
        completion = Completion(
            chat=chat,
            model=self.model,
            num_top_logprobs=req.num_top_logprobs,
            want_logprobs=want_logprobs,
            tokenizer=None if codec is None else codec.tokenizer,
            continuous_usage=req.stream and req.continuous_usage,
            prompt_tokens=len(stream.prompt_ids),
        )
        if req.stream:
            events = self._events(request, stream, completion, req.include_usage, arrival)
            # The generator closes the stream as it ends; when it never started (the client left
            # before the headers went out) the response's own end does.
            return _EventStream(events, lambda: self.core.close(stream, Status.CANCELLED, arrival))
        return await self._whole(request, stream, completion, arrival)

    async def _events(
        self, request: Request, stream: Stream, completion: Completion, include_usage: bool, arrival: float
    ) -> AsyncIterator[str]:
        status = Status.CANCELLED  # unless it ends by itself: the client went away
        gone = asyncio.ensure_future(self._cancel_on_disconnect(request, stream))
        try:
            first = completion.first_chunk(include_usage)
            if first is not None:
                yield _sse(first)
            last = None
            async with contextlib.aclosing(self.core.responses(stream)) as responses:
                async for resp in responses:
                    last = resp
                    yield _sse(completion.chunk(resp, include_usage))
            if include_usage and last is not None:
                yield _sse(completion.usage_chunk(last))
            status = Status.OK
            yield _DONE
        except RouterError as e:
            status = e.status
            if status is not Status.CANCELLED:  # else nobody is listening
                yield _sse(HttpError.of(e).body())
                yield _DONE
        except Exception:
            failure = internal_error("streaming completion")
            status = failure.status
            yield _sse(HttpError.of(failure).body())
            yield _DONE
        finally:
            gone.cancel()
            self.core.close(stream, status, arrival)

    async def _whole(
        self, request: Request, stream: Stream, completion: Completion, arrival: float
    ) -> Response:
        status = Status.CANCELLED
        gone = asyncio.ensure_future(self._cancel_on_disconnect(request, stream))
        try:
            parts = [r async for r in self.core.responses(stream)]
            status = Status.OK
            return JSONResponse(completion.response(parts))
        except RouterError as e:
            status = e.status
            if status is Status.CANCELLED:
                return Response(status_code=499)  # nobody reads it
            raise HttpError.of(e) from None
        finally:
            gone.cancel()
            self.core.close(stream, status, arrival)

    async def _cancel_on_disconnect(self, request: Request, stream: Stream) -> None:
        """Cancels the stream when the client closes the connection. The body has been read, so
        the connection's next ASGI message is the disconnect (whatever the server's ASGI version:
        Starlette's own watch covers streams only, and only from ASGI 2.4 on at the next write)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.core.cancel(stream)
                return


class _EventStream(StreamingResponse):
    """Server-sent events; `on_end` runs however the response ends, sent or not."""

    def __init__(self, events: AsyncIterator[str], on_end: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """OpenAI error JSON for every failure; an unexpected one is logged with an id, answered 500."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except HttpError as e:
            return e.response()
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:
            return HttpError.of(internal_error(f"HTTP {request.url.path}")).response()

    return run


class _CountResponses:
    """Counts every response by route and HTTP status (a pure ASGI middleware: Starlette's
    BaseHTTPMiddleware would buffer the receive channel the disconnect watcher needs)."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(path, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counted)


_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health")


def build_app(core: RouterCore, model: str, tokens: TokenSet | None, max_body_bytes: int) -> FastAPI:
    """The app over a started or starting core (routes answer 503 until it has started)."""
    api = OpenAIApi(core, model, tokens, max_body_bytes)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route("/v1/chat/completions", _guarded(api.chat_completions), methods=["POST"])
    app.add_api_route("/v1/completions", _guarded(api.completions), methods=["POST"])
    app.add_api_route("/v1/models", _guarded(api.models), methods=["GET"])
    app.add_api_route("/health", _guarded(api.health), methods=["GET"])

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        what = "no such route" if exc.status_code == 404 else str(exc.detail)
        return HttpError(
            exc.status_code, f"{request.method} {request.url.path[:256]}: {what}", "invalid_request_error"
        ).response()

    app.add_exception_handler(StarletteHTTPException, not_found)

    def count(path: str, status: int) -> None:
        core.metrics.http_requests.labels(
            route=path if path in _ROUTES else "other", status=str(status)
        ).inc()

    app.add_middleware(_CountResponses, count=count)
    return app
