"""Python client for a kvrelay server (the `kvrelay.v1.Generation` gRPC service), sync and asyncio.

    with KvrelayClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=8).text)
        print(client.generate([{"role": "user", "content": "Hi"}]).text)  # chat template, server side
        for chunk in client.stream([1, 2, 3], max_tokens=64, timeout=10.0):
            print(chunk.token_ids, chunk.text)

    async with AsyncKvrelayClient("127.0.0.1:50051", token="s3cret") as client:
        async for chunk in client.stream("Hello"):
            ...

TLS: `tls_root_cert` (the server's CA, PEM bytes or a path) or `tls=True` (the system's roots);
for mTLS add `tls_client_cert` and `tls_client_key`. `token` travels as `authorization: Bearer
<token>` metadata on every call; send it over TLS only, except to a server on loopback.

Every gRPC failure surfaces as a `KvrelayError` subclass carrying the status code and the server's
message, never a raw `grpc.RpcError`. A `timeout` (seconds) becomes the call's gRPC deadline, which
the server enforces too. Leaving a stream early (break, close, garbage collection) cancels the call,
so the server frees the request's KV blocks.

This file holds the channels and the two clients; what crosses the wire (request building, result
types, status-code errors) is `client_wire.py`, whose public names are re-exported here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncGenerator, Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc

# Request building, results and errors live in client_wire.py; this module stays their import path.
from .client_wire import (
    Cancelled,
    DeadlineExceeded,
    FinishReason,
    GenerationResult,
    InternalError,
    InvalidArgument,
    KvrelayError,
    Prompt,
    ResourceExhausted,
    ResultCollector,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Unauthenticated,
    Unavailable,
    Usage,
    build_request,
    check_uint,
    chunk_from_response,
    error_from_rpc,
    is_chat,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "OWN_CONNECTION",
    "TOKEN_ENV",
    "AsyncKvrelayClient",
    "Cancelled",
    "DeadlineExceeded",
    "FinishReason",
    "GenerationResult",
    "InternalError",
    "InvalidArgument",
    "KvrelayClient",
    "KvrelayError",
    "Prompt",
    "ResourceExhausted",
    "StreamChunk",
    "TokenLogprob",
    "TopLogprob",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "add_connection_args",
    "build_request",
    "channel_credentials",
    "connection_kwargs",
    "error_from_rpc",
    "is_chat",
]

DEFAULT_TARGET = "127.0.0.1:50051"
# Explicit rather than gRPC's defaults (4 MiB receive, unlimited send): long token-id prompts and
# logprob-heavy streams fit, and an oversized message fails at once as ResourceExhausted.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TOKEN_ENV = "KVRELAY_TOKEN"  # the token command-line clients send when no --token-file is given
# channel_options giving a client a connection of its own: without a local subchannel pool, the
# clients of one process with the same target and options share one connection, which
# SO_REUSEPORT then hands to one router process (docs/ROUTERS.md).
OWN_CONNECTION: tuple[tuple[str, Any], ...] = (("grpc.use_local_subchannel_pool", 1),)
StreamT = TypeVar("StreamT")  # a generator of StreamChunk (sync) or an async generator of them
ResultT = TypeVar("ResultT")  # GenerationResult (sync) or a coroutine of one (async)


def channel_credentials(
    root_cert: str | Path | bytes | None,
    *,
    tls: bool = False,
    client_cert: str | Path | bytes | None = None,
    client_key: str | Path | bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel (None: plaintext). root_cert: PEM bytes or a file (None with
    tls=True: the system's roots); client_cert and client_key (both or neither): mTLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("tls_client_cert and tls_client_key go together: give both or neither")
    if root_cert is None and not tls and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem("tls_root_cert", root_cert),
        private_key=_pem("tls_client_key", client_key),
        certificate_chain=_pem("tls_client_cert", client_cert),
    )


def _pem(name: str, value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"{name}: cannot read {value}: {e.strerror}") from None


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """The flags of a command-line client's TLS and token; `connection_kwargs` reads them. (No
    --token flag: a token on the command line is visible to every user through `ps`.)"""
    p.add_argument("--tls-root-cert", help="TLS: the server's CA certificate (PEM)")
    p.add_argument("--tls-client-cert", help="mTLS: this client's certificate (PEM)")
    p.add_argument("--tls-client-key", help="mTLS: this client's private key (PEM)")
    p.add_argument("--token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV})")


def connection_kwargs(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """KvrelayClient/AsyncKvrelayClient keyword arguments from `add_connection_args`' flags."""
    env = os.environ if environ is None else environ
    token: str | None = env.get(TOKEN_ENV) or None
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip() or None
        except OSError as e:
            raise ValueError(f"--token-file: cannot read {args.token_file}: {e.strerror}") from None
        if token is None:
            raise ValueError(f"--token-file: {args.token_file} is empty")
    return {
        "token": token,
        "tls_root_cert": getattr(args, "tls_root_cert", None),
        "tls_client_cert": getattr(args, "tls_client_cert", None),
        "tls_client_key": getattr(args, "tls_client_key", None),
    }


