"""One engine driven by its own thread: the worker's step loop, with no Ray in it.

The engine is not thread-safe, so only the loop thread ever touches it. Every other thread
talks to the loop through two places guarded by one condition variable:

- the inbox: calls to run on the loop thread between two steps (add requests, abort, stats,
  integrity check), each with a `Future` the caller may wait on; FIFO, so a `check_integrity`
  queued after an `abort` sees the abort applied;
- the outbox: per-request `TokenDelta`s published after each step, merged until a poller takes
  them (so a slow poller gets one message per request, never one per token). A consumer that
  pushes (the data plane, `worker/dataplane.py`) sets an output hook, called on the loop thread
  once per step that published something, and then `take`s the outbox from its own thread.

The loop sleeps on the condition variable when it has no live request and an empty inbox, and
`submit`/`abort`/`shutdown` wake it. A step that raises fails every in-flight request with an
ABORT delta; the loop keeps serving if the engine is still consistent, else it is marked broken
(`poll` and `submit` then raise `EngineLoopBroken`, and the pool restarts the worker).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import cProfile
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import torch

from . import hop_trace
from .disagg.verbs import HandoffLoopVerbs, LoopCall
from .engine import Engine
from .protocol import (
    SHUT_DOWN,
    EngineLoopBroken,
    EngineStats,
    StepBatch,
    TokenDelta,
    WorkerLoad,
    WorkRequest,
    fold_delta,
)
from .request import FinishReason, RequestOutput

log = logging.getLogger("kvrelay")
T = TypeVar("T")

# Consecutive failed steps after which the engine is presumed broken even if it looks consistent
# (a poisoned CUDA context fails every step the same way).
MAX_CONSECUTIVE_FAILURES = 3
# When requests are live but a step scheduled nothing (none fits yet), wait this long before
# retrying rather than spin; deadlines are checked at the next schedule.
_STALLED_STEP_WAIT_S = 0.005
# While only KV handoffs are awaited, the mailbox is polled this often: a short real sleep
# rather than a sleep(0) spin, which keeps a core busy and the GIL contended by the actor's RPC
# threads; it adds at most this to noticing an arrival (no TTFT difference measured on the CPU).
_HANDOFF_POLL_S = 50e-6
# A diagnostic: with KVRELAY_LOOP_PROFILE=PATH the loop thread runs under cProfile and writes its
# stats to PATH.<pid> each time it goes idle (scripts/serve_vs_offline.py --profile-dir reads them).
_PROFILE_ENV = "KVRELAY_LOOP_PROFILE"


class OutputSink(Protocol):
    """Where a loop's outputs go instead of its outbox (worker/loop_link.py: to the data plane's own
    process). Called on the loop thread; must not block."""

    def publish(self, outputs: list[RequestOutput], load: WorkerLoad) -> None:
        """One iteration's outputs (possibly none) and the load after it."""
        ...

    def broken(self, why: str) -> None:
        """The loop broke, or was shut down (why == SHUT_DOWN), after its final outputs."""
        ...


