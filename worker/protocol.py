"""Messages between the router and a worker actor: the whole router-to-worker interface.

Every worker<->router contract lives here: `ModelDescription` (what a pool serves), `WorkRequest`
and `HandoffTarget` (router -> worker), `TokenDelta` (the one output type: an engine step's and a
poll's), `WorkerLoad` with its `EngineStats`, `StepBatch`, and the prompt check both sides run.

Everything here crosses a Ray call, so it is small plain data (slotted dataclasses of ints,
floats and strings). Both directions are batched: the router submits every request bound
for one worker in one call, and a worker returns every request's progress since the last
poll in one `StepBatch` (one message per engine step at most, never one call per token).

Text never crosses: the router tokenizes prompts and detokenizes outputs (stop strings
included: when one matches, the router aborts the request on its worker).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's logprobs; crosses to the router inside `TokenDelta`."""

    token_id: int  # the sampled token
    # Its logprob under the raw distribution: before penalties, temperature and filters (vLLM v1's
    # default, logprobs_mode="raw_logprobs").
    logprob: float
    top: tuple[tuple[int, float], ...]  # top-N (token id, logprob), highest first


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context limit
    ABORT = "abort"  # cancelled, deadline passed, or the engine shut down


@dataclass(frozen=True)
class ModelDescription:
    """Identical on every worker of a pool; the router validates requests against it."""

    model: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    # Total KV capacity of ONE worker in tokens: a request larger than this can never run.
    kv_capacity_tokens: int
    model_dir: (
        str | None
    )  # a HF directory or .gguf file the router loads the tokenizer from; None = token ids only


@dataclass(slots=True)
class HandoffTarget:
    """Where a prefill worker sends a request's KV blocks (disaggregated serving).

    Made by the decode worker when it reserves the blocks (`HandoffReceiver.reserve`); the
    prefill worker copies its blocks [skip_blocks, skip_blocks + len(dst_block_ids)) of the
    prompt into dst_block_ids of `peer`'s pool and publishes `expected` in mailbox `slot`.
    """

    peer: str  # the decode worker's PeerDescriptor.key
    slot: int
    expected: int
    dst_block_ids: list[int]
    skip_blocks: int  # leading prompt blocks the decode worker already holds (its prefix cache)


@dataclass(slots=True)
class WorkRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # with stop=() : stop strings are matched by the router
    # Seconds left when the router sent it (the worker turns it into its own monotonic deadline,
    # so clocks of different hosts never meet); None = no deadline.
    timeout_s: float | None = None
    # Disaggregated serving, on a prefill worker: compute the prompt and first token, hand the KV
    # blocks and the token to this target, and finish (the decode worker streams the rest).
    handoff: HandoffTarget | None = None

    def deadline_after(self, arrival: float) -> float | None:
        """This worker's monotonic deadline for a request that arrived at `arrival`; None = none.
        Raises ValueError naming timeout_s when it is not a finite number of seconds."""
        if self.timeout_s is None:
            return None
        if not math.isfinite(self.timeout_s):
            raise ValueError(f"timeout_s must be a finite number of seconds, got {self.timeout_s}")
        return arrival + self.timeout_s  # <= now: expires at the next schedule, never runs


@dataclass(slots=True)
class TokenDelta:
    """A request's progress: what one engine step gained (`Engine.step`), or several steps merged
    (what a worker's poll returns). The one output type of the engine, the loop and the router
    (`worker.request.RequestOutput` is this class)."""

    request_id: str
    token_ids: list[int]  # new since the previous delta
    logprobs: list[TokenLogprobs]  # one per token of token_ids when logprobs were asked for, else []
    finish_reason: FinishReason | None
    # True when the finish was the deadline passing (finish_reason is then ABORT).
    deadline_exceeded: bool
    prompt_tokens: int
    completion_tokens: int  # totals so far, not increments
    cached_prompt_tokens: int
    # Set when the request failed for a reason of the serving system, not of the request (a KV
    # handoff that could not complete under the "fail" policy): the router answers UNAVAILABLE.
    error: str | None = None
    # The detokenized text of token_ids, where the engine detokenizes (offline `Engine.generate`);
    # "" on a worker: the router makes the text, and only tokens cross.
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def empty(
        cls, request_id: str, prompt_tokens: int, completion_tokens: int = 0, cached: int = 0
    ) -> TokenDelta:
        return cls(request_id, [], [], None, False, prompt_tokens, completion_tokens, cached)

    def merge(self, later: TokenDelta) -> None:
        """Folds a later delta of the same request into this one (a poll returns one per request)."""
        assert self.finish_reason is None, f"output for {self.request_id!r} after its final delta"
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.text += later.text
        self.finish_reason = later.finish_reason
        self.deadline_exceeded = later.deadline_exceeded
        self.completion_tokens = later.completion_tokens
        self.cached_prompt_tokens = later.cached_prompt_tokens
        self.error = later.error


