"""A worker's part in disaggregated serving, as one object the engine and the loop call at fixed seams.

    KvRole       kv_role "both" (colocated): every engine seam a no-op, every handoff verb refused
    PrefillRole  kv_role "prefill": exports a finished prompt's KV (`export.py`), never decodes
    DecodeRole   kv_role "decode": receives KV into reserved blocks (`receiver.py`)

The engine picks the class from `EngineConfig.kv_role` once (`role_class`) and never branches on
the role again. Seams, in the order a request meets them:

    building     `decodes` (CUDA graphs and their memory), `allocate_pool` (where the KV pool lives)
    add_request  `check_new` (may this worker take it?), `holds` (id held by a pending handoff),
                 `added` (remember it)
    step         `poll` (the KV mailbox: its one call site is `Engine.step`), `export` (after
                 the first token of a request with a `HandoffTarget`)
    abort        `cancel`;  liveness: `num_pending`, `awaiting_kv`;  `stats`, `check_integrity`

The handoff verbs (`reserve`, `deliver`, `connect`, ...) run on the engine loop's thread
(`verbs.py` hops there); a worker asked for another role's verb raises RuntimeError.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypedDict

import torch

from ...memory_model.mailbox import Payload
from ...memory_model.shm import SharedRegion
from ...memory_model.transport import KVSender, PeerDescriptor, PoolLayout, Relay, allocate_shared_pool
from ..config import EngineConfig
from ..kv_cache.block_allocator import BlockAllocator
from ..kv_cache.pool import KVCacheSpec
from ..protocol import HandoffTarget, TokenLogprobs, WorkRequest
from ..request import Request, RequestOutput
from ..sampling_params import SamplingParams
from .export import export_prefill
from .receiver import HandoffBusy, HandoffHost, HandoffReceiver

log = logging.getLogger("kvrelay")

# Handoff ids a prefill worker remembers (accepted, and given up by the pool); oldest dropped first.
_REMEMBERED_IDS = 1 << 16


@dataclass(frozen=True)
class KvPool:
    """The engine's paged KV pool: one [2, num_blocks, block_size, kv_heads, head_dim] tensor per
    layer, its layout, and the shared-memory region holding it (a CPU decode worker's; else None)."""

    caches: list[torch.Tensor]
    layout: PoolLayout
    region: SharedRegion | None = None


class HandoffStats(TypedDict, total=False):
    """The `EngineStats` fields a role fills (a colocated or prefill worker leaves the defaults)."""

    num_handoffs_received: int
    num_handoffs_given_up: int
    num_quarantined_blocks: int
    handoff_wait_counts: tuple[int, ...]
    handoff_wait_sum_s: float


class KvRole:
    """The colocated role and the interface of every role (the subclasses override their seams)."""

    kind: ClassVar[str] = "both"
    # Whether this worker runs decode steps: CUDA graphs (and the memory reserved for them) exist
    # only for decode, so a prefill worker captures none.
    decodes: ClassVar[bool] = True

    @classmethod
    def allocate_pool(cls, spec: KVCacheSpec, layout: PoolLayout, device: torch.device) -> KvPool:
        return KvPool(spec.allocate(layout.num_blocks, device), layout)

    def __init__(self, host: HandoffHost, config: EngineConfig, pool: KvPool) -> None:
        del host, config, pool  # a colocated worker shares its KV with no one

    # ---- engine seams -----------------------------------------------------------------------
    def check_new(self, request_id: str, params: SamplingParams, handoff: HandoffTarget | None) -> None:
        """Raises ValueError naming `handoff` when this worker cannot take the request."""
        if handoff is not None:
            raise ValueError("handoff: this worker is not a prefill worker")

    def added(self, req: Request) -> None:
        """req was queued (after `check_new` and the engine's own checks passed)."""

    def holds(self, request_id: str) -> bool:
        """Whether request_id waits for its KV here (it is then in no scheduler queue)."""
        return False

    def cancel(self, request_id: str) -> RequestOutput | None:
        """End a request that waits for its KV; None when this role does not hold it."""
        return None

    def poll(self) -> list[RequestOutput]:
        """Resolve handoffs: admit arrivals (their first token), give up on timeouts."""
        return []

    def export(
        self, allocator: BlockAllocator, req: Request, token: int, lp: TokenLogprobs | None
    ) -> str | None:
        """req sampled its first token: send its KV where `req.handoff` says. Returns why that
        failed (nothing was written), None when it succeeded or req has no handoff."""
        assert req.handoff is None, "check_new refuses handoffs on this worker"
        return None

    @property
    def num_pending(self) -> int:
        """Handoffs still open (waits and quarantines): the engine has work while this is > 0."""
        return 0

    @property
    def awaiting_kv(self) -> bool:
        """Whether a request waits for KV that may arrive any moment (the loop then polls soon)."""
        return False

    def stats(self) -> HandoffStats:
        return {}

    def check_integrity(self) -> None:
        """Raises RuntimeError when the role's bookkeeping disagrees with the engine's."""

    # ---- handoff verbs (on the engine loop's thread) ------------------------------------------
    def kv_descriptor(self) -> PeerDescriptor:
        raise _not_a("decode")

    def reserve(
        self, r: WorkRequest, producer: str, arrival: float, in_use: Container[str]
    ) -> HandoffTarget | str:
        """Decode: hold blocks and a mailbox slot for r, to be filled by `producer`. Returns the
        target, "busy: ..." (no room: run r as a plain request) or why r is refused."""
        raise _not_a("decode")

    def producer_failed(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        raise _not_a("decode")

    def give_up(self, request_ids: Sequence[str], why: str) -> list[RequestOutput]:
        raise _not_a("decode")

    def producer_down(self, producer: str) -> list[RequestOutput]:
        raise _not_a("decode")

    def deliver(
        self, slot: int, expected: int, dst_block_ids: list[int], blocks: list[torch.Tensor], payload: Payload
    ) -> None:
        raise _not_a("decode")

    def connect(self, peer: PeerDescriptor, relay: Relay | None) -> None:
        raise _not_a("prefill")

    def disconnect(self, key: str) -> None:
        raise _not_a("prefill")

    def forget(self, request_ids: Sequence[str]) -> list[str]:
        """Of these handoff ids, the ones never received (refused from now on): all of them here."""
        return list(request_ids)


class PrefillRole(KvRole):
    kind = "prefill"
    decodes = False

    def __init__(self, host: HandoffHost, config: EngineConfig, pool: KvPool) -> None:
        self.sender = KVSender(pool.caches, pool.layout, force_relay=config.kv_transport == "relay")
        # Ids of handoffs ever accepted, and ids the pool gave up on before they arrived (refused
        # if they arrive late); both bounded, oldest dropped first.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()

    def check_new(self, request_id: str, params: SamplingParams, handoff: HandoffTarget | None) -> None:
        if handoff is None:
            return
        if params.max_tokens != 1:
            raise ValueError(f"handoff: a prefill request has max_tokens 1, got {params.max_tokens}")
        if request_id in self._forgotten:
            raise ValueError(f"handoff: request_id {request_id!r} was already given up")

    def added(self, req: Request) -> None:
        if req.handoff is not None:
            _remember(self._seen, req.request_id)

    def export(
        self, allocator: BlockAllocator, req: Request, token: int, lp: TokenLogprobs | None
    ) -> str | None:
        if req.handoff is None:
            return None
        return export_prefill(self.sender, allocator, req, token, lp)

    def connect(self, peer: PeerDescriptor, relay: Relay | None) -> None:
        self.sender.connect(peer, relay)

    def disconnect(self, key: str) -> None:
        self.sender.disconnect(key)

    def forget(self, request_ids: Sequence[str]) -> list[str]:
        unseen = [rid for rid in request_ids if rid not in self._seen]
        for rid in unseen:
            _remember(self._forgotten, rid)
        return unseen


class DecodeRole(KvRole):
    kind = "decode"

    @classmethod
    def allocate_pool(cls, spec: KVCacheSpec, layout: PoolLayout, device: torch.device) -> KvPool:
        if device.type != "cpu":
            return super().allocate_pool(spec, layout, device)
        # A CPU decode worker's pool lives in shared memory, where prefill workers write it.
        caches, region = allocate_shared_pool(layout)
        return KvPool(caches, layout, region)

    def __init__(self, host: HandoffHost, config: EngineConfig, pool: KvPool) -> None:
        self.receiver = HandoffReceiver(
            host,
            pool.caches,
            pool.layout,
            region=pool.region,
            timeout_s=config.handoff_timeout_s,
            policy=config.handoff_policy,
            num_slots=2 * config.max_num_seqs,
        )

    def holds(self, request_id: str) -> bool:
        return self.receiver.holds(request_id)

    def cancel(self, request_id: str) -> RequestOutput | None:
        return self.receiver.cancel(request_id)

    def poll(self) -> list[RequestOutput]:
        return self.receiver.poll()

    @property
    def num_pending(self) -> int:
        return self.receiver.num_pending

    @property
    def awaiting_kv(self) -> bool:
        return self.receiver.num_active > 0

    def stats(self) -> HandoffStats:
        r = self.receiver
        return {
            "num_handoffs_received": r.num_completed,
            "num_handoffs_given_up": r.num_given_up,
            "num_quarantined_blocks": r.num_quarantined_blocks,
            "handoff_wait_counts": tuple(r.wait_counts),
            "handoff_wait_sum_s": r.wait_sum_s,
        }

    def check_integrity(self) -> None:
        self.receiver.check_integrity()

    def kv_descriptor(self) -> PeerDescriptor:
        return self.receiver.descriptor

    def reserve(
        self, r: WorkRequest, producer: str, arrival: float, in_use: Container[str]
    ) -> HandoffTarget | str:
        try:
            deadline = r.deadline_after(arrival)
            if r.request_id in in_use:
                raise ValueError(f"request_id {r.request_id!r} is already in use")
            return self.receiver.reserve(r.request_id, r.prompt_token_ids, r.params, deadline, producer)
        except HandoffBusy as e:
            return f"busy: {e}"
        except ValueError as e:
            return str(e)

    def producer_failed(self, request_ids: Sequence[str]) -> list[RequestOutput]:
        return self.receiver.producer_failed(list(request_ids))

    def give_up(self, request_ids: Sequence[str], why: str) -> list[RequestOutput]:
        return self.receiver.give_up(list(request_ids), why)

    def producer_down(self, producer: str) -> list[RequestOutput]:
        return self.receiver.producer_down(producer)

    def deliver(
        self, slot: int, expected: int, dst_block_ids: list[int], blocks: list[torch.Tensor], payload: Payload
    ) -> None:
        self.receiver.deliver(slot, expected, dst_block_ids, blocks, payload)


_ROLES: dict[str, type[KvRole]] = {cls.kind: cls for cls in (KvRole, PrefillRole, DecodeRole)}


def role_class(kv_role: str) -> type[KvRole]:
    """The role of `EngineConfig.kv_role` ("both", "prefill" or "decode"; the config checked it)."""
    try:
        return _ROLES[kv_role]
    except KeyError:
        raise ValueError(f"kv_role must be one of {', '.join(_ROLES)}, got {kv_role!r}") from None


def _not_a(kind: str) -> RuntimeError:
    return RuntimeError(f"this worker is not a {kind} worker (kv_role != {kind!r})")


def _remember(ids: OrderedDict[str, None], rid: str) -> None:
    ids[rid] = None
    if len(ids) > _REMEMBERED_IDS:
        ids.popitem(last=False)
