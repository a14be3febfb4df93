"""What the kvrelay client sends and receives, apart from any channel: `build_request` (arguments to a
`GenerateRequest`, checking only what protobuf cannot carry), the typed results a response stream
becomes (`StreamChunk`, `GenerationResult`), and the mapping of a failed call's status code to a
`KvrelayError` subclass. `client.py` holds the channels and the sync and async clients, and
re-exports every public name here: `kvrelay.cluster.client` stays the import path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard, cast

import grpc

from kvrelay.proto import kvrelay_pb2 as pb

_UINT32 = 2**32
_UINT64 = 2**64

FinishReason = Literal["stop", "length", "abort"]
_FINISH_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


class KvrelayError(Exception):
    """A call failed; `code` is the gRPC status, `details` the server's (or gRPC's) message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(KvrelayError):
    """The request was refused as malformed; `details` names the field and the limit."""


class ResourceExhausted(KvrelayError):
    """Admission is full, or a message passed the size limit: retry later or send less."""


class Unavailable(KvrelayError):
    """No server, no worker able to take it, a worker died mid-stream, or the server is draining."""


class DeadlineExceeded(KvrelayError):
    """The call's timeout passed before the generation finished."""


class Cancelled(KvrelayError):
    """The call was cancelled (by this client or by the server)."""


class Unauthenticated(KvrelayError):
    """The server requires a token and this one is missing or wrong."""


class InternalError(KvrelayError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS) or broke the protocol."""


_ERRORS: dict[grpc.StatusCode, type[KvrelayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_from_rpc(err: grpc.RpcError) -> KvrelayError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _ERRORS.get(code, KvrelayError)(code, details or "")


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int  # the generated token
    logprob: float  # under the model, before sampling filters
    top: tuple[TopLogprob, ...]  # the N most likely tokens, most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    """One server message: what one engine step added to the request."""

    request_id: str
    token_ids: tuple[int, ...]  # new since the previous chunk
    text: str  # new since the previous chunk; never splits a UTF-8 character
    logprobs: tuple[TokenLogprob, ...]  # one per token in token_ids when asked for, else empty
    finish_reason: FinishReason | None  # None on every chunk but the last
    usage: Usage | None  # set on the last chunk


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason
    usage: Usage


class ResultCollector:
    """Concatenates a stream's chunks into one GenerationResult."""

    def __init__(self) -> None:
        self.request_id = ""
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None

    def add(self, chunk: StreamChunk) -> None:
        self.request_id = chunk.request_id or self.request_id
        self.token_ids.extend(chunk.token_ids)
        self.text.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage

    def result(self) -> GenerationResult:
        if self.finish_reason is None or self.usage is None:
            raise InternalError(
                grpc.StatusCode.INTERNAL,
                f"stream of request {self.request_id!r} ended without a finish_reason and usage",
            )
        return GenerationResult(
            self.request_id,
            tuple(self.token_ids),
            "".join(self.text),
            tuple(self.logprobs),
            self.finish_reason,
            self.usage,
        )


def chunk_from_response(resp: pb.GenerateResponse) -> StreamChunk:
    logprobs = tuple(
        TokenLogprob(lp.token_id, lp.logprob, tuple(TopLogprob(t.token_id, t.logprob) for t in lp.top))
        for lp in resp.logprobs
    )
    usage = None
    if resp.HasField("usage"):
        u = resp.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    return StreamChunk(
        resp.request_id,
        tuple(resp.token_ids),
        resp.text,
        logprobs,
        _FINISH_REASONS.get(resp.finish_reason),
        usage,
    )


def check_uint(field: str, value: int, bound: int = _UINT32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise ValueError(f"{field} must be an integer in [0, {bound}), got {value!r}")
    return value


# A prompt: text, token ids, or a conversation of {"role", "content"} messages (sent as `chat`,
# rendered by the server with the model's chat template).
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def is_chat(prompt: Prompt) -> TypeGuard[Sequence[Mapping[str, str]]]:
    return not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], Mapping)


def _chat_message(i: int, m: Mapping[str, str]) -> pb.ChatMessage:
    role, content = (
        m.get("role") if isinstance(m, Mapping) else None,
        m.get("content") if isinstance(m, Mapping) else None,
    )
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(f"chat: messages[{i}] must be a {{'role': str, 'content': str}} mapping, got {m!r}")
    return pb.ChatMessage(role=role, content=content)


def build_request(
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
) -> pb.GenerateRequest:
    """The GenerateRequest for these arguments. Only what protobuf cannot carry is checked here
    (wrong types, negative counts); the server validates values against the model's limits."""
    if isinstance(prompt, bytes | bytearray):
        raise ValueError("prompt must be a str or a sequence of token ids, got bytes")
    if isinstance(stop, str):
        raise ValueError(f"stop must be a sequence of strings, got the string {stop!r}")
    sampling = pb.SamplingParams(
        max_tokens=check_uint("max_tokens", max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=check_uint("top_k", top_k),
        min_p=float(min_p),
        seed=None if seed is None else check_uint("seed", seed, _UINT64),
        stop=list(stop),
        stop_token_ids=[check_uint("stop_token_ids[]", t) for t in stop_token_ids],
        ignore_eos=bool(ignore_eos),
        logprobs=check_uint("logprobs", logprobs),
        repetition_penalty=float(repetition_penalty),
        presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty),
        skip_text=bool(skip_text),  # token ids only: the server does not detokenize (no stop strings)
    )
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=request_id, text=prompt, sampling=sampling)
    if is_chat(prompt):
        chat = pb.ChatMessages(messages=[_chat_message(i, m) for i, m in enumerate(prompt)])
        return pb.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling)
    ids = [check_uint("prompt token id", t) for t in cast("Sequence[int]", prompt)]
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=ids), sampling=sampling)
