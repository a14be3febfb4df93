"""OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) as pydantic models, and their
translation into what `RouterCore.open` takes: a prompt and wire-neutral `pb.SamplingParams`.

Only shapes are checked here (types, ranges OpenAI documents, unsupported options such as n > 1);
every limit that depends on the model (max_tokens against the context, logprobs, stop strings, the
vocabulary) is the router core's, so HTTP and gRPC refuse the same requests with the same message.
Unknown fields are ignored, as vLLM's server does (OpenAI's own answers 400); `extra="ignore"`.

Defaults follow OpenAI: temperature 1.0 and top_p 1.0 when absent. Without max_tokens (or
max_completion_tokens) a chat completion may run to the end of the context (OpenAI's and vLLM's
default), a completion takes the server's `default_max_tokens` (16, OpenAI's too).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvrelay.proto import kvrelay_pb2 as pb

from .validation import ChatPrompt, Prompt

_UINT32 = 2**32 - 1
_UINT64 = 2**64 - 1
_F32_MIN_NORMAL = 1.1754944e-38


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    # vLLM's extension: with include_usage, every chunk carries the usage so far (cumulative
    # completion_tokens), so a client can count each chunk's tokens without logprobs.
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """Fields common to both endpoints (OpenAI's, then vLLM's extras)."""

    model: str
    max_tokens: Annotated[int, Field(ge=1, le=_UINT32)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=_UINT64)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1, le=_UINT32)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return (
            self.include_usage
            and self.stream_options is not None
            and self.stream_options.continuous_usage_stats
        )

    def _sampling(self, max_tokens: int | None, logprobs: int) -> pb.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        s = pb.SamplingParams(
            max_tokens=max_tokens or 0,  # 0: the server's default
            temperature=1.0 if self.temperature is None else self.temperature,
            # top_p rides as float32, where 0 means off: a tiny top_p must not round to it
            top_p=1.0 if self.top_p is None else max(self.top_p, _F32_MIN_NORMAL),
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            stop=stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )
        if self.seed is not None:
            s.seed = self.seed
        if self.repetition_penalty is not None:
            s.repetition_penalty = self.repetition_penalty
        return s


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: Annotated[str, Field(min_length=1)]
    # A string, or content parts of which only text is supported (concatenated, as vLLM does).
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=_UINT32)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    @property
    def num_top_logprobs(self) -> int:
        return self.top_logprobs or 0

    def prompt(self) -> Prompt:
        return ChatPrompt(tuple({"role": m.role, "content": m.text} for m in self.messages))

    def sampling(self) -> pb.SamplingParams:
        # The engine reports the chosen token's logprob beside the top N; N >= 1 turns it on.
        engine_logprobs = max(self.num_top_logprobs, 1) if self.logprobs else 0
        return self._sampling(self.max_completion_tokens or self.max_tokens, engine_logprobs)


class CompletionRequest(_Sampling):
    # A string or a list of token ids; a list of several prompts is refused (n=1 only).
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _single(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) != 1:
            raise ValueError("prompt: one prompt per request is supported, got a list of several")
        if self.echo:
            raise ValueError("echo: not supported")
        if self.suffix is not None:
            raise ValueError("suffix: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        return self

    @property
    def num_top_logprobs(self) -> int:
        return self.logprobs or 0

    def prompt_of(self) -> Prompt:
        p = self.prompt
        if isinstance(p, str):
            return p
        if p and isinstance(p[0], (str, list)):  # a one-element list of prompts
            one = p[0]
            return one if isinstance(one, str) else [int(t) for t in one]
        return [int(t) for t in p if isinstance(t, int)]

    def sampling(self) -> pb.SamplingParams:
        engine_logprobs = 0 if self.logprobs is None else max(self.logprobs, 1)
        return self._sampling(self.max_tokens, engine_logprobs)
