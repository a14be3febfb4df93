"""A GenerateRequest checked against the model's limits and turned into what a worker runs.

Every check raises ValueError whose message starts with the field (as the proto names it) and
states the limit; the router returns it as INVALID_ARGUMENT. Checks that need the prompt's token
ids (length, vocabulary, context, KV capacity) run after a text prompt is tokenized.

Messages larger than the server's `max_message_bytes` never reach this module: gRPC refuses them
itself with RESOURCE_EXHAUSTED ("Received message larger than max").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.protocol import WorkRequest, check_prompt_fits
from kvrelay.worker.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from kvrelay.worker.text.chat_template import MAX_CHAT_MESSAGES, MAX_ROLE_CHARS

from .interfaces import ModelDescription

MAX_REQUEST_ID_LEN = 256
# Text is bounded by characters before any tokenizer work: a text prompt holds at most
# max_model_len * CHARS_PER_TOKEN_BOUND characters, and a chat prompt at most MAX_CHAT_MESSAGES
# messages (the template module's own bound) and as many characters of content. No real tokenizer
# averages anywhere near 16 characters a token, so a prompt past the bound cannot fit the context
# anyway, and refusing it costs no tokenizer time (an 8 MB prompt took 20 s to tokenize and refuse,
# stalling every stream's detokenization meanwhile).
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's chat template (with the generation prompt)."""

    messages: tuple[dict[str, str], ...]  # each {"role": ..., "content": ...}


# What a request asks to complete: text, token ids, or a conversation.
Prompt = str | list[int] | ChatPrompt


@dataclass(frozen=True)
class Limits:
    """What a request is checked against; one per served model."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # one worker's whole KV cache, in tokens
    accepts_text: bool  # the router has the model's tokenizer
    default_max_tokens: int = 16
    max_logprobs: int = MAX_LOGPROBS
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_string_len: int = MAX_STOP_STRING_LEN
    max_stop_token_ids: int = MAX_STOP_TOKEN_IDS
    max_request_id_len: int = MAX_REQUEST_ID_LEN
    has_chat_template: bool = False  # the tokenizer can render a conversation
    max_chat_messages: int = MAX_CHAT_MESSAGES

    @property
    def max_text_chars(self) -> int:
        """Characters a text prompt may hold, or a chat prompt's messages (roles included)."""
        return self.max_model_len * CHARS_PER_TOKEN_BOUND

    @classmethod
    def of(
        cls,
        model: ModelDescription,
        *,
        accepts_text: bool,
        default_max_tokens: int,
        has_chat_template: bool = False,
    ) -> Limits:
        return cls(
            vocab_size=model.vocab_size,
            max_model_len=model.max_model_len,
            kv_capacity_tokens=model.kv_capacity_tokens,
            accepts_text=accepts_text,
            default_max_tokens=default_max_tokens,
            has_chat_template=has_chat_template,
        )


def model_info(model: ModelDescription, limits: Limits) -> pb.ModelInfo:
    """What GetModelInfo tells clients: the model and every limit requests are checked against."""
    return pb.ModelInfo(
        model=model.model,
        vocab_size=model.vocab_size,
        max_model_len=model.max_model_len,
        eos_token_ids=list(model.eos_token_ids),
        max_logprobs=limits.max_logprobs,
        max_stop_strings=limits.max_stop_strings,
        max_stop_string_length=limits.max_stop_string_len,
        accepts_text=limits.accepts_text,
    )


def check_request_id(request_id: str, limits: Limits) -> str:
    """The client's id ("" = the server assigns one)."""
    if len(request_id) > limits.max_request_id_len:
        raise ValueError(f"request_id: at most {limits.max_request_id_len} characters, got {len(request_id)}")
    return request_id


def prompt_of(request: pb.GenerateRequest, limits: Limits | None = None) -> Prompt:
    """The request's prompt as text, token ids or a conversation; with limits, also checked
    (`check_prompt_input`), else only extracted (the router core checks it)."""
    which = request.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt: give text or token_ids (or chat), got none")
    prompt: Prompt
    if which == "text":
        prompt = request.text
    elif which == "chat":
        prompt = ChatPrompt(tuple({"role": m.role, "content": m.content} for m in request.chat.messages))
    else:
        ids = request.token_ids.ids
        # Copy no more than can be refused: a longer list is cut here and refused by the check.
        prompt = list(ids[: MAX_PROMPT_IDS_COPIED + 1]) if len(ids) > MAX_PROMPT_IDS_COPIED else list(ids)
    if limits is not None:
        check_prompt_input(prompt, limits)
    return prompt


# No max_model_len is near this (2**24 tokens).
MAX_PROMPT_IDS_COPIED = 1 << 24


