"""Continuous batching: which requests run this step, and how many tokens each computes.

Every step has a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). Running requests go first, in arrival order: a decode costs one token,
an unfinished (chunked) prefill costs the rest of its prompt or what is left of the
budget. Waiting requests are then admitted first come, first served while budget, sequences
and KV blocks last; a waiting request that does not fit stops admission (no overtaking),
so a long prompt cannot starve behind a stream of short ones.

When a running request needs a block and none is free, the newest running request is
preempted by recompute: its blocks are freed, its computed-token count drops to zero and it
goes back to the front of the waiting queue. Its sampled tokens stay in ``all_token_ids``,
so when it is rescheduled it prefills prompt + output so far and continues exactly where it
stopped (prefix caching usually makes the recompute cheap).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache.block_allocator import BlockAllocator
from .request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    # This step computes all_token_ids[start : start + num_new_tokens].
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so a token is sampled."""
        return self.start + self.num_new_tokens == len(self.request.all_token_ids)  # num_tokens


@dataclass
class SchedulerOutput:
    """The whole scheduler-to-runner interface for one step; rows keep this order."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests preempted during this schedule (already back in the waiting queue).
    preempted: list[Request] = field(default_factory=list)
    # Requests whose deadline passed before they could run (already removed and freed).
    expired: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # arrival order; the tail is preempted first
        self.num_preemptions = 0
        # Sequences reserved for KV handoffs in flight (worker/disagg/receiver.py): they count against
        # max_num_seqs, so an arriving handoff always finds its place in `running`.
        self.num_reserved = 0

    # ---- queue management -------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit_running(self, request: Request) -> None:
        """A request whose KV was computed elsewhere (a handoff): it joins `running` directly."""
        assert len(self.running) < self.max_num_seqs, "a handed-off request found no sequence slot"
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of whichever queue holds it and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.allocator.free(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._expire(out)
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            # A step that had to preempt is short of blocks: admitting now would only thrash.
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Runs for every running request every step: locals, not attribute and property lookups.
        running, scheduled, allocate = self.running, out.scheduled, self.allocator.allocate_slots
        i = 0
        while i < len(running) and budget > 0:  # `running` shrinks when a request is preempted
            req = running[i]
            if req.final_token_pending:  # finishes when its in-flight step resolves
                i += 1
                continue
            computed = req.num_computed_tokens
            num_new = len(req.all_token_ids) - computed  # req.num_tokens_to_compute
            if num_new > budget:
                num_new = budget
            assert num_new > 0, f"running request {req.request_id} has nothing to compute"
            while not allocate(req.request_id, computed + num_new):
                victim = running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, computed, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req preempted itself: nothing after it in `running` is left
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) + self.num_reserved < self.max_num_seqs:
            req = self.waiting[0]
            computed_blocks, num_cached = self.allocator.get_computed_blocks(req.all_token_ids)
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.allocator.allocate_slots(req.request_id, num_cached + num_new, computed_blocks):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_cached_prompt_tokens < 0:  # first admission, not a resume after preemption
                req.num_cached_prompt_tokens = min(num_cached, req.num_prompt_tokens)
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_cached, num_new))
            budget -= num_new

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.allocator.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        # The victim is the tail of `running`, at or after the request being scheduled, so it
        # has not been given tokens in this step.
        assert all(s.request is not req for s in out.scheduled)

    def _expire(self, out: SchedulerOutput) -> None:
        now = time.monotonic()
        for queue in (self.running, self.waiting):
            for req in [r for r in queue if r.deadline is not None and r.deadline <= now]:
                self.remove(req)
                out.expired.append(req)
