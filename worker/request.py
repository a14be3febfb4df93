"""Request state inside one engine, and what the engine hands back per step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .protocol import FinishReason, HandoffTarget, TokenDelta, TokenLogprobs
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .text.detokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # never scheduled, or preempted and waiting to be recomputed
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Tokens that end the request unless params.ignore_eos (the model's EOS ids).
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    # time.monotonic() after which the request is aborted; None = no deadline.
    deadline: float | None = None
    # Prompt followed by every token sampled so far; the scheduler feeds the model from it.
    all_token_ids: list[int] = field(init=False)
    # Tokens of all_token_ids whose K/V is in the paged cache (including prefix-cache hits).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache the first time the request was scheduled.
    num_cached_prompt_tokens: int = -1
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # The seed of its sampling noise (params.seed, or one the engine drew at admission): with the
    # count of tokens generated so far, all that its samples depend on besides its logits.
    sampling_seed: int = 0
    detokenizer: IncrementalDetokenizer | None = None
    first_token_time: float | None = None
    # Disaggregated serving, on a prefill worker: where its KV goes once the first token is sampled.
    handoff: HandoffTarget | None = None
    # Overlapped scheduling (worker/overlap.py): the last token of all_token_ids is a placeholder
    # whose value cannot matter, it ends the request (max_tokens, max_model_len); so the request
    # gets no slot in the next step. Never set on the synchronous path.
    final_token_pending: bool = False

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens whose K/V is missing: the whole prompt at first, one token when decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


# One engine step's output of one request (only requests that advanced or finished): the same type
# that crosses to the router, so nothing is copied field by field between them.
RequestOutput = TokenDelta


@dataclass
class CompletionOutput:
    """A whole finished request, as `Engine.generate` and `kvrelay generate --json` report it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason.value,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }
