"""KV handoff between a prefill engine and a decode engine on the CPU (transport "shm").

Two engines in one process still go through the whole protocol: the decode engine's pool and
mailbox live in shared memory, the producer opens them by name, copies blocks with plain
stores and publishes with a libatomic release store; the consumer polls with relaxed loads
and an acquire fence. Outputs are compared with one colocated engine (same weights, seed).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from engine_helpers import make_engine, random_prompts, receiver_of, sender_of

from kvrelay.memory_model.mailbox import Payload, Status
from kvrelay.worker.engine import Engine
from kvrelay.worker.request import FinishReason, RequestOutput
from kvrelay.worker.sampling_params import SamplingParams

PRODUCER = "prefill-0"


def _pair(**overrides: object) -> tuple[Engine, Engine]:
    prefill = make_engine(kv_role="prefill", num_kv_blocks=128, **overrides)
    decode = make_engine(kv_role="decode", num_kv_blocks=128, **overrides)
    sender_of(prefill).connect(receiver_of(decode).descriptor)
    return prefill, decode


def _collect(
    outs: Sequence[RequestOutput], acc: dict[str, list[int]], done: dict[str, RequestOutput]
) -> None:
    for o in outs:
        acc.setdefault(o.request_id, []).extend(o.token_ids)
        if o.finished:
            done[o.request_id] = o


def _disaggregated(
    prefill: Engine,
    decode: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    run_producer: bool = True,
) -> tuple[dict[str, list[int]], dict[str, RequestOutput]]:
    acc: dict[str, list[int]] = {}
    done: dict[str, RequestOutput] = {}
    for i, p in enumerate(prompts):
        target = receiver_of(decode).reserve(f"r{i}", p, params, None, PRODUCER)
        if run_producer:
            prefill.add_request(f"r{i}", p, dataclasses.replace(params, max_tokens=1), handoff=target)
    while prefill.has_unfinished_requests():
        for o in prefill.step():
            assert o.error is None and o.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    deadline = time.monotonic() + 60
    while len(done) < len(prompts) and time.monotonic() < deadline:
        _collect(decode.step(), acc, done)
    return acc, done


def _colocated(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [c.token_ids for c in make_engine(num_kv_blocks=128).generate(prompts, params)]


def _clean(*engines: Engine) -> None:
    for e in engines:
        e.check_integrity()
        assert e.allocator.num_used_blocks == 0
        assert not e.has_unfinished_requests()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7, ignore_eos=True, logprobs=3),
        # The decode worker's counts must include the first token, which the prefill worker sampled.
        SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=1.0),
    ],
    ids=["greedy", "seeded-logprobs", "penalized"],
)
def test_disaggregated_equals_colocated(params: SamplingParams) -> None:
    prefill, decode = _pair()
    prompts = random_prompts(6, [5, 16, 33, 47], prefill.model_config.vocab_size, seed=3)
    acc, done = _disaggregated(prefill, decode, prompts, params)
    assert [acc[f"r{i}"] for i in range(len(prompts))] == _colocated(prompts, params)
    assert all(done[f"r{i}"].finish_reason is FinishReason.LENGTH for i in range(len(prompts)))
    assert receiver_of(decode).num_completed == len(prompts)
    stats = decode.stats()  # every arrival timed from its reservation, in the Prometheus buckets
    assert sum(stats.handoff_wait_counts) == len(prompts) and stats.handoff_wait_sum_s > 0
    _clean(prefill, decode)


def test_first_token_logprobs_travel_in_the_mailbox() -> None:
    prefill, decode = _pair()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=5)
    [prompt] = random_prompts(1, [20], prefill.model_config.vocab_size, seed=11)
    target = receiver_of(decode).reserve("a", prompt, params, None, PRODUCER)
    prefill.add_request("a", prompt, dataclasses.replace(params, max_tokens=1), handoff=target)
    [pout] = prefill.step()
    first = None
    while first is None:
        first = next(iter(decode.step()), None)
    assert first.token_ids == pout.token_ids
    assert first.logprobs[0].logprob == pytest.approx(pout.logprobs[0].logprob, abs=0)
    assert first.logprobs[0].top == pout.logprobs[0].top


def test_only_blocks_missing_on_the_decode_side_are_sent() -> None:
    prefill, decode = _pair()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    [shared] = random_prompts(1, [48], prefill.model_config.vocab_size, seed=5)
    decode.generate([[*shared, 7]], dataclasses.replace(params, max_tokens=1))  # caches 3 blocks
    prompt = [*shared, 9, 10, 11, 12, 13]
    target = receiver_of(decode).reserve("p", prompt, params, None, PRODUCER)
    assert target.skip_blocks == 3 and len(target.dst_block_ids) == 1
    prefill.add_request("p", prompt, dataclasses.replace(params, max_tokens=1), handoff=target)
    while prefill.has_unfinished_requests():
        prefill.step()
    acc: dict[str, list[int]] = {}
    done: dict[str, RequestOutput] = {}
    while "p" not in done:
        _collect(decode.step(), acc, done)
    assert acc["p"] == _colocated([prompt], params)[0]
    _clean(prefill, decode)


def test_stale_and_wrong_values_are_never_accepted() -> None:
    prefill, decode = _pair()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    [prompt] = random_prompts(1, [10], prefill.model_config.vocab_size)
    target = receiver_of(decode).reserve("s", prompt, params, None, PRODUCER)
    mb = receiver_of(decode).mailbox
    epoch, seq = target.expected >> 32, target.expected & 0xFFFFFFFF
    peer = sender_of(prefill)._peers[target.peer].mailbox
    for stale in (target.expected - 1, ((epoch + 1) << 32) | seq, 1):  # old seq, other epoch, "non-zero"
        peer.write_payload(target.slot, Payload(Status.OK, 5))
        peer.publish(target.slot, stale)
        assert not mb.arrived(target.slot, target.expected)
        assert decode.step() == [] and receiver_of(decode).holds("s")
    decode.abort_request("s")
    peer.publish(target.slot, target.expected)  # the producer's acknowledgement ends the quarantine
    decode.step()
    _clean(decode)


def test_timeout_recomputes_locally_and_a_late_completion_is_not_applied() -> None:
    prefill, decode = _pair(handoff_timeout_s=0.05)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    [prompt] = random_prompts(1, [40], prefill.model_config.vocab_size, seed=2)
    target = receiver_of(decode).reserve("t", prompt, params, None, PRODUCER)
    time.sleep(0.06)
    acc: dict[str, list[int]] = {}
    done: dict[str, RequestOutput] = {}
    while "t" not in done:
        _collect(decode.step(), acc, done)
    assert acc["t"] == _colocated([prompt], params)[0]  # recomputed on the decode worker
    assert receiver_of(decode).num_given_up == 1
    # The blocks were quarantined, not freed: a late copy could still land in them.
    assert decode.allocator.num_used_blocks == len(target.dst_block_ids) and decode.has_unfinished_requests()
    # The producer now runs late: it sees the abort word, copies nothing and acknowledges.
    prefill.add_request("t", prompt, dataclasses.replace(params, max_tokens=1), handoff=target)
    prefill.step()
    assert decode.step() == []
    _clean(prefill, decode)


def test_fail_policy_and_producer_death() -> None:
    prefill, decode = _pair(handoff_policy="fail")
    params = SamplingParams(max_tokens=5, temperature=0.0)
    [prompt] = random_prompts(1, [20], prefill.model_config.vocab_size)
    receiver_of(decode).reserve("d", prompt, params, None, PRODUCER)
    [out] = receiver_of(decode).producer_down(PRODUCER)
    assert out.finish_reason is FinishReason.ABORT and out.error is not None and "died" in out.error
    _clean(decode)


def test_abort_during_handoff_quarantines_until_the_producer_dies() -> None:
    prefill, decode = _pair()
    params = SamplingParams(max_tokens=5, temperature=0.0)
    [prompt] = random_prompts(1, [33], prefill.model_config.vocab_size)
    receiver_of(decode).reserve("c", prompt, params, None, PRODUCER)
    out = decode.abort_request("c")
    assert out is not None and out.finish_reason is FinishReason.ABORT
    assert decode.allocator.num_used_blocks == 3
    decode.check_integrity()
    assert receiver_of(decode).producer_down(PRODUCER) == []
    _clean(decode)


def test_busy_when_sequences_are_reserved() -> None:
    from kvrelay.worker.disagg.receiver import HandoffBusy

    decode = make_engine(kv_role="decode", num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=2)
    receiver_of(decode).reserve("a", [1, 2, 3], params, None, PRODUCER)
    receiver_of(decode).reserve("b", [1, 2, 3], params, None, PRODUCER)
    with pytest.raises(HandoffBusy):
        receiver_of(decode).reserve("c", [1, 2, 3], params, None, PRODUCER)
    with pytest.raises(ValueError, match="already in use"):
        receiver_of(decode).reserve("a", [1, 2, 3], params, None, PRODUCER)
    with pytest.raises(ValueError, match="max_model_len"):
        receiver_of(decode).reserve(
            "z", [1] * 10, dataclasses.replace(params, max_tokens=10**6), None, PRODUCER
        )
    torch.manual_seed(0)
    for rid in ("a", "b"):
        decode.abort_request(rid)
    receiver_of(decode).producer_down(PRODUCER)
    _clean(decode)


def test_relay_transport_equals_colocated_and_drops_late_deliveries() -> None:
    """The cross-node transport (blocks gathered to host memory, delivered by a call, published
    by the consumer in its own mailbox) on one machine, forced by kv_transport="relay"."""
    prefill = make_engine(kv_role="prefill", num_kv_blocks=128, kv_transport="relay")
    decode = make_engine(kv_role="decode", num_kv_blocks=128)
    deliveries: list[tuple] = []
    sender_of(prefill).connect(receiver_of(decode).descriptor, lambda *a: deliveries.append(a))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(3, [17, 35], prefill.model_config.vocab_size, seed=9)
    targets = [receiver_of(decode).reserve(f"x{i}", p, params, None, PRODUCER) for i, p in enumerate(prompts)]
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        prefill.add_request(f"x{i}", p, dataclasses.replace(params, max_tokens=1), handoff=t)
    while prefill.has_unfinished_requests():
        prefill.step()
    assert len(deliveries) == 3
    decode.abort_request("x2")  # given up before its delivery arrives: nothing may be written
    q_blocks = decode.allocator.num_used_blocks
    for d in deliveries:
        receiver_of(decode).deliver(*d)
    receiver_of(decode).deliver(*deliveries[0])  # a duplicate (already arrived): dropped
    acc: dict[str, list[int]] = {}
    done: dict[str, RequestOutput] = {}
    while len(done) < 2:
        _collect(decode.step(), acc, done)
    assert [acc["x0"], acc["x1"]] == _colocated(prompts[:2], params)
    assert q_blocks > 0
    _clean(prefill, decode)


def test_prefill_loop_forgets_only_handoffs_it_never_received() -> None:
    """After a lost submit the pool asks the prefill worker what it never got: those ids are
    refused from then on, so freeing their reservations is safe; ids it got are not listed."""
    from kvrelay.worker.engine_loop import EngineLoop
    from kvrelay.worker.protocol import HandoffTarget, WorkRequest

    loop = EngineLoop(make_engine(kv_role="prefill", num_kv_blocks=64))
    try:
        params = SamplingParams(max_tokens=1)
        target = HandoffTarget("nobody", 0, 1, [0], 0)
        assert loop.submit([WorkRequest("seen", [1, 2, 3], params, handoff=target)]) == {}
        assert loop.forget_handoffs(["seen", "lost"]) == ["lost"]
        refused = loop.submit([WorkRequest("lost", [1, 2, 3], params, handoff=target)])
        assert refused == {"lost": "handoff: request_id 'lost' was already given up"}
        deadline = time.monotonic() + 30
        deltas = []
        while not any(d.finish_reason for d in deltas) and time.monotonic() < deadline:
            deltas += loop.poll(0.5).deltas
        # "nobody" is not connected: the send fails and says so, writing nothing anywhere.
        assert [d.error for d in deltas if d.finish_reason] == ["KV handoff failed: KeyError"]
    finally:
        loop.shutdown()


def test_decode_loop_streams_the_first_token_before_its_next_step() -> None:
    """TTFT: the decode worker's loop publishes a handed-off request's first token as soon as
    the KV has arrived, while the next model step runs, not merged with the token that step
    makes. Here that step is held until the first token has been polled."""
    from kvrelay.worker.engine_loop import EngineLoop
    from kvrelay.worker.protocol import WorkRequest

    prefill, decode = _pair()
    gate = threading.Event()
    real_execute = decode.runner.execute

    def held_execute(inp: Any) -> torch.Tensor:
        # The step that admitted the request (its KV arrived) would make token 2 here: hold it.
        assert gate.wait(30), "the first token was never polled"
        return real_execute(inp)

    decode.runner.execute = held_execute  # type: ignore[method-assign]
    loop = EngineLoop(decode)
    try:
        [prompt] = random_prompts(1, [40], decode.model_config.vocab_size, seed=3)
        params = SamplingParams(max_tokens=4)
        [(rid, target)] = loop.reserve([WorkRequest("r0", prompt, params)], PRODUCER).items()
        assert not isinstance(target, str), target
        prefill.add_request(rid, prompt, dataclasses.replace(params, max_tokens=1), handoff=target)
        while prefill.has_unfinished_requests():
            prefill.step()
        first = loop.poll(10).deltas
        gate.set()
        assert [len(d.token_ids) for d in first] == [1], first
        deltas = list(first)
        deadline = time.monotonic() + 30
        while not any(d.finish_reason for d in deltas) and time.monotonic() < deadline:
            deltas += loop.poll(0.5).deltas
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == _colocated([prompt], params)[0]
    finally:
        gate.set()
        loop.shutdown()
