"""OpenAI response bodies built from the router's `pb.GenerateResponse`s: whole responses, stream
chunks, usage and logprobs, in the exact shapes of OpenAI's API (chat: `chat.completion` /
`chat.completion.chunk`; completions: `text_completion`).

Logprob token strings are each token decoded alone (special tokens kept); a token that is part of
a UTF-8 sequence decodes to U+FFFD, and `bytes` holds that string's UTF-8, as vLLM reports it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.text.tokenizer import Tokenizer

JSON = dict[str, Any]

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",  # the worker gave up on the request (vLLM's word for it)
}


def usage(resp: pb.GenerateResponse) -> JSON:
    u = resp.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class Completion:
    """One request's OpenAI identity and the pieces of its answer, whole or streamed."""

    chat: bool
    model: str
    num_top_logprobs: int  # the top alternatives asked for (the engine may send more)
    want_logprobs: bool
    tokenizer: Tokenizer | None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text_offset: int = 0  # completions' logprobs.text_offset: characters of output so far
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (with include_usage)
    prompt_tokens: int = 0  # the prompt's length, for the usage of chunks before the last
    completion_tokens: int = 0  # tokens streamed so far

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, obj: str) -> JSON:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- logprobs -------------------------------------------------------------------------
    def logprobs(self, entries: Sequence[pb.TokenLogprobs]) -> JSON | None:
        if not self.want_logprobs:
            return None
        tok, n = self.tokenizer, self.num_top_logprobs
        if self.chat:
            content = []
            for e in entries:
                text = _token_text(tok, e.token_id)
                tops = []
                for t in e.top[:n]:
                    t_text = _token_text(tok, t.token_id)
                    tops.append({"token": t_text, "logprob": t.logprob, "bytes": list(t_text.encode())})
                content.append(
                    {"token": text, "logprob": e.logprob, "bytes": list(text.encode()), "top_logprobs": tops}
                )
            return {"content": content}
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries:
            text = _token_text(tok, e.token_id)
            tokens.append(text)
            token_logprobs.append(e.logprob)
            top_logprobs.append({_token_text(tok, t.token_id): t.logprob for t in e.top[:n]})
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    # ---- whole responses --------------------------------------------------------------------
    def response(self, parts: Sequence[pb.GenerateResponse]) -> JSON:
        """The whole answer from every response of the stream (the last one finished it)."""
        text = "".join(p.text for p in parts)
        last = parts[-1]
        lp = self.logprobs([e for p in parts for e in p.logprobs])
        choice: JSON = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = lp
        choice["finish_reason"] = FINISH_REASONS[last.finish_reason]
        return {**self._head(self.object), "choices": [choice], "usage": usage(last)}

    # ---- stream chunks ------------------------------------------------------------------------
    def first_chunk(self, include_usage: bool) -> JSON | None:
        """Chat's opening chunk, `delta.role` (completions have none)."""
        if not self.chat:
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        chunk = self._chunk([choice], include_usage)
        if include_usage and self.continuous_usage:
            chunk["usage"] = self._usage_so_far()
        return chunk

    def chunk(self, resp: pb.GenerateResponse, include_usage: bool) -> JSON:
        self.completion_tokens += len(resp.token_ids)
        finish = FINISH_REASONS[resp.finish_reason] if resp.HasField("usage") else None
        choice: JSON = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": resp.text} if resp.text or finish is None else {}
        else:
            choice["text"] = resp.text
        choice["logprobs"] = self.logprobs(resp.logprobs)
        choice["finish_reason"] = finish
        chunk = self._chunk([choice], include_usage)
        if include_usage and self.continuous_usage:
            # the last response carries the server's own counts (cached tokens too)
            chunk["usage"] = usage(resp) if resp.HasField("usage") else self._usage_so_far()
        return chunk

    def _usage_so_far(self) -> JSON:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def usage_chunk(self, last: pb.GenerateResponse) -> JSON:
        """include_usage's final chunk: no choices, the request's usage."""
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(last)}

    def _chunk(self, choices: list[JSON], include_usage: bool) -> JSON:
        chunk = {**self._head(self.chunk_object), "choices": choices}
        if include_usage:
            chunk["usage"] = None  # OpenAI sends null on every chunk but the usage one
        return chunk