def fold_delta(outbox: dict[str, TokenDelta], d: TokenDelta) -> None:
    """Put `d` into an outbox of one delta per request: kept as it is when its request has none
    there, else merged into the one waiting (a slow consumer gets one message per request, never
    one per token). `d` is the outbox's from then on."""
    earlier = outbox.get(d.request_id)
    if earlier is None:
        outbox[d.request_id] = d
    else:
        earlier.merge(d)


# Why a loop stopped on purpose (EngineLoopBroken's message; the data plane logs it as no error).
SHUT_DOWN = "the engine loop is shut down"


class EngineLoopBroken(RuntimeError):
    """The engine raised and is no longer consistent, or the loop was shut down (worker/engine_loop.py;
    defined here so the data plane's own process imports no engine)."""


_HANDOFFS = "kvrelay_worker_kv_handoffs"
_HANDOFFS_DOC = "Disaggregated serving: prompts whose KV a decode worker received or gave up on."

HANDOFF_WAIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Metric:
    """How the router exports one `EngineStats` field to Prometheus, as `worker="<rank>"` series.

    Fields that share a name are one family told apart by `labels` (the handoff results)."""

    kind: Literal["gauge", "counter"]
    name: str
    doc: str
    labels: tuple[tuple[str, str], ...] = ()


def _metric(kind: Literal["gauge", "counter"], name: str, doc: str, **labels: str) -> dict[str, Metric]:
    return {"metric": Metric(kind, name, doc, tuple(labels.items()))}


