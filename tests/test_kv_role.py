"""The engine's one disaggregation seam (worker/disagg/role.py): which role each kv_role gets, that a
colocated engine never touches a mailbox or shared memory, that each worker refuses the other
roles' handoff verbs, and that the KV mailbox is polled once per step, from `Engine.step` only."""

from __future__ import annotations

from typing import Any

import pytest
from engine_helpers import make_engine, random_prompts, receiver_of

from kvrelay.memory_model import mailbox
from kvrelay.memory_model.transport import PeerDescriptor, PoolLayout
from kvrelay.worker.disagg import role as role_module
from kvrelay.worker.disagg.role import DecodeRole, KvRole, PrefillRole, role_class
from kvrelay.worker.engine_loop import EngineLoop
from kvrelay.worker.protocol import HandoffTarget, WorkRequest
from kvrelay.worker.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_each_kv_role_gets_its_role_and_only_decode_capture_graphs() -> None:
    assert role_class("both") is KvRole and role_class("prefill") is PrefillRole
    assert role_class("decode") is DecodeRole
    assert [role_class(k).decodes for k in ("both", "prefill", "decode")] == [True, False, True]
    with pytest.raises(ValueError, match="kv_role must be one of both, prefill, decode, got 'mixed'"):
        role_class("mixed")


def test_a_colocated_engine_never_touches_a_mailbox_or_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("a colocated engine reached the handoff machinery")

    monkeypatch.setattr(mailbox.Mailbox, "__init__", forbidden)
    monkeypatch.setattr(mailbox.Mailbox, "arrived", forbidden)
    monkeypatch.setattr(role_module, "allocate_shared_pool", forbidden)
    engine = make_engine(num_kv_blocks=64)
    assert type(engine.role) is KvRole
    prompts = random_prompts(3, [5, 17], engine.model_config.vocab_size, seed=1)
    outs = engine.generate(prompts, GREEDY)
    assert [len(o.token_ids) for o in outs] == [4, 4, 4]
    stats = engine.stats()
    assert (stats.num_handoffs_received, stats.handoff_wait_counts, stats.num_quarantined_blocks) == (
        0,
        (),
        0,
    )
    engine.check_integrity()


def test_a_colocated_engine_refuses_a_handoff_request_naming_the_field() -> None:
    engine = make_engine(num_kv_blocks=64)
    target = HandoffTarget("peer", 0, 1, [0], 0)
    with pytest.raises(ValueError, match=r"^handoff: this worker is not a prefill worker$"):
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=1), handoff=target)
    assert not engine.has_unfinished_requests() and engine.requests == {}


def test_each_worker_refuses_the_other_roles_verbs() -> None:
    layout = PoolLayout(1, 1, 16, 1, 8, "float32")
    peer = PeerDescriptor(key="k", epoch=1, mailbox="m", num_slots=1, layout=layout, kind="shm", node="n")
    work = [WorkRequest("r", [1, 2, 3], GREEDY)]
    with EngineLoop(make_engine(num_kv_blocks=64)) as colocated:
        with pytest.raises(RuntimeError, match=r"not a decode worker \(kv_role != 'decode'\)"):
            colocated.reserve(work, "p")
        with pytest.raises(RuntimeError, match=r"not a decode worker"):
            colocated.kv_descriptor()
        with pytest.raises(RuntimeError, match=r"not a prefill worker \(kv_role != 'prefill'\)"):
            colocated.connect(peer)
        assert colocated.forget_handoffs(["a", "b"]) == ["a", "b"]  # it never receives handoffs
    with EngineLoop(make_engine(kv_role="decode", num_kv_blocks=64)) as decode:
        with pytest.raises(RuntimeError, match="not a prefill worker"):
            decode.disconnect("k")
        [(rid, target)] = decode.reserve(work, "p").items()
        assert rid == "r" and isinstance(target, HandoffTarget)
        decode.check_integrity()  # the reservation is live in the loop as in the receiver
    with EngineLoop(make_engine(kv_role="prefill", num_kv_blocks=64)) as prefill:
        with pytest.raises(RuntimeError, match="not a decode worker"):
            prefill.reserve(work, "p")
        target = HandoffTarget("peer", 0, 1, [0], 0)
        refused = prefill.submit([WorkRequest("h", [1, 2, 3], GREEDY, handoff=target)])
        assert refused == {"h": "handoff: a prefill request has max_tokens 1, got 4"}


def test_the_mailbox_is_polled_once_per_step_and_only_by_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = make_engine(kv_role="decode", num_kv_blocks=64)
    receiver = receiver_of(decode)
    polls = 0
    real_poll = receiver.poll

    def counted_poll() -> Any:
        nonlocal polls
        polls += 1
        return real_poll()

    monkeypatch.setattr(receiver, "poll", counted_poll)
    receiver.reserve("r", [1, 2, 3], GREEDY, None, "producer")
    for _ in range(3):
        assert decode.step() == []  # nothing arrived: no output, no model run
    assert (polls, decode.num_steps) == (3, 0)
    # Given up: its blocks stay quarantined, so the mailbox is still watched (by the loop below).
    assert decode.abort_request("r") is not None and decode.has_unfinished_requests()

    polls = 0
    loop = EngineLoop(decode)
    try:
        loop.check_integrity()  # the quarantine keeps the loop stepping (and polling) meanwhile
        loop.check_integrity()
    finally:
        loop.shutdown()
    # The loop reaches the mailbox only through Engine.step: one poll per wake-up at most.
    assert 0 < polls <= loop.num_wakeups