class EngineLoop(HandoffLoopVerbs):
    """The loop; its disaggregation verbs (reserve, connect, ...) are `HandoffLoopVerbs`'."""

    _engine: Engine

    def __init__(self, engine: Engine, *, name: str = "kvrelay-engine-loop") -> None:
        self._engine = engine
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._inbox: list[tuple[LoopCall[Any], Future[Any]]] = []
        self._outbox: dict[str, TokenDelta] = {}
        self._load = engine_load(self._engine)
        self._stopping = False
        self._broken: str | None = None
        # Touched by the loop thread only: requests added to the engine whose final delta is not
        # yet published, with their latest counts. A step that raises fails exactly these (the
        # engine may already have dropped some of them mid-step).
        self._live: dict[str, RequestOutput] = {}
        self._consecutive_failures = 0
        self.num_wakeups = 0  # loop iterations; tests read it to prove the idle loop sleeps
        # Called on the loop thread after a step published output or the loop broke; must not block
        # (the data plane's wakes its I/O thread). Set before the first submit.
        self._on_output: Callable[[], None] | None = None
        # Set instead of a hook by a consumer in another process: outputs bypass the outbox.
        self._sink: OutputSink | None = None
        self._profile: cProfile.Profile | None = None  # see _PROFILE_ENV; set on the loop thread
        self._profile_path = ""
        self._profile_dirty = False  # a step ran since the last dump
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- API for other threads ----------------------------------------------------------
    def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        """Queue requests (applied between steps); returns the refused ones: id -> message."""
        arrival = time.monotonic()
        batch = list(requests)
        return self._call(lambda _: self._add_all(batch, arrival))

    def submit_future(self, requests: Sequence[WorkRequest]) -> Future[dict[str, str]]:
        """`submit` without waiting: the future holds the refused ones once the loop applied them
        (it is set on the loop thread, before the step that runs them publishes anything)."""
        arrival = time.monotonic()
        batch = list(requests)
        return self._enqueue(lambda _: self._add_all(batch, arrival))

    def set_output_hook(self, hook: Callable[[], None] | None) -> None:
        self._on_output = hook

    def set_output_sink(self, sink: OutputSink | None) -> None:
        """Every iteration's outputs go to `sink.publish` on the loop thread, not to the outbox
        (`poll` and `take` then see none). Set before the first submit."""
        self._sink = sink

    def take(self) -> StepBatch:
        """`poll` without waiting (for a consumer woken by the output hook); once the outbox is
        empty, raises EngineLoopBroken for a shut-down loop too (its consumer has nothing to wait for)."""
        with self._cond:
            if not self._outbox and (self._broken is not None or self._stopping):
                raise EngineLoopBroken(self._broken or SHUT_DOWN)
            deltas = list(self._outbox.values())
            self._outbox.clear()
            return StepBatch(deltas=deltas, load=self._load)

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop requests within one step; each live one gets a final ABORT delta. Does not wait."""
        ids = list(request_ids)
        with contextlib.suppress(EngineLoopBroken):  # a stopped loop already ended every request
            self._enqueue(lambda outputs: self._abort_all(ids, outputs))

    def reset(self) -> None:
        """Abort every live request and drop unread output: the worker is then empty.

        For a worker taken back after it was presumed lost: the router already failed its requests.
        """
        self._call(self._reset)

    def poll(self, timeout_s: float) -> StepBatch:
        """Wait up to timeout_s for progress; returns every delta since the last poll, merged."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while not self._outbox and self._broken is None and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not self._outbox and self._broken is not None:
                raise EngineLoopBroken(self._broken)
            deltas = list(self._outbox.values())
            self._outbox.clear()
            return StepBatch(deltas=deltas, load=self._load)

    def stats(self) -> EngineStats:
        """The engine's counters, with the loop thread's CPU seconds (read on that thread)."""
        return self._call(lambda _: dataclasses.replace(self._engine.stats(), loop_cpu_s=time.thread_time()))

    def stall(self, seconds: float) -> None:
        """Fault injection: the loop thread stops stepping for `seconds` (polls then see no
        progress). Does not wait."""
        self._enqueue(lambda _: time.sleep(seconds))

    def check_integrity(self) -> None:
        """The engine's invariants, plus: every live request of the engine is known to the loop."""
        self._call(lambda _: self._check_integrity())

    def thread_cpu_s(self) -> float:
        """CPU seconds of the loop thread so far, read from any thread (Linux: its CPU clock)."""
        ident = self._thread.ident
        if ident is None or not self._thread.is_alive():
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (AttributeError, OSError):  # not Linux, or the thread just ended
            return 0.0

    @property
    def load(self) -> WorkerLoad:
        """As of the latest step (read from any thread)."""
        with self._cond:
            return self._load

    @property
    def broken(self) -> str | None:
        """Why the loop stopped serving (None while it serves)."""
        with self._cond:
            return self._broken

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort every live request (their final deltas stay pollable) and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _enqueue(self, fn: LoopCall[T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._cond:
            if self._broken is not None:
                raise EngineLoopBroken(self._broken)
            if self._stopping:
                raise EngineLoopBroken(SHUT_DOWN)
            self._inbox.append((fn, fut))
            self._cond.notify_all()
        return fut

    def _call(self, fn: LoopCall[T]) -> T:
        assert threading.current_thread() is not self._thread, "the loop thread would wait on itself"
        fut = self._enqueue(fn)
        while True:
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                # The loop fails pending calls when it breaks, but check in case it died otherwise.
                if not self._thread.is_alive() and not fut.done():
                    raise EngineLoopBroken(self.broken or "the engine loop thread exited") from None

    # ---- the loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        path = os.environ.get(_PROFILE_ENV)
        self._profile = cProfile.Profile() if path else None
        self._profile_path = f"{path}.{os.getpid()}" if path else ""
        if self._profile is not None:
            log.info("engine loop profiled into %s", self._profile_path)
            self._profile.enable()
        try:
            while self._iterate():
                pass
        except BaseException as e:  # a bug in the loop itself: nothing it holds can be trusted
            log.exception("engine loop crashed")
            self._mark_broken(f"the engine loop crashed: {type(e).__name__}: {e}")
            return
        self._drain_on_shutdown()

    def _iterate(self) -> bool:
        """One wake-up: apply the inbox, run one step if anything is live. False = stop."""
        engine = self._engine
        with self._cond:
            if self._profile_dirty and not self._inbox and not engine.has_unfinished_requests():
                assert self._profile is not None
                self._profile.dump_stats(self._profile_path)  # idle: the profile so far is whole
                self._profile.enable()  # dump_stats disables the profiler
                self._profile_dirty = False
            while not self._inbox and not engine.has_unfinished_requests() and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
        self.num_wakeups += 1
        outputs: list[RequestOutput] = []
        for fn, fut in inbox:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(outputs))
                except BaseException as e:
                    fut.set_exception(e)
        if engine.has_unfinished_requests():
            steps = engine.num_steps
            stepped = self._step(outputs)
            self._profile_dirty = self._profile is not None
            if self._broken is not None:
                # `outputs` is dropped: the failed step already published a final ABORT for every
                # live request, those aborted just above included.
                return False
            if not stepped and engine.num_steps == steps:
                # Waiting for a KV handoff: poll the mailbox again soon; otherwise nothing can
                # run until something changes.
                time.sleep(_HANDOFF_POLL_S if engine.role.awaiting_kv else _STALLED_STEP_WAIT_S)
            outputs += stepped
        self._publish(outputs)
        return True

    def _add_all(self, requests: list[WorkRequest], arrival: float) -> dict[str, str]:
        rejected: dict[str, str] = {}
        for r in requests:
            try:
                self._add(r, arrival)
            except ValueError as e:
                rejected[r.request_id] = str(e)
        return rejected

    def _add(self, r: WorkRequest, arrival: float) -> None:
        if r.request_id in self._live:
            raise ValueError(f"request_id {r.request_id!r} is already in use")
        with self._cond:
            unpolled = self._outbox.get(r.request_id)
        if unpolled is not None:  # finished, but its final delta would merge with the new one
            raise ValueError(f"request_id {r.request_id!r} is already in use (its last output is unread)")
        deadline = r.deadline_after(arrival)
        self._engine.add_request(
            r.request_id, r.prompt_token_ids, r.params, deadline=deadline, handoff=r.handoff
        )
        self._live[r.request_id] = TokenDelta.empty(r.request_id, len(r.prompt_token_ids))
        hop_trace.mark("loop_add", (r.request_id,))

    def _abort_all(self, ids: list[str], outputs: list[RequestOutput]) -> None:
        outputs += [out for rid in ids if (out := self._engine.abort_request(rid)) is not None]

    def _reset(self, outputs: list[RequestOutput]) -> None:
        for rid in list(self._live):
            self._engine.abort_request(rid)
        self._live.clear()
        outputs.clear()  # final outputs of calls applied just before this one
        with self._cond:
            self._outbox.clear()

    def _check_integrity(self) -> None:
        self._engine.check_integrity()
        unknown = set(self._engine.requests) - set(self._live)
        if unknown:
            raise RuntimeError(f"engine holds requests the loop does not know: {sorted(unknown)[:5]}")

    def _step(self, pending: list[RequestOutput]) -> list[RequestOutput]:
        """One engine step. pending: this iteration's outputs so far (the inbox's aborts); they are
        published with the first tokens of handoffs that arrived, if any, before the model runs."""

        def stream_first_tokens(arrived: list[RequestOutput]) -> None:
            # TTFT: a handed-off request's first token goes out now, while the step runs, not
            # merged with the second token that the step makes.
            self._publish(pending + arrived)
            pending.clear()

        try:
            outputs = self._engine.step(on_kv_arrival=stream_first_tokens)
        except Exception as e:
            return self._fail_step(e)
        self._consecutive_failures = 0
        return outputs

    def _fail_step(self, error: Exception) -> list[RequestOutput]:
        """Fail every in-flight request; keep serving only if the engine is still consistent."""
        log.exception("engine step failed; failing %d in-flight requests", len(self._live))
        self._consecutive_failures += 1
        outputs: list[RequestOutput] = []
        why: str | None = None
        try:
            for rid in list(self._live):
                out = self._engine.abort_request(rid)
                if out is None:  # dropped by the engine mid-step: it still gets its final delta
                    last = self._live[rid]
                    out = TokenDelta.empty(
                        rid, last.prompt_tokens, last.completion_tokens, last.cached_prompt_tokens
                    )
                outputs.append(out)
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            self._engine.check_integrity()
            if self._engine.allocator.num_used_blocks:
                raise RuntimeError(f"{self._engine.allocator.num_used_blocks} KV blocks still in use")
        except Exception as e:
            log.exception("engine is inconsistent after a failed step")
            why = f"engine inconsistent after a failed step: {type(e).__name__}: {e}"
        if why is None and self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            why = f"{self._consecutive_failures} engine steps failed in a row; last: {type(error).__name__}"
        for out in outputs:
            out.finish_reason = FinishReason.ABORT
        self._publish(outputs)
        if why is not None:
            self._mark_broken(why)
        return []

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._live.pop(out.request_id, None)
            else:
                self._live[out.request_id] = out
        if hop_trace.ENABLED:
            hop_trace.mark("loop_first_token", [o.request_id for o in outputs if o.completion_tokens == 1])
        load = engine_load(self._engine)
        if self._sink is not None:
            with self._cond:
                self._load = load
            self._sink.publish(outputs, load)
            return
        with self._cond:
            for out in outputs:
                _merge(self._outbox, out)
            self._load = load
            if outputs:
                self._cond.notify_all()
        if outputs and self._on_output is not None:
            self._on_output()

    def _mark_broken(self, why: str) -> None:
        with self._cond:
            self._broken = why
            pending, self._inbox = self._inbox, []
            self._cond.notify_all()
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineLoopBroken(why))
        if self._sink is not None:
            self._sink.broken(why)
        if self._on_output is not None:
            self._on_output()

    def _drain_on_shutdown(self) -> None:
        """Abort what is live so pollers see every request end, then refuse further calls."""
        outputs = [out for rid in list(self._live) if (out := self._engine.abort_request(rid)) is not None]
        self._publish(outputs)
        if self._sink is not None:  # after the final deltas, as take() raises only once they are taken
            self._sink.broken(SHUT_DOWN)
        with self._cond:
            pending, self._inbox = self._inbox, []
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineLoopBroken(SHUT_DOWN))