@dataclass(frozen=True)
class EngineStats:
    """One engine's gauges and cumulative counters, read between steps; crosses to the router inside
    every `WorkerLoad`. A new counter is one field here (with its `Metric`, when Prometheus should
    show it) and its value in `Engine.stats`: ServerStats and the Prometheus collector loop over
    the fields. Counters reset when a worker restarts (Prometheus treats it as a counter reset)."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_used_blocks: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0  # used blocks / total blocks
    # prompt tokens looked up in the prefix cache, and of those the tokens found
    prefix_cache_queries: int = field(
        default=0,
        metadata=_metric(
            "counter", "kvrelay_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ),
    )
    prefix_cache_hits: int = field(
        default=0,
        metadata=_metric(
            "counter", "kvrelay_worker_prefix_cache_hits", "Prompt tokens found in the prefix cache."
        ),
    )
    num_preemptions: int = field(
        default=0,
        metadata=_metric(
            "counter", "kvrelay_worker_preemptions", "Requests preempted for lack of KV blocks."
        ),
    )
    num_steps: int = 0
    num_graph_replays: int = field(
        default=0,
        metadata=_metric(
            "counter", "kvrelay_worker_graph_replays", "Engine steps run as a CUDA graph replay."
        ),
    )
    num_prefill_graph_replays: int = field(
        default=0,
        metadata=_metric(
            "counter",
            "kvrelay_worker_prefill_graph_replays",
            "Engine steps with prefill chunks run as a CUDA graph replay of a token bucket.",
        ),
    )
    num_eager_steps: int = field(
        default=0,
        metadata=_metric("counter", "kvrelay_worker_eager_steps", "Engine steps run eagerly (no graph fit)."),
    )
    # Device memory and seconds the CUDA-graph capture took at start (decode and prefill graphs).
    graph_memory_bytes: int = field(
        default=0,
        metadata=_metric(
            "gauge", "kvrelay_worker_graph_memory_bytes", "Device memory held by the captured CUDA graphs."
        ),
    )
    graph_capture_s: float = 0.0
    # Disaggregated serving, decode workers (worker/disagg/receiver.py); 0 elsewhere.
    num_handoffs_received: int = field(  # prompts whose KV arrived and went on to decode
        default=0, metadata=_metric("counter", _HANDOFFS, _HANDOFFS_DOC, result="received")
    )
    num_handoffs_given_up: int = field(  # timed out, producer failed or died: recomputed or failed
        default=0, metadata=_metric("counter", _HANDOFFS, _HANDOFFS_DOC, result="given_up")
    )
    num_quarantined_blocks: int = field(  # blocks held back from a given-up handoff
        default=0,
        metadata=_metric(
            "gauge",
            "kvrelay_worker_kv_quarantined_blocks",
            "KV blocks held back after a given-up handoff until its producer finishes or dies.",
        ),
    )
    # Per HANDOFF_WAIT_BUCKETS_S bound, then +Inf: handoffs received with a wait in that bucket
    # (not cumulative); and the waits' sum in seconds. Exported as one histogram.
    handoff_wait_counts: tuple[int, ...] = ()
    handoff_wait_sum_s: float = 0.0
    # Engine step time (worker/step_timer.py): per STEP_TIME_BUCKETS_S bound, then +Inf, steps that
    # ran the model and took that long (not cumulative), and their sum in seconds.
    step_time_counts: tuple[int, ...] = ()
    step_time_sum_s: float = 0.0
    # CPU seconds of the worker (0 where not measured): the engine loop thread, the data plane's
    # I/O thread, and the whole worker process (Ray's threads included).
    loop_cpu_s: float = field(
        default=0.0,
        metadata=_metric(
            "counter", "kvrelay_worker_loop_cpu_seconds", "CPU seconds of the engine loop thread."
        ),
    )
    io_cpu_s: float = field(
        default=0.0,
        metadata=_metric(
            "counter", "kvrelay_worker_io_cpu_seconds", "CPU seconds of the data plane's I/O thread."
        ),
    )
    process_cpu_s: float = field(
        default=0.0,
        metadata=_metric(
            "counter", "kvrelay_worker_process_cpu_seconds", "CPU seconds of the worker process."
        ),
    )


@dataclass(slots=True)
class WorkerLoad:
    """What the router balances on, sent with every poll; `stats` rides along for the metrics."""

    num_running: int
    num_waiting: int
    kv_usage: float  # used blocks / total blocks
    num_free_blocks: int
    # Tokens still to be produced or computed by admitted requests (prompt left + max_tokens left).
    outstanding_tokens: int
    num_kv_blocks: int = 0
    # The engine's counters at the same step (ServerStats and Prometheus only; routing never reads
    # them). All zero until the worker's first poll.
    stats: EngineStats = field(default_factory=EngineStats)


@dataclass(slots=True)
class StepBatch:
    deltas: list[TokenDelta] = field(default_factory=list)
    load: WorkerLoad | None = None
    # Requests the worker refused at submit time (request_id -> message naming the field and limit).
    rejected: dict[str, str] = field(default_factory=dict)


def check_prompt_fits(
    ids: Sequence[int],
    max_tokens: int,
    *,
    vocab_size: int,
    max_model_len: int,
    kv_capacity_tokens: int,
    ids_field: str,
    total_field: str | None,
    capacity_name: str = "one worker's KV cache capacity",
) -> None:
    """A non-empty prompt's ids against the vocabulary, the context length and one worker's KV
    capacity: the router's check (`cluster/validation.py`) and the engine's (`Engine.validate`), each
    naming the fields of its own API (ids_field for a bad id, total_field for a total too long) and
    the capacity as its caller sees it."""
    if min(ids) < 0 or max(ids) >= vocab_size:  # C-speed scan first: prompts run to 100k+ tokens
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"{ids_field}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    total = len(ids) + max_tokens
    what = f"{total_field}: prompt" if total_field else "prompt"
    if total > max_model_len:
        raise ValueError(
            f"{what} ({len(ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds max_model_len {max_model_len}"
        )
    if total > kv_capacity_tokens:
        raise ValueError(
            f"{what} ({len(ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds {capacity_name} "
            f"of {kv_capacity_tokens} tokens"
        )
