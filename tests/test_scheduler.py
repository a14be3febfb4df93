"""Scheduler decisions with a real allocator and no model: budgets, FCFS, chunking, preemption."""

from __future__ import annotations

from kvrelay.worker.kv_cache.block_allocator import BlockAllocator
from kvrelay.worker.request import Request, RequestStatus
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.scheduler import Scheduler, SchedulerOutput


def make_scheduler(
    num_blocks: int = 64, *, seqs: int = 8, tokens: int = 64, chunked: bool = True
) -> Scheduler:
    alloc = BlockAllocator(num_blocks, 4, enable_prefix_caching=True)
    return Scheduler(alloc, max_num_seqs=seqs, max_num_batched_tokens=tokens, enable_chunked_prefill=chunked)


def req(rid: str, n: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=100))


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled]


def complete(out: SchedulerOutput, sched: Scheduler, token: int = 7) -> None:
    """What the engine does after a forward pass: advance, and append a token where one was sampled."""
    for s in out.scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
        sched.allocator.cache_full_blocks(
            s.request.request_id, s.request.all_token_ids, s.request.num_computed_tokens
        )
        if s.samples:
            s.request.all_token_ids.append(token)


def test_token_budget_chunks_a_long_prompt_and_decodes_keep_flowing() -> None:
    sched = make_scheduler(tokens=16)
    a, b = req("a", 6), req("b", 40, start=100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("a", 0, 6), ("b", 0, 10)]
    complete(out, sched)
    out = sched.schedule()  # a decodes (1 token) while b's prefill continues (15)
    assert plan(out) == [("a", 6, 1), ("b", 10, 15)]
    assert [s.samples for s in out.scheduled] == [True, False]
    complete(out, sched)
    out = sched.schedule()
    assert plan(out) == [("a", 7, 1), ("b", 25, 15)]
    assert out.scheduled[1].samples
    sched.allocator.check_integrity()


def test_max_num_seqs_and_fcfs_without_overtaking() -> None:
    sched = make_scheduler(seqs=2, tokens=64)
    for i in range(3):
        sched.add(req(f"r{i}", 5, start=10 * i))
    out = sched.schedule()
    assert plan(out) == [("r0", 0, 5), ("r1", 0, 5)]
    assert [r.request_id for r in sched.waiting] == ["r2"]


def test_no_chunking_waits_for_budget() -> None:
    sched = make_scheduler(tokens=16, chunked=False)
    sched.add(req("big", 20))
    sched.add(req("small", 3))
    out = sched.schedule()
    assert plan(out) == []  # big does not fit the budget and small may not overtake it


def test_preempts_newest_and_requeues_it_first() -> None:
    sched = make_scheduler(num_blocks=4, tokens=64)  # 16 token slots
    a, b = req("a", 8), req("b", 7, start=50)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("a", 0, 8), ("b", 0, 7)]
    complete(out, sched)
    out = sched.schedule()  # b fits its 8th token in its 2nd block; a needs a 3rd block: none free
    assert plan(out) == [("a", 8, 1)]
    assert out.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    assert b.all_token_ids[-1] == 7  # the sampled token survives preemption
    sched.allocator.check_integrity()


def test_prefix_cache_shortens_the_prefill() -> None:
    sched = make_scheduler()
    a = req("a", 10)
    sched.add(a)
    out = sched.schedule()
    complete(out, sched)
    sched.remove(a)
    b = req("b", 10)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("b", 8, 2)]  # two full blocks of 4 are cached
    assert b.num_cached_prompt_tokens == 8
