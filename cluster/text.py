"""Text on the router: prompts tokenized off the event loop, outputs detokenized per request.

Workers see token ids only. The router loads the model's tokenizer.json once (from
`ModelDescription.model_dir`); a model without one serves token-id prompts only.

Tokenizing a long prompt takes milliseconds to seconds, so prompts longer than
`inline_max_chars` are encoded on a small thread pool rather than on the event loop. (The gain is
bounded by the GIL: `Tokenizer.encode` calls the Rust tokenizer's `encode`, which holds it;
`encode_batch` releases it.) Detokenizing is incremental (`IncrementalDetokenizer`: O(new tokens)
per step, UTF-8 safe, stop strings held back until they can no longer match) and cheap enough to
run on the loop.

`ResponseBuilder` turns one request's worker deltas into its GenerateResponses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.protocol import TokenDelta
from kvrelay.worker.request import FinishReason
from kvrelay.worker.text.detokenizer import IncrementalDetokenizer
from kvrelay.worker.text.tokenizer import Tokenizer

from .interfaces import ModelDescription

log = logging.getLogger("kvrelay")

FINISH_REASONS: dict[FinishReason, pb.FinishReason] = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class TextCodec:
    def __init__(self, tokenizer: Tokenizer | None, *, threads: int = 2, inline_max_chars: int = 512) -> None:
        self.tokenizer = tokenizer
        self._inline_max_chars = inline_max_chars
        self._pool: ThreadPoolExecutor | None = None
        if tokenizer is not None:
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvrelay-tokenize")

    @classmethod
    def load(cls, model: ModelDescription, **kwargs: int) -> TextCodec:
        """The model's tokenizer (a GGUF file's, or a directory's tokenizer.json), else a codec without text."""
        tokenizer = Tokenizer.load(model.model_dir) if model.model_dir is not None else None
        if tokenizer is None:
            log.info("model %s has no tokenizer: serving token-id prompts only", model.model)
        return cls(tokenizer, **kwargs)

    @property
    def accepts_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and self.tokenizer.chat_template is not None

    async def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The conversation rendered with the model's chat template (with the generation prompt) and
        tokenized, on the thread pool: a template is Jinja, run per request, and may be slow.
        ValueError("chat: ...") for a model without a template or a template that fails."""
        tok = self.tokenizer
        if tok is None or self._pool is None:
            raise ValueError("chat: this model has no tokenizer, so chat prompts are refused; send token_ids")
        render = functools.partial(tok.apply_chat_template, messages, add_generation_prompt=True)
        return await asyncio.get_running_loop().run_in_executor(self._pool, render)

    async def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise ValueError("text: this model has no tokenizer, so text prompts are refused; send token_ids")
        if len(text) <= self._inline_max_chars or self._pool is None:
            return tok.encode(text)
        return await asyncio.get_running_loop().run_in_executor(self._pool, tok.encode, text)

    def detokenizer(self, prompt_ids: Sequence[int], stop: Sequence[str]) -> IncrementalDetokenizer | None:
        """A per-request detokenizer (None without a tokenizer: responses then carry no text)."""
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, stop=stop)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class ResponseBuilder:
    """One request's deltas -> GenerateResponses: new tokens, new text, logprobs, and on the last one
    the finish reason and usage.

    A stop string is matched on the text: the response that completes it carries the tokens up to
    and including the one that completed it and the text before the stop string, and finishes with
    STOP. The worker still runs the request then; the caller aborts it there.
    """

    def __init__(self, request_id: str, detokenizer: IncrementalDetokenizer | None) -> None:
        self.request_id = request_id
        self._detok = detokenizer
        self.num_tokens = 0  # streamed so far
        self.finished = False

    def build(self, d: TokenDelta) -> tuple[pb.GenerateResponse | None, bool]:
        """(the response, or None when the delta carries nothing to send; True when a stop string
        ended the request here, so the worker must be told to abort it)."""
        assert not self.finished, f"delta for {self.request_id!r} after its last response"
        tokens, logprobs, finish = d.token_ids, d.logprobs, d.finish_reason
        text, stopped = "", False
        if self._detok is not None and (tokens or finish is not None):
            # The engine's local text path makes the same call (held-back text flushed on the last).
            delta = self._detok.step(tokens, last=finish is not None)
            text = delta.new_text
            if delta.stopped:
                stopped, finish = True, FinishReason.STOP
                tokens, logprobs = tokens[: delta.num_consumed], logprobs[: delta.num_consumed]
        self.num_tokens += len(tokens)
        if finish is None and not tokens and not text:
            return None, False
        resp = pb.GenerateResponse(request_id=self.request_id, token_ids=tokens, text=text)
        for lp in logprobs:
            resp.logprobs.add(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
        if finish is not None:
            self.finished = True
            resp.finish_reason = FINISH_REASONS[finish]
            resp.usage.prompt_tokens = d.prompt_tokens
            resp.usage.completion_tokens = self.num_tokens
            resp.usage.cached_prompt_tokens = d.cached_prompt_tokens
        return resp, stopped
