"""The worker's step loop without Ray: threads, merged deltas, aborts, deadlines, failures."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import make_engine, random_prompts

from kvrelay.worker.engine import Engine
from kvrelay.worker.engine_loop import EngineLoop, EngineLoopBroken
from kvrelay.worker.protocol import StepBatch, TokenDelta, WorkRequest
from kvrelay.worker.request import FinishReason
from kvrelay.worker.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
LONG = SamplingParams(max_tokens=3000, ignore_eos=True)  # runs for seconds unless stopped


def make_loop_engine(**overrides: Any) -> Engine:
    return make_engine(detokenize=False, **overrides)


@pytest.fixture
def engine() -> Engine:
    return make_loop_engine()


@pytest.fixture
def loop(engine: Engine) -> Iterator[EngineLoop]:
    with EngineLoop(engine) as lp:
        yield lp


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(6, [1, 7, 16, 33, 50, 3], 256, seed=5)


@pytest.fixture(scope="module")
def reference(prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in make_loop_engine().generate(prompts, GREEDY)]


def work(
    rid: str, prompt: list[int], params: SamplingParams = GREEDY, timeout_s: float | None = None
) -> WorkRequest:
    return WorkRequest(rid, prompt, params, timeout_s=timeout_s)


def drain(loop: EngineLoop, ids: set[str], timeout_s: float = 20.0) -> dict[str, TokenDelta]:
    """Poll until every id has its final delta; returns each request's deltas merged."""
    merged: dict[str, TokenDelta] = {}
    end = time.monotonic() + timeout_s
    while not all(i in merged and merged[i].finish_reason is not None for i in ids):
        assert time.monotonic() < end, f"unfinished after {timeout_s} s: {merged}"
        batch = loop.poll(0.5)
        for d in batch.deltas:
            if d.request_id in merged:
                m = merged[d.request_id]
                assert m.finish_reason is None, f"delta for {d.request_id} after its final one"
                m.token_ids += d.token_ids
                m.finish_reason, m.deadline_exceeded = d.finish_reason, d.deadline_exceeded
                m.completion_tokens = d.completion_tokens
            else:
                merged[d.request_id] = d
    return merged


def poll_until_tokens(loop: EngineLoop, ids: set[str]) -> dict[str, TokenDelta]:
    seen: dict[str, TokenDelta] = {}
    end = time.monotonic() + 10
    while not ids <= seen.keys():
        assert time.monotonic() < end
        seen.update((d.request_id, d) for d in loop.poll(0.5).deltas)
    return seen


def assert_empty(loop: EngineLoop) -> None:
    loop.check_integrity()
    s = loop.stats()
    assert (s.num_running, s.num_waiting, s.num_used_blocks) == (0, 0, 0)