class _ClientBase(Generic[StreamT, ResultT]):
    """What the sync and async clients share: arguments, validation, and the two generation calls,
    whose return types differ (iterator vs async iterator, result vs awaitable result)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls_root_cert: str | Path | bytes | None = None,
        tls: bool = False,
        tls_client_cert: str | Path | bytes | None = None,
        tls_client_key: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not target:
            raise ValueError("target must be HOST:PORT, got an empty string")
        if token is not None and not (token and all("!" <= c <= "~" for c in token)):
            raise ValueError("token must be a non-empty string of printable ASCII without spaces, or None")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        check_uint("max_message_bytes", max_message_bytes, 2**31)
        self.target = target
        self.timeout = timeout
        self._credentials = channel_credentials(
            tls_root_cert, tls=tls, client_cert=tls_client_cert, client_key=tls_client_key
        )  # None: plaintext
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_server_name is not None:
            if self._credentials is None:
                raise ValueError("tls_server_name needs TLS: give tls_root_cert or tls=True")
            # The name the server's certificate must carry when the target is an IP or an alias.
            self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        # Extra gRPC channel arguments, after ours (a later duplicate wins), e.g. OWN_CONNECTION.
        self._options.extend((str(k), v) for k, v in channel_options)
        self._open()

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        skip_text: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> ResultT:
        """Runs one generation to its end and returns everything it produced (async: awaitable)."""
        request = build_request(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
            logprobs=logprobs, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, skip_text=skip_text, request_id=request_id,
        )  # fmt: skip
        return self._generate(request, self._deadline(timeout))

    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        skip_text: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> StreamT:
        """The chunks as the server sends them (async: an async iterator). The call starts at the
        first chunk asked for; closing the iterator early (break, close, aclose) cancels it."""
        request = build_request(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
            logprobs=logprobs, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, skip_text=skip_text, request_id=request_id,
        )  # fmt: skip
        return self._stream(request, self._deadline(timeout))

    def _open(self) -> None:
        """Opens the channel (sync) or prepares to open it in the event loop (async)."""
        raise NotImplementedError

    def _generate(self, request: pb.GenerateRequest, timeout: float | None) -> ResultT:
        raise NotImplementedError

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> StreamT:
        raise NotImplementedError

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unavailable(self, timeout: float) -> Unavailable:
        why = f"no server reachable at {self.target} within {timeout} s"
        return Unavailable(grpc.StatusCode.UNAVAILABLE, why)


class KvrelayClient(_ClientBase[Generator[StreamChunk, None, None], GenerationResult]):
    """Blocking client. `timeout` is the default per-call deadline in seconds (None: none);
    `tls_root_cert` (PEM bytes or a file path) or `tls=True` (system roots) turns on TLS, with
    `tls_client_cert` + `tls_client_key` for mTLS; `token` is sent as `authorization: Bearer <token>`;
    `channel_options` adds gRPC channel arguments."""

    def _open(self) -> None:
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def _generate(self, request: pb.GenerateRequest, timeout: float | None) -> GenerationResult:
        collector = ResultCollector()
        for chunk in self._stream(request, timeout):
            collector.add(chunk)
        return collector.result()

    def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> Generator[StreamChunk, None, None]:
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            for resp in call:
                yield chunk_from_response(resp)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; otherwise tells the server to stop

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def server_stats(self, *, timeout: float | None = None) -> pb.ServerStats:
        return self._unary(self._stub.GetServerStats, pb.GetServerStatsRequest(), timeout)

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def wait_ready(self, timeout: float) -> None:
        """Blocks until the channel connects; Unavailable if it has not within timeout seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise self._unavailable(timeout) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KvrelayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncKvrelayClient(
    _ClientBase[AsyncGenerator[StreamChunk, None], Coroutine[Any, Any, GenerationResult]]
):
    """The asyncio twin of KvrelayClient (same arguments): `await client.generate(...)`,
    `async for chunk in client.stream(...)`. The channel opens on first use, inside the running
    event loop, and belongs to that loop."""

    def _open(self) -> None:
        self._channel: Any = None  # grpc.aio.Channel, made by _ensure_stub inside the event loop
        self._stub: Any = None

    def _ensure_stub(self) -> Any:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
            self._stub = pb_grpc.GenerationStub(self._channel)
        return self._stub

    async def _generate(self, request: pb.GenerateRequest, timeout: float | None) -> GenerationResult:
        collector = ResultCollector()
        async for chunk in self._stream(request, timeout):
            collector.add(chunk)
        return collector.result()

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[StreamChunk, None]:
        call = self._ensure_stub().Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for resp in call:
                yield chunk_from_response(resp)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout)

    async def server_stats(self, *, timeout: float | None = None) -> pb.ServerStats:
        return await self._unary("GetServerStats", pb.GetServerStatsRequest(), timeout)

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        rpc = getattr(self._ensure_stub(), method)
        try:
            return await rpc(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    async def wait_ready(self, timeout: float) -> None:
        """Waits until the channel connects; Unavailable if it has not within timeout seconds."""
        self._ensure_stub()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise self._unavailable(timeout) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncKvrelayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
