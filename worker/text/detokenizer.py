"""Streams one request's output tokens to text, cutting the text at the first stop string.

Decoding uses the prefix_offset/read_offset technique of vLLM and TGI. `_window` holds the ids from
prefix_offset on; `_window[:_read]` was already turned into text (`_prefix_text` is its decoding) and is
kept only as context, because decoding is not per-token (byte-level BPE splits one character over several
tokens; SentencePiece strips the leading space of the first token). Each new token decodes the whole
window and emits the part past `_prefix_text`, unless that text ends in U+FFFD: then the last character is
probably an incomplete UTF-8 sequence and nothing is emitted until a later token completes it. After an
emission the unread tokens become the next prefix window, so the work per token is O(window).

Stop strings are matched on the emitted text by `stop.StopMatcher`, which holds back text that could
still start one. `step` is what the engine and the router call per batch of new tokens: it adds them and,
when generation ends there for another reason (EOS, a stop token, length, abort), flushes the held-back
text in the same call, so that rule is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .stop import StopMatcher
from .tokenizer import Tokenizer

# Prompt tokens decoded as context for the first output token (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_PROMPT_CONTEXT_TOKENS = 5
# Cap on unread tokens held while the text keeps ending in U+FFFD or stays empty (a run of skipped
# special tokens, or bytes that are genuinely invalid UTF-8). A real incomplete character is resolved
# within a few tokens; past the cap the text is emitted as is so the window cannot grow without bound.
_MAX_UNREAD_TOKENS = 32
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class DetokenizedDelta:
    new_text: str  # text released by this call; never contains (the start of) a matched stop string
    stopped: bool  # a stop string matched; new_text ends right before it
    num_consumed: (
        int  # given tokens consumed: all of them, or up to and including the one completing the stop
    )
    stop_string: str | None = None  # the stop string that matched


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._stop = StopMatcher(stop)  # validates the stop strings first
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = [
            int(i) for i in prompt_ids[max(0, len(prompt_ids) - _PROMPT_CONTEXT_TOKENS) :]
        ]
        self._read = len(self._window)  # index in _window of the first token not yet turned into text
        self._prefix_text = self._decode(self._window)
        self._chunks: list[str] = []  # released text, joined lazily by `text`
        self._finished = False

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of every new_text), never the stop string."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizedDelta:
        if self._finished:
            raise RuntimeError("add_tokens after the detokenizer finished (stop string matched or flushed)")
        released: list[str] = []
        for n, token_id in enumerate(token_ids, start=1):
            self._window.append(int(token_id))
            new_text = self._decode_step(force=False)
            if not new_text:
                continue
            text, stop = self._release(new_text, final=False)
            released.append(text)
            if stop is not None:
                self._finished = True
                return DetokenizedDelta("".join(released), True, n, stop)
        return DetokenizedDelta("".join(released), False, len(token_ids))

    def flush(self) -> DetokenizedDelta:
        """Generation ended for another reason: release the held-back text and any text still waiting
        on an incomplete character (as U+FFFD). Idempotent; num_consumed is 0."""
        if self._finished:
            return DetokenizedDelta("", False, 0)
        self._finished = True
        text, stop = self._release(self._decode_step(force=True), final=True)
        return DetokenizedDelta(text, stop is not None, 0, stop)

    def step(self, token_ids: Sequence[int], *, last: bool) -> DetokenizedDelta:
        """One step's new tokens (possibly none). last: generation ends after them for a reason other
        than a stop string; then the held-back text is flushed into this delta, unless a stop string
        matched within these tokens (stopped: the caller ends the request with STOP and keeps
        token_ids[:num_consumed])."""
        delta = self.add_tokens(token_ids) if token_ids else DetokenizedDelta("", False, 0)
        if not last or delta.stopped:
            return delta
        # A stop string found only by the flush cuts the text but does not change why it finished.
        return DetokenizedDelta(delta.new_text + self.flush().new_text, False, delta.num_consumed)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_step(self, force: bool) -> str:
        """New text from the unread tokens, or "" while it must wait; advances the window on emission."""
        unread = len(self._window) - self._read
        if unread == 0:
            return ""
        full = self._decode(self._window)
        waiting = len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT_CHAR)
        if waiting and not force and unread <= _MAX_UNREAD_TOKENS:
            return ""
        del self._window[: self._read]
        self._read = len(self._window)
        new_text = full[len(self._prefix_text) :]
        self._prefix_text = self._decode(self._window)
        return new_text

    def _release(self, new_text: str, final: bool) -> tuple[str, str | None]:
        """new_text through the stop matcher; returns (text to release, matched stop or None)."""
        text, stop = self._stop.feed(new_text, final=final)
        self._chunks.append(text)
        return text, stop