def test_batches_from_another_thread_match_generate(
    loop: EngineLoop, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    requests = [work(f"r{i}", p) for i, p in enumerate(prompts)]
    results: list[dict[str, str]] = []

    def submitter() -> None:  # two batches, the second while the first is running
        results.append(loop.submit(requests[:3]))
        results.append(loop.submit(requests[3:]))

    t = threading.Thread(target=submitter)
    t.start()
    merged = drain(loop, {r.request_id for r in requests})
    t.join()
    assert results == [{}, {}]
    for i, p in enumerate(prompts):
        d = merged[f"r{i}"]
        assert d.token_ids == reference[i]
        assert (d.finish_reason, d.deadline_exceeded) == (FinishReason.LENGTH, False)
        assert (d.prompt_tokens, d.completion_tokens) == (len(p), GREEDY.max_tokens)
    assert_empty(loop)


def test_poll_merges_every_step_per_request(
    loop: EngineLoop, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    assert loop.submit([work("a", prompts[0]), work("b", prompts[1])]) == {}
    end = time.monotonic() + 10
    while loop.stats().num_steps < GREEDY.max_tokens:  # both finish within max_tokens steps
        assert time.monotonic() < end
        time.sleep(0.01)
    batch = loop.poll(0.0)
    assert [(d.request_id, d.token_ids, d.finish_reason) for d in batch.deltas] == [
        ("a", reference[0], FinishReason.LENGTH),
        ("b", reference[1], FinishReason.LENGTH),
    ]
    assert batch.load is not None and (batch.load.outstanding_tokens, batch.load.num_running) == (0, 0)
    assert loop.poll(0.0) == StepBatch(deltas=[], load=batch.load)


def test_load_counts_tokens_left_to_compute_and_generate(engine: Engine, loop: EngineLoop) -> None:
    real_step = engine.step
    engine.step = lambda **_: []  # type: ignore[method-assign]  # nothing runs: requests stay waiting
    assert loop.submit([work("a", [5] * 10), work("b", [6] * 5, SamplingParams(max_tokens=3))]) == {}
    load = loop.poll(0.05).load
    assert load is not None
    assert (load.num_waiting, load.num_running) == (2, 0)
    assert load.outstanding_tokens == (10 + 12) + (5 + 3)
    assert (load.num_free_blocks, load.num_kv_blocks, load.kv_usage) == (512, 512, 0.0)
    engine.step = real_step  # type: ignore[method-assign]
    drain(loop, {"a", "b"})
    load = loop.poll(0.0).load
    assert load is not None and (load.outstanding_tokens, load.num_waiting) == (0, 0)


def test_abort_frees_blocks_within_a_step(loop: EngineLoop, prompts: list[list[int]]) -> None:
    ids = {"x", "y", "z"}
    assert loop.submit([work(i, prompts[4], LONG) for i in sorted(ids)]) == {}
    poll_until_tokens(loop, ids)
    loop.abort(["x", "y", "never-submitted"])
    s = loop.stats()  # runs after the abort on the loop thread (calls are FIFO)
    assert (s.num_running, s.num_waiting) == (1, 0)
    loop.abort(["z"])
    merged = drain(loop, ids)
    assert {i: (d.finish_reason, d.deadline_exceeded) for i, d in merged.items()} == {
        i: (FinishReason.ABORT, False) for i in ids
    }
    assert all(0 < d.completion_tokens < LONG.max_tokens for d in merged.values())
    assert_empty(loop)


def test_deadline_stops_a_running_request_and_an_expired_one_never_starts(
    loop: EngineLoop, prompts: list[list[int]]
) -> None:
    assert (
        loop.submit([work("late", prompts[2], LONG, timeout_s=0.3), work("dead", prompts[3], timeout_s=0.0)])
        == {}
    )
    started = time.monotonic()
    merged = drain(loop, {"late", "dead"})
    assert time.monotonic() - started < 2.0
    late, dead = merged["late"], merged["dead"]
    assert (late.finish_reason, late.deadline_exceeded) == (FinishReason.ABORT, True)
    assert 0 < late.completion_tokens < LONG.max_tokens
    assert (dead.finish_reason, dead.deadline_exceeded, dead.token_ids) == (FinishReason.ABORT, True, [])
    assert_empty(loop)


def test_bad_requests_are_rejected_by_name_and_the_rest_run(
    loop: EngineLoop, prompts: list[list[int]]
) -> None:
    rejected = loop.submit(
        [
            work("ok", prompts[0]),
            work("vocab", [1, 999]),
            work("empty", []),
            work("too-long", [1], SamplingParams(max_tokens=4096)),
            work("top-k", [1], SamplingParams(top_k=321)),
            work("nan-timeout", [1], timeout_s=math.nan),
            work("ok", prompts[1]),
        ]
    )
    assert rejected == {
        "vocab": "prompt: token id 999 is outside the vocabulary [0, 320)",
        "empty": "prompt: must hold at least 1 token, got an empty prompt",
        "too-long": "prompt (1 tokens) + max_tokens (4096) = 4097 exceeds max_model_len 4096",
        "top-k": "top_k must be <= the vocabulary size 320, got 321",
        "nan-timeout": "timeout_s must be a finite number of seconds, got nan",
        "ok": "request_id 'ok' is already in use",
    }
    merged = drain(loop, {"ok"})
    assert merged.keys() == {"ok"} and merged["ok"].finish_reason is FinishReason.LENGTH
    # Finished but unread: the id stays taken until its last delta is polled.
    assert loop.submit([work("ok", prompts[0])]) == {}
    end = time.monotonic() + 10
    while loop.stats().num_steps < 2 * GREEDY.max_tokens:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert loop.submit([work("ok", prompts[0])]) == {
        "ok": "request_id 'ok' is already in use (its last output is unread)"
    }
    assert_empty(loop)


def test_idle_loop_sleeps_and_wakes_on_submit(loop: EngineLoop, prompts: list[list[int]]) -> None:
    assert loop.submit([work("a", prompts[0])]) == {}
    drain(loop, {"a"})
    steps = loop.stats().num_steps
    wakeups = loop.num_wakeups
    time.sleep(0.3)
    assert loop.num_wakeups == wakeups  # asleep on the condition variable: no spinning
    assert loop.stats().num_steps == steps
    assert loop.submit([work("b", prompts[1])]) == {}
    merged = drain(loop, {"b"}, timeout_s=5)
    assert len(merged["b"].token_ids) == GREEDY.max_tokens


def test_failed_step_aborts_in_flight_requests_and_the_loop_serves_on(
    engine: Engine, loop: EngineLoop, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    real_step = engine.step
    calls = 0

    def flaky_step(**kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected step failure")
        return real_step(**kw)

    engine.step = flaky_step  # type: ignore[method-assign]
    assert loop.submit([work("a", prompts[0]), work("b", prompts[1])]) == {}
    merged = drain(loop, {"a", "b"})
    for rid, i in (("a", 0), ("b", 1)):
        assert merged[rid].finish_reason is FinishReason.ABORT
        assert merged[rid].token_ids == reference[i][:2]  # two good steps, then the failure
    assert loop.broken is None
    assert_empty(loop)
    assert loop.submit([work("c", prompts[2])]) == {}
    assert drain(loop, {"c"})["c"].token_ids == reference[2]


def test_inconsistent_engine_breaks_the_loop(
    engine: Engine, loop: EngineLoop, prompts: list[list[int]]
) -> None:

    def bad_step(**_: Any) -> Any:
        raise RuntimeError("injected step failure")

    def bad_check() -> None:
        raise RuntimeError("injected corruption")

    engine.step = bad_step  # type: ignore[method-assign]
    engine.check_integrity = bad_check  # type: ignore[method-assign]
    assert loop.submit([work("a", prompts[0])]) == {}
    batch = loop.poll(5.0)  # the final ABORT delta comes before the loop reports itself broken
    assert [(d.request_id, d.finish_reason) for d in batch.deltas] == [("a", FinishReason.ABORT)]
    why = "engine inconsistent after a failed step: RuntimeError: injected corruption"
    with pytest.raises(EngineLoopBroken, match=why):
        loop.poll(1.0)
    with pytest.raises(EngineLoopBroken, match=why):
        loop.submit([work("b", prompts[0])])
    assert loop.broken == why


def test_shutdown_aborts_live_requests(loop: EngineLoop, prompts: list[list[int]]) -> None:
    assert loop.submit([work("a", prompts[0], LONG)]) == {}
    poll_until_tokens(loop, {"a"})
    loop.shutdown()
    merged = drain(loop, {"a"}, timeout_s=2)
    assert merged["a"].finish_reason is FinishReason.ABORT
    with pytest.raises(EngineLoopBroken, match="shut down"):
        loop.submit([work("b", prompts[0])])
