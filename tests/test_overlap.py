"""Overlapped scheduling (worker/overlap.py) against today's synchronous step, and the packed one-copy
step inputs (worker/step_inputs.py) against inputs rebuilt from the scheduler output."""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import pytest
from engine_helpers import make_engine, random_prompts, receiver_of, sender_of
from overlap_helpers import assert_same_outputs, check_every_prepare, mixed_workload

from kvrelay.worker.engine import Engine
from kvrelay.worker.request import FinishReason
from kvrelay.worker.sampling_params import SamplingParams

# A token budget of 32 chunks every prompt longer than that; 24 blocks of 16 tokens hold only a few
# of the 10 requests (up to 8 blocks each) at once, so the scheduler preempts.
PRESSURE: dict[str, Any] = {"max_num_batched_tokens": 32, "max_num_seqs": 8, "num_kv_blocks": 24}


def both(**overrides: Any) -> tuple[Engine, Engine]:
    """(synchronous, overlapped) engines of the same config."""
    return make_engine(async_scheduling=False, **overrides), make_engine(async_scheduling=True, **overrides)


def test_overlapped_equals_sync_under_pressure() -> None:
    prompts, params = mixed_workload(lambda: make_engine(async_scheduling=False))
    sync, overlapped = both(**PRESSURE)
    # The 3rd token of request 0's free run becomes the model's EOS for requests that honour it.
    eos = make_engine().generate(prompts[:1], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids[2]
    for engine in (sync, overlapped):
        engine.eos_token_ids = frozenset({eos})
    checked = check_every_prepare(overlapped)
    want = sync.generate(prompts, params)
    got = overlapped.generate(prompts, params)
    assert_same_outputs(got, want)
    reasons = [o.finish_reason for o in got]
    assert reasons.count(FinishReason.STOP) >= 3 and FinishReason.LENGTH in reasons, reasons
    assert overlapped.scheduler.num_preemptions > 0
    assert len(checked) == overlapped.num_steps
    for engine in (sync, overlapped):
        engine.check_integrity()
        assert engine.allocator.num_used_blocks == 0
        assert engine.penalties.num_slots == 0


def test_tokens_arrive_one_step_late_and_stopped_slots_are_discarded() -> None:
    prompt = random_prompts(1, [9], 256, seed=3)[0]
    free = make_engine().generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    stop = SamplingParams(max_tokens=8, stop_token_ids=(free[3],), ignore_eos=True)
    sync, overlapped = both()
    overlapped.add_request("r", prompt, stop)
    assert overlapped.step() == []  # the prefill is launched; its token is not known yet
    req = overlapped.requests["r"]
    assert req.all_token_ids[-1] == -1  # a placeholder: row 0 of the step in flight
    first = overlapped.step()  # launches the first decode, then resolves the prefill's token
    assert [o.token_ids for o in first] == [[free[0]]]
    assert req.all_token_ids[len(prompt) :] == [free[0], -1]
    while overlapped.has_unfinished_requests():
        overlapped.step()
    want = sync.generate([prompt], stop)[0]
    assert want.token_ids == free[: free.index(free[3]) + 1]
    # The stop token was known one step late: one more step had been launched, then discarded.
    assert overlapped.num_steps == sync.num_steps + 1
    # max_tokens is known on the host: no step is launched past it.
    sync, overlapped = both()
    capped = SamplingParams(max_tokens=5, ignore_eos=True)
    assert overlapped.generate([prompt], capped)[0].token_ids == free[:5]
    assert sync.generate([prompt], capped)[0].token_ids == free[:5]
    assert overlapped.num_steps == sync.num_steps == 5
    overlapped.check_integrity()


def test_prefix_hits_equal_sync() -> None:
    shared = random_prompts(1, [48], 256, seed=5)[0]
    first = [shared + tail for tail in random_prompts(2, [7, 19], 256, seed=6)]
    second = [shared + tail for tail in random_prompts(3, [4, 30, 11], 256, seed=7)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    sync, overlapped = both()
    for batch in (first, second):
        want = sync.generate(batch, params)
        got = overlapped.generate(batch, params)
        assert_same_outputs(got, want)
    assert [o.cached_prompt_tokens for o in got] == [48, 48, 48]
    overlapped.check_integrity()
    assert overlapped.allocator.prefix_cache_hits == sync.allocator.prefix_cache_hits


def test_abort_mid_flight_drops_the_token_and_frees_blocks() -> None:
    prompts = random_prompts(3, [20, 35, 8], 256, seed=9)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    want = make_engine().generate(prompts, params)
    engine = make_engine(async_scheduling=True)
    for rid, p in zip("abc", prompts, strict=True):
        engine.add_request(rid, p, params)
    delivered: dict[str, list[int]] = {rid: [] for rid in "abc"}
    for _ in range(4):
        for out in engine.step():
            delivered[out.request_id] += out.token_ids
    assert engine._inflight is not None  # b's 4th token is being computed
    final = engine.abort_request("b")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert final.token_ids == [] and final.completion_tokens == len(delivered["b"]) == 3
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "b"
            delivered[out.request_id] += out.token_ids
    assert delivered == {"a": want[0].token_ids, "b": want[1].token_ids[:3], "c": want[2].token_ids}
    engine.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_packed_inputs_equal_rebuilt_inputs_every_step() -> None:
    """Sync path, chunked prefill and preemption: block-table rows are rewritten, grown and shrunk."""
    prompts, params = mixed_workload(lambda: make_engine(async_scheduling=False))
    engine = make_engine(async_scheduling=False, **PRESSURE)
    checked = check_every_prepare(engine)
    engine.generate(prompts, params)
    assert len(checked) == engine.num_steps > 20
    assert engine.scheduler.num_preemptions > 0
    engine.check_integrity()


def test_disaggregated_handoff_with_both_workers_overlapped() -> None:
    """A prefill worker's request ends at its first token (known on the host: no extra step), the
    decode worker continues from the producer's token; both overlapped, same tokens as colocated."""
    params = SamplingParams(
        max_tokens=10, temperature=0.8, seed=5, repetition_penalty=1.4, logprobs=2, ignore_eos=True
    )
    prompts = random_prompts(4, [5, 33, 18], 256, seed=12)
    want = make_engine(async_scheduling=False).generate(prompts, params)
    prefill = make_engine(kv_role="prefill", num_kv_blocks=128, async_scheduling=True)
    decode = make_engine(kv_role="decode", num_kv_blocks=128, async_scheduling=True)
    sender_of(prefill).connect(receiver_of(decode).descriptor)
    for i, p in enumerate(prompts):
        target = receiver_of(decode).reserve(f"r{i}", p, params, None, "prefill-0")
        prefill.add_request(f"r{i}", p, dataclasses.replace(params, max_tokens=1), handoff=target)
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            assert out.error is None and out.finish_reason is FinishReason.LENGTH
    assert prefill.num_steps == 1  # every prompt in one step, and no step past the first token
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finished: set[str] = set()
    deadline = time.monotonic() + 60
    while len(finished) < len(prompts) and time.monotonic() < deadline:
        for out in decode.step():
            got[out.request_id] += out.token_ids
            if out.finish_reason is not None:
                finished.add(out.request_id)
    assert [got[f"r{i}"] for i in range(len(prompts))] == [o.token_ids for o in want]
    for engine in (prefill, decode):
        engine.check_integrity()
        assert engine.allocator.num_used_blocks == 0


def _drive(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams], abort_at: dict[str, int]
) -> dict[str, tuple[list[int], FinishReason | None, int]]:
    """Step until done, aborting request r once it has delivered abort_at[r] tokens.
    -> {id: (tokens, finish reason, completion_tokens of the final output)}"""
    got: dict[str, list[int]] = {}
    final: dict[str, tuple[FinishReason | None, int]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"q{i}", p, sp)
        got[f"q{i}"] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.token_ids
            if out.finish_reason is not None:
                final[out.request_id] = (out.finish_reason, out.completion_tokens)
        for rid, k in abort_at.items():
            if rid not in final and len(got[rid]) >= k:
                out = engine.abort_request(rid)
                assert out is not None
                final[rid] = (out.finish_reason, out.completion_tokens)
    engine.check_integrity()
    assert engine.allocator.num_used_blocks == 0
    return {rid: (got[rid], *final[rid]) for rid in got}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workloads_with_aborts_equal_sync(seed: int) -> None:
    rng = random.Random(seed)
    n = 7
    prompts = random_prompts(n, [rng.randrange(1, 60) for _ in range(n)], 256, seed=seed)
    aborted = rng.sample(range(n), 2)  # these run long and are aborted after 1..4 delivered tokens
    params = [
        SamplingParams(
            max_tokens=12 if i in aborted else rng.randrange(1, 12),
            temperature=rng.choice([0.0, 0.7]),
            seed=rng.randrange(1000),
            top_k=rng.choice([0, 30]),
            presence_penalty=rng.choice([0.0, 0.0, 0.5]),
            ignore_eos=i in aborted or rng.random() < 0.5,
            logprobs=rng.choice([0, 0, 2]),
        )
        for i in range(n)
    ]
    abort_at = {f"q{i}": rng.randrange(1, 5) for i in aborted}
    config = {"max_num_batched_tokens": 24, "max_num_seqs": 6, "num_kv_blocks": 14}
    sync, overlapped = both(**config)
    want = _drive(sync, prompts, params, abort_at)
    assert _drive(overlapped, prompts, params, abort_at) == want
    assert [want[rid][1:] for rid in abort_at] == [(FinishReason.ABORT, k) for k in abort_at.values()]