def engine_load(engine: Engine) -> WorkerLoad:
    """What the router balances on, read off an engine between steps."""
    s = engine.stats()
    # Per request: tokens to compute + tokens still to generate = (T - computed) + max_tokens -
    # (T - prompt), with T the tokens so far; summed in the cancelled form, since this runs every
    # step over every request (three property calls each cost ~70 µs a step at 256 requests).
    outstanding = sum(
        len(r.prompt_token_ids) + r.params.max_tokens - r.num_computed_tokens
        for r in engine.requests.values()
    )
    return WorkerLoad(
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        kv_usage=s.kv_usage,
        num_free_blocks=s.num_free_blocks,
        outstanding_tokens=outstanding,
        num_kv_blocks=s.num_kv_blocks,
        stats=s,
    )


def delta_of(out: RequestOutput) -> TokenDelta:
    """One engine step's output as it crosses to the router: its own lists (later steps merge into
    it) and no text (the router makes the text)."""
    return TokenDelta(
        out.request_id,
        list(out.token_ids),
        list(out.logprobs),
        out.finish_reason,
        out.deadline_exceeded,
        out.prompt_tokens,
        out.completion_tokens,
        out.cached_prompt_tokens,
        out.error,
    )


def _merge(outbox: dict[str, TokenDelta], out: RequestOutput) -> None:
    """Put one step's output into the outbox. The engine makes a fresh output object with fresh
    lists every step and keeps no reference to it, so it goes in as is (a copy per token per step
    was a measurable share of the served loop's time). The text is dropped: the router makes it."""
    out.text = ""
    fold_delta(outbox, out)