def check_prompt_input(prompt: Prompt, limits: Limits) -> None:
    """What can be checked before tokenizing: an empty prompt, text the model cannot take, too many
    ids, and a conversation's size (bounded before its template renders it)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("text: the prompt must not be empty")
        if not limits.accepts_text:
            raise ValueError("text: this model has no tokenizer, so text prompts are refused; send token_ids")
        if len(prompt) > limits.max_text_chars:
            raise ValueError(
                f"text: {len(prompt)} characters exceed {limits.max_text_chars} "
                f"(max_model_len {limits.max_model_len} x {CHARS_PER_TOKEN_BOUND}); the prompt cannot fit"
            )
    elif isinstance(prompt, ChatPrompt):
        _check_chat(prompt, limits)
    else:
        if not prompt:
            raise ValueError("token_ids: the prompt must hold at least 1 token, got none")
        if len(prompt) > limits.max_model_len:
            raise ValueError(f"token_ids: {len(prompt)} tokens exceed max_model_len {limits.max_model_len}")


def _check_chat(prompt: ChatPrompt, limits: Limits) -> None:
    messages = prompt.messages
    if not messages:
        raise ValueError("chat: give at least 1 message, got none")
    if len(messages) > limits.max_chat_messages:
        raise ValueError(f"chat: at most {limits.max_chat_messages} messages, got {len(messages)}")
    chars = 0
    for i, m in enumerate(messages):
        role = m["role"]
        if not 1 <= len(role) <= MAX_ROLE_CHARS:
            raise ValueError(
                f"chat: message {i}: role must be 1..{MAX_ROLE_CHARS} characters, got {len(role)}"
            )
        chars += len(role) + len(m["content"])
    if chars > limits.max_text_chars:
        raise ValueError(
            f"chat: {chars} characters of messages exceed {limits.max_text_chars} "
            f"(max_model_len {limits.max_model_len} x {CHARS_PER_TOKEN_BOUND})"
        )
    if not limits.has_chat_template:
        raise ValueError("chat: this model has no chat template; send text or token_ids")


def sampling_params(s: pb.SamplingParams, limits: Limits) -> SamplingParams:
    """The request's SamplingParams (stop strings included), with the proto's zeros as defaults."""
    vocab = limits.vocab_size
    max_tokens = s.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_model_len:
        raise ValueError(f"max_tokens: at most max_model_len {limits.max_model_len}, got {max_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise ValueError(f"temperature: must be finite and >= 0, got {s.temperature}")
    top_p = s.top_p if s.top_p != 0 else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1] (0 = off), got {s.top_p}")
    if s.top_k > vocab:
        raise ValueError(f"top_k: must be <= the vocabulary size {vocab} (0 = off), got {s.top_k}")
    if not math.isfinite(s.min_p) or not 0.0 <= s.min_p <= 1.0:
        raise ValueError(f"min_p: must be in [0, 1] (0 = off), got {s.min_p}")
    _check_stop(s.stop, limits)
    if s.skip_text and s.stop:
        raise ValueError(
            f"skip_text: stop strings are matched on the text, which skip_text turns off; "
            f"send skip_text false or no stop strings (got {len(s.stop)})"
        )
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise ValueError(f"stop_token_ids: at most {limits.max_stop_token_ids}, got {len(s.stop_token_ids)}")
    bad = next((t for t in s.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})")
    if s.logprobs > limits.max_logprobs:
        raise ValueError(f"logprobs: at most {limits.max_logprobs}, got {s.logprobs}")
    repetition, presence, frequency = _penalties(s)
    # The checks above mirror SamplingParams' own; anything it still refuses names its field too.
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(s.temperature),
        top_p=float(top_p),
        top_k=s.top_k,
        min_p=float(s.min_p),
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )


def _penalties(s: pb.SamplingParams) -> tuple[float, float, float]:
    """(repetition, presence, frequency); repetition_penalty is optional in the proto (unset = 1, off)
    because its off value is not the proto's zero, which would be refused."""
    repetition = float(s.repetition_penalty) if s.HasField("repetition_penalty") else 1.0
    if not math.isfinite(repetition) or repetition <= 0:
        raise ValueError(f"repetition_penalty: must be finite and > 0 (1 = off), got {repetition}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = float(getattr(s, name))
        if not math.isfinite(value) or not -2.0 <= value <= 2.0:
            raise ValueError(f"{name}: must be in [-2, 2] (0 = off), got {value}")
    return repetition, float(s.presence_penalty), float(s.frequency_penalty)


def _check_stop(stop: Sequence[str], limits: Limits) -> None:
    if not stop:
        return
    if not limits.accepts_text:
        raise ValueError(
            "stop: this model has no tokenizer, so stop strings cannot be matched; use stop_token_ids"
        )
    if len(stop) > limits.max_stop_strings:
        raise ValueError(f"stop: at most {limits.max_stop_strings} stop strings, got {len(stop)}")
    for s in stop:
        if not 1 <= len(s) <= limits.max_stop_string_len:
            raise ValueError(
                f"stop: each stop string must be 1..{limits.max_stop_string_len} characters, got {len(s)}"
            )


def check_prompt(ids: Sequence[int], params: SamplingParams, limits: Limits) -> None:
    """The prompt's ids against the vocabulary, the context length and one worker's KV capacity."""
    if not ids:
        raise ValueError("text: the prompt tokenized to no tokens")
    check_prompt_fits(
        ids,
        params.max_tokens,
        vocab_size=limits.vocab_size,
        max_model_len=limits.max_model_len,
        kv_capacity_tokens=limits.kv_capacity_tokens,
        ids_field="token_ids",
        total_field="max_tokens",
    )


def remaining_context(num_prompt_tokens: int, limits: Limits) -> int:
    """The most tokens a prompt of this length may generate: to the end of the context, within
    one worker's KV cache (<= 0 when the prompt alone fills it; check_prompt then refuses it)."""
    return min(limits.max_model_len, limits.kv_capacity_tokens) - num_prompt_tokens


def work_request(
    worker_id: str, ids: list[int], params: SamplingParams, timeout_s: float | None
) -> WorkRequest:
    """What the worker runs: stop strings stay with the router, which matches them on text."""
    worker_params = dataclasses.replace(params, stop=()) if params.stop else params
    return WorkRequest(worker_id, ids, worker_params, timeout_s)
