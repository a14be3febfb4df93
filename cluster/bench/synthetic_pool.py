"""The synthetic worker pool of `kvrelay bench router`: `WorkerPool` over asyncio tasks that emit
tokens on a fixed tick with no model compute, so the router alone is measured (see `router.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from kvrelay.worker.protocol import TokenDelta, TokenLogprobs, WorkerLoad, WorkRequest
from kvrelay.worker.request import FinishReason
from kvrelay.worker.sampling_params import SamplingParams

from ..interfaces import ModelDescription

# The synthetic model: token-id prompts only (no tokenizer unless `SyntheticPool` is given one), room
# for any number of streams.
SYNTHETIC_MODEL = ModelDescription(
    model="synthetic",
    vocab_size=32000,
    max_model_len=4096,
    eos_token_ids=(2,),
    block_size=16,
    kv_capacity_tokens=1 << 24,
    model_dir=None,
)
_FIRST_TOKEN = 1000  # emitted ids start here and cycle below vocab_size, skipping EOS and stop ids

DeltasCallback = Callable[[int, list[TokenDelta]], None]


# ---- the synthetic pool -----------------------------------------------------------------------
@dataclass(eq=False)
class _Held:
    """One request on a synthetic worker."""

    request_id: str
    prompt_tokens: int
    params: SamplingParams
    submitted_at: float  # time.monotonic()
    deadline: float | None  # time.monotonic() after which it is aborted; None = none
    emitted: int = 0

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - self.emitted


def _delta(h: _Held, tokens: list[int], finish: FinishReason | None, expired: bool = False) -> TokenDelta:
    logprobs = [TokenLogprobs(t, 0.0, ((t, 0.0),) * min(h.params.logprobs, 1)) for t in tokens]
    return TokenDelta(
        request_id=h.request_id,
        token_ids=tokens,
        logprobs=logprobs if h.params.logprobs else [],
        finish_reason=finish,
        deadline_exceeded=expired,
        prompt_tokens=h.prompt_tokens,
        completion_tokens=h.emitted,
        cached_prompt_tokens=0,
    )


class SyntheticWorker:
    """A worker whose decode step costs nothing: every tick, one token per request it holds."""

    def __init__(self, rank: int, step_s: float, ttft_s: float) -> None:
        self.rank = rank
        self.step_s = step_s
        self.ttft_s = ttft_s
        self._held: dict[str, _Held] = {}
        self._ended: list[TokenDelta] = []  # final ABORT deltas, sent with the next tick's batch
        self.cpu_s = 0.0  # thread CPU spent making deltas (the pool's own cost, not the router's)
        self.first_token_wait_s = 0.0  # sum over first tokens of (tick time - submit time)
        self.num_first_tokens = 0

    @property
    def healthy(self) -> bool:
        return True

    @property
    def load(self) -> WorkerLoad:
        bs, capacity = SYNTHETIC_MODEL.block_size, SYNTHETIC_MODEL.kv_capacity_tokens
        used = sum(-(-(h.prompt_tokens + h.emitted) // bs) for h in self._held.values())
        total = capacity // bs
        waiting = sum(h.emitted == 0 for h in self._held.values())
        return WorkerLoad(
            num_running=len(self._held) - waiting,
            num_waiting=waiting,
            kv_usage=used / total,
            num_free_blocks=total - used,
            outstanding_tokens=sum(h.remaining for h in self._held.values()),
            num_kv_blocks=total,
        )

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        self.add(requests)
        return {}

    async def abort(self, request_ids: Sequence[str]) -> None:
        self.cancel(request_ids)

    def add(self, requests: Sequence[WorkRequest]) -> None:
        now = time.monotonic()
        for r in requests:
            deadline = None if r.timeout_s is None else now + r.timeout_s
            self._held[r.request_id] = _Held(r.request_id, len(r.prompt_token_ids), r.params, now, deadline)

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Each held one ends with an ABORT delta at the next tick."""
        for rid in request_ids:
            h = self._held.pop(rid, None)
            if h is not None:
                self._ended.append(_delta(h, [], FinishReason.ABORT))

    def tick(self, now: float) -> list[TokenDelta]:
        """One decode step: the deltas of every request that advanced or ended."""
        started = time.thread_time()
        out, self._ended = self._ended, []
        for h in list(self._held.values()):
            if h.deadline is not None and now >= h.deadline:
                del self._held[h.request_id]
                out.append(_delta(h, [], FinishReason.ABORT, expired=True))
                continue
            if h.emitted == 0:
                if now - h.submitted_at < self.ttft_s:
                    continue
                self.first_token_wait_s += now - h.submitted_at
                self.num_first_tokens += 1
            token = self._token(h)
            h.emitted += 1
            # The synthetic model never samples EOS, so ignore_eos or not, only max_tokens ends it.
            finish = FinishReason.LENGTH if h.remaining == 0 else None
            if finish is not None:
                del self._held[h.request_id]
            out.append(_delta(h, [token], finish))
        self.cpu_s += time.thread_time() - started
        return out

    def _token(self, h: _Held) -> int:
        token = _FIRST_TOKEN + h.emitted % (SYNTHETIC_MODEL.vocab_size - _FIRST_TOKEN)
        while token in SYNTHETIC_MODEL.eos_token_ids or token in h.params.stop_token_ids:
            token = _FIRST_TOKEN + (token + 1 - _FIRST_TOKEN) % (SYNTHETIC_MODEL.vocab_size - _FIRST_TOKEN)
        return token

    async def run(self, on_deltas: DeltasCallback) -> None:
        """Tick every step_s on a fixed schedule; a late tick (the loop was busy) is not made up with
        a burst: the next one is a whole step later, as a real engine's next step would be."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.step_s
            delay = next_at - loop.time()
            if delay < 0:
                next_at -= delay
            await asyncio.sleep(max(delay, 0.0))
            deltas = self.tick(time.monotonic())
            if deltas:
                on_deltas(self.rank, deltas)


class SyntheticPool:
    """A `WorkerPool` of `SyntheticWorker`s: no engine, no Ray; its workers never die."""

    def __init__(self, num_workers: int, step_s: float, ttft_s: float, tokenizer: str | None = None) -> None:
        """tokenizer: a GGUF file or a directory with tokenizer.json for the router to load (its text
        path then runs on the emitted ids, which stay below SYNTHETIC_MODEL.vocab_size); None: none."""
        self._workers = [SyntheticWorker(rank, step_s, ttft_s) for rank in range(num_workers)]
        self._tasks: list[asyncio.Task[None]] = []
        self._model = replace(SYNTHETIC_MODEL, model_dir=tokenizer)

    @property
    def workers(self) -> Sequence[SyntheticWorker]:
        return self._workers

    @property
    def model(self) -> ModelDescription:
        return self._model

    def stats(self) -> tuple[float, float, int]:
        """(CPU seconds making deltas, summed synthetic TTFTs in seconds, first tokens), all workers."""
        ws = self._workers
        return (
            sum(w.cpu_s for w in ws),
            sum(w.first_token_wait_s for w in ws),
            sum(w.num_first_tokens for w in ws),
        )

    async def start(
        self,
        on_deltas: DeltasCallback,
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        self._tasks = [
            asyncio.create_task(w.run(on_deltas), name=f"synthetic-{w.rank}") for w in self._workers
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ---- the server child -------------------------------------------------------------------------
