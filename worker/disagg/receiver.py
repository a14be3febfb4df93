"""Disaggregated serving inside one engine: the decode side's reservations, waits and give-ups.

The protocol and its memory ordering are in `memory_model/__init__.py`; this file is the
decode worker's bookkeeping around it (all on the engine thread):

    reserve   validate, take the prompt's blocks (prefix-cache hits first), take a mailbox
              slot; the request waits here, outside the scheduler, until its KV arrives
    poll      (every engine step) a slot whose SIGNAL equals the expected value: admit the
              request to decode with the producer's first token; a request past its
              handoff timeout: give up (ABORT word), then recompute it locally or fail it
    give up   the reserved blocks are QUARANTINED under a private owner id, never freed,
              until the late completion (or the producer's abort acknowledgement) arrives
              or the pool reports the producer dead: a late copy can never land in blocks
              another request owns

Invariant (checked by `check_integrity`): every reserved block belongs to exactly one pending
entry, and running + reserved sequences never exceed max_num_seqs.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import torch

from kvrelay.memory_model.mailbox import Mailbox, Payload, Status
from kvrelay.memory_model.shm import SharedRegion
from kvrelay.memory_model.transport import PeerDescriptor, PoolLayout, node_id

from ..kv_cache.block_allocator import BlockAllocator
from ..protocol import HANDOFF_WAIT_BUCKETS_S, HandoffTarget, TokenLogprobs
from ..request import FinishReason, Request, RequestOutput
from ..sampling_params import SamplingParams
from ..scheduler import Scheduler

log = logging.getLogger("kvrelay")

POLICIES = ("recompute", "fail")


class HandoffHost(Protocol):
    """What the receiver uses of the engine it serves (`Engine` is one): its block allocator and
    scheduler (reservations hold blocks and count against the running batch), its request table,
    and the verbs that admit, requeue or end a request whose handoff resolved. A protocol, so this
    module does not import the engine that imports it."""

    allocator: BlockAllocator
    scheduler: Scheduler
    requests: dict[str, Request]

    def validate(self, ids: list[int], params: SamplingParams) -> None: ...

    def new_request(
        self, request_id: str, ids: list[int], params: SamplingParams, deadline: float | None
    ) -> Request: ...

    def admit_handed_off(self, req: Request, first: tuple[int, TokenLogprobs | None]) -> RequestOutput: ...

    def requeue_locally(self, req: Request) -> None: ...

    def finish_unscheduled(self, req: Request, reason: FinishReason) -> RequestOutput: ...


class HandoffBusy(Exception):
    """No sequence slot, KV blocks or mailbox slot for another handoff right now (not an error:
    the pool then runs the request on the decode worker as a plain request)."""


@dataclass
class _Pending:
    slot: int
    expected: int
    producer: str
    give_up_at: float  # time.monotonic()
    owner: str  # allocator owner of the reserved blocks
    request: Request | None  # None once given up (the entry then only guards its blocks)
    request_id: str
    reserved_at: float = 0.0  # time.monotonic()


class HandoffReceiver:
    def __init__(
        self,
        engine: HandoffHost,
        kv_caches: list[torch.Tensor],
        layout: PoolLayout,
        *,
        region: SharedRegion | None,
        timeout_s: float,
        policy: str,
        num_slots: int,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"handoff_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self._engine = engine
        self._kv_caches = kv_caches  # [2, num_blocks, block_size, kv_heads, head_dim] per layer
        # A CPU pool's shared memory (prefill workers write it; held here so it stays mapped).
        self._region = region
        self.timeout_s = timeout_s
        self.policy = policy
        self.key = uuid.uuid4().hex
        self.mailbox = Mailbox(num_slots, epoch=secrets.randbelow((1 << 32) - 1) + 1)
        self._pending: dict[str, _Pending] = {}  # request id (or quarantine id) -> entry
        self.num_completed = 0
        # Reservation to KV arrival, per HANDOFF_WAIT_BUCKETS_S bound and +Inf (Prometheus).
        self.wait_counts = [0] * (len(HANDOFF_WAIT_BUCKETS_S) + 1)
        self.wait_sum_s = 0.0
        self.num_given_up = 0
        self.descriptor = self._describe(kv_caches, layout)

    def _describe(self, kv_caches: list[torch.Tensor], layout: PoolLayout) -> PeerDescriptor:
        region = self._region
        common = {
            "key": self.key,
            "epoch": self.mailbox.epoch,
            "mailbox": self.mailbox.name,
            "num_slots": self.mailbox.num_slots,
            "layout": layout,
            "node": node_id(),
        }
        if kv_caches[0].device.type == "cpu":
            assert region is not None, "a CPU decode pool must live in shared memory"
            return PeerDescriptor(kind="shm", shm_name=region.name, **common)  # type: ignore[arg-type]
        from kvrelay.memory_model import ipc

        return PeerDescriptor(kind="cuda_ipc", ipc=ipc.export_tensors(kv_caches, self.key), **common)  # type: ignore[arg-type]

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        """Requests waiting for their KV: each holds one of the scheduler's reserved sequences."""
        return self._engine.scheduler.num_reserved

    @property
    def num_pending(self) -> int:
        """Active waits plus quarantines: the loop keeps polling while this is non-zero."""
        return len(self._pending)

    @property
    def num_quarantined_blocks(self) -> int:
        alloc = self._engine.allocator
        return sum(len(alloc.block_ids_view(k)) for k, p in self._pending.items() if p.request is None)

    def holds(self, request_id: str) -> bool:
        p = self._pending.get(request_id)
        return p is not None and p.request is not None

    # ---- reserve ----------------------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        deadline: float | None,
        producer: str,
    ) -> HandoffTarget:
        eng = self._engine
        if request_id in eng.requests or request_id in self._pending:
            raise ValueError(f"request_id {request_id!r} is already in use")
        eng.validate(prompt, params)
        sched, alloc = eng.scheduler, eng.allocator
        if len(sched.running) + sched.num_reserved >= sched.max_num_seqs:
            raise HandoffBusy(f"{sched.max_num_seqs} sequences running or reserved")
        if not self.mailbox.num_free:
            raise HandoffBusy("no free mailbox slot")
        cached, num_cached = alloc.get_computed_blocks(prompt)
        if not alloc.allocate_slots(request_id, len(prompt), cached):
            raise HandoffBusy(f"no KV blocks for {len(prompt)} prompt tokens")
        slot, expected = self.mailbox.take()
        req = eng.new_request(request_id, prompt, params, deadline)
        req.num_cached_prompt_tokens = num_cached
        now = time.monotonic()
        self._pending[request_id] = _Pending(
            slot, expected, producer, now + self.timeout_s, request_id, req, request_id, reserved_at=now
        )
        sched.num_reserved += 1
        blocks = alloc.get_block_ids(request_id)
        return HandoffTarget(self.key, slot, expected, list(blocks[len(cached) :]), len(cached))

    # ---- per step -----------------------------------------------------------------------------
    def poll(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for rid, p in list(self._pending.items()):
            if self.mailbox.arrived(p.slot, p.expected):
                outputs += self._arrived(rid, p)
            elif p.request is not None:
                req = p.request
                if req.deadline is not None and req.deadline <= now:
                    outputs.append(self._finish_given_up(rid, p, deadline_exceeded=True))
                elif p.give_up_at <= now:
                    log.warning(
                        "KV handoff of %s timed out after %.1f s; %s", rid, self.timeout_s, self.policy
                    )
                    outputs += self._fallback(rid, p, f"KV handoff timed out after {self.timeout_s:g} s")
        return outputs

    def _arrived(self, rid: str, p: _Pending) -> list[RequestOutput]:
        payload = self.mailbox.payload(p.slot)
        if p.request is None:  # a late completion or an abort acknowledgement: never applied
            self._resolve(rid, p)
            return []
        if payload.status is not Status.OK:
            why = "the prefill worker failed" if payload.status is Status.FAILED else "aborted"
            # The producer has finished with the blocks: free them, then apply the policy.
            req = self._forget(rid, p)
            self._engine.allocator.free(rid)
            return self._apply_policy(req, f"KV handoff: {why}")
        req = self._forget(rid, p)
        self.num_completed += 1
        wait = time.monotonic() - p.reserved_at
        self.wait_counts[bisect.bisect_left(HANDOFF_WAIT_BUCKETS_S, wait)] += 1
        self.wait_sum_s += wait
        return [self._engine.admit_handed_off(req, _token_logprobs(payload))]

    def deliver(
        self, slot: int, expected: int, dst_block_ids: list[int], blocks: list[torch.Tensor], payload: Payload
    ) -> None:
        """The relay transport's arrival (on the engine thread): write the blocks and publish in
        our own mailbox, only while that use is still awaited; a use given up is resolved
        instead (its producer is done), and one already resolved is dropped."""
        entry = next(
            ((k, p) for k, p in self._pending.items() if (p.slot, p.expected) == (slot, expected)), None
        )
        if entry is None or self.mailbox.arrived(slot, expected):
            return
        key, p = entry
        if p.request is None or self.mailbox.aborted(slot, expected):
            if p.request is None:
                self._resolve(key, p)
            return
        held = self._engine.allocator.get_block_ids(key)
        if list(held[len(held) - len(dst_block_ids) :]) != list(dst_block_ids):
            raise RuntimeError(f"relay for {key} names blocks it did not reserve")
        if dst_block_ids:
            kv = self._kv_caches
            ids = torch.tensor(dst_block_ids, dtype=torch.long, device=kv[0].device)
            for layer, data in zip(kv, blocks, strict=True):
                layer.index_copy_(1, ids, data.to(layer.device, non_blocking=True))
        self.mailbox.publish_local(slot, expected, payload)

    # ---- give-ups --------------------------------------------------------------------------
    def cancel(self, request_id: str) -> RequestOutput | None:
        """Abort from the router (or a deadline): the request ends now, its blocks stay quarantined."""
        p = self._pending.get(request_id)
        if p is None or p.request is None:
            return None
        return self._finish_given_up(request_id, p, deadline_exceeded=False)

    def producer_failed(self, request_ids: list[str]) -> list[RequestOutput]:
        """The producer's side never started or ended without copying (refused, down, aborted
        before its export): nothing will be written, so the blocks are freed at once (quarantines
        of these requests end too)."""
        outputs: list[RequestOutput] = []
        wanted = set(request_ids)
        for qid, q in list(self._pending.items()):
            if q.request is None and q.request_id in wanted:
                self._resolve(qid, q)
        for rid in request_ids:
            p = self._pending.get(rid)
            if p is None or p.request is None:
                continue
            req = self._forget(rid, p)
            self._engine.allocator.free(rid)
            outputs += self._apply_policy(req, "KV handoff: the prefill worker could not take the request")
        return outputs

    def give_up(self, request_ids: list[str], why: str) -> list[RequestOutput]:
        """The pool cannot tell whether the producer got these (a call lost with its worker):
        stop waiting, keep the blocks quarantined until the producer's completion or death."""
        outputs: list[RequestOutput] = []
        for rid in request_ids:
            p = self._pending.get(rid)
            if p is not None and p.request is not None:
                outputs += self._fallback(rid, p, why)
        return outputs

    def producer_down(self, producer: str) -> list[RequestOutput]:
        """The pool saw `producer` die: its CUDA context (or process) is gone and will write
        nothing more, so its quarantines are freed and its active waits fall back now."""
        outputs: list[RequestOutput] = []
        for rid, p in list(self._pending.items()):
            if p.producer != producer:
                continue
            if p.request is None:
                self._resolve(rid, p)
                continue
            req = self._forget(rid, p)
            self._engine.allocator.free(rid)
            outputs += self._apply_policy(req, "KV handoff: the prefill worker died")
        return outputs

    def _fallback(self, rid: str, p: _Pending, why: str) -> list[RequestOutput]:
        assert p.request is not None
        req = p.request
        self._quarantine(rid, p)
        return self._apply_policy(req, why)

    def _finish_given_up(self, rid: str, p: _Pending, *, deadline_exceeded: bool) -> RequestOutput:
        assert p.request is not None
        req = p.request
        self._quarantine(rid, p)
        out = self._engine.finish_unscheduled(req, FinishReason.ABORT)
        out.deadline_exceeded = deadline_exceeded
        return out

    def _apply_policy(self, req: Request, why: str) -> list[RequestOutput]:
        self.num_given_up += 1
        if self.policy == "recompute":
            self._engine.requeue_locally(req)
            return []
        out = self._engine.finish_unscheduled(req, FinishReason.ABORT)
        out.error = why
        return [out]

    # ---- entry state -------------------------------------------------------------------------
    def _quarantine(self, rid: str, p: _Pending) -> None:
        """Give up on the wait: ABORT word, blocks to a private owner, the entry stays."""
        self.mailbox.abort(p.slot, p.expected)
        qid = f"handoff-quarantine:{p.slot}:{p.expected:x}"
        self._engine.allocator.transfer(rid, qid)
        del self._pending[rid]
        self._engine.scheduler.num_reserved -= 1
        p.owner, p.request = qid, None
        self._pending[qid] = p

    def _forget(self, rid: str, p: _Pending) -> Request:
        """An active wait ends (arrived or failed); the blocks stay with the request id."""
        assert p.request is not None
        del self._pending[rid]
        self._engine.scheduler.num_reserved -= 1
        self.mailbox.give_back(p.slot)
        return p.request

    def _resolve(self, qid: str, p: _Pending) -> None:
        """A quarantine ends: nothing can write its blocks any more."""
        del self._pending[qid]
        self._engine.allocator.free(qid)
        self.mailbox.give_back(p.slot)

    def check_integrity(self) -> None:
        alloc, sched = self._engine.allocator, self._engine.scheduler
        for owner in self._pending:
            alloc.get_block_ids(owner)  # raises if the entry lost its blocks
        waiting = sum(p.request is not None for p in self._pending.values())
        if sched.num_reserved != waiting:
            raise RuntimeError(
                f"scheduler counts {sched.num_reserved} reserved sequences, receiver {waiting}"
            )
        if self.mailbox.num_free + len(self._pending) != self.mailbox.num_slots:
            raise RuntimeError("mailbox slots leaked")

    def close(self) -> None:
        self.mailbox.close()


def _token_logprobs(payload: Payload) -> tuple[int, TokenLogprobs | None]:
    if payload.logprob is None:
        return payload.token_id, None
    return payload.token_id, TokenLogprobs(payload.token_id, payload.logprob, payload.top)
