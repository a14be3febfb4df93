"""The handoff verbs of the engine loop and of the worker actor, mixed into `EngineLoop` and
`WorkerActor` so that neither holds disaggregation code of its own.

    pool (cluster/disagg.py) --Ray--> WorkerActor (HandoffActorVerbs: delegate)
        --> EngineLoop (HandoffLoopVerbs: hop to the loop thread) --> Engine.role (role.py: act)

Decode worker: kv_descriptor, reserve, handoff_failed, producer_down, receive_kv. Prefill
worker: connect, disconnect, forget_handoffs. A verb of the other role raises RuntimeError
(see `KvRole`); a colocated worker has none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import torch

from ...memory_model.mailbox import Payload
from ...memory_model.transport import PeerDescriptor, Relay
from ..protocol import HandoffTarget, TokenDelta, WorkRequest
from ..request import RequestOutput
from .role import KvRole

T = TypeVar("T")
# A call run on the loop thread between steps; it may append final outputs (aborts) to the list.
LoopCall = Callable[[list[RequestOutput]], T]


class _RoleHolder(Protocol):
    role: KvRole


class HandoffLoopVerbs:
    """Each verb runs on the loop thread (the engine and its role are confined to it): `_call`
    waits for the result, `_enqueue` does not. The loop provides the members declared here."""

    _engine: _RoleHolder
    # Requests of the engine whose final delta is not yet published (the loop's, see EngineLoop).
    _live: dict[str, RequestOutput]

    def _call(self, fn: LoopCall[T]) -> T:
        raise NotImplementedError  # EngineLoop's: run fn on the loop thread and wait

    def _enqueue(self, fn: LoopCall[T]) -> Future[T]:
        raise NotImplementedError  # EngineLoop's: run fn on the loop thread, do not wait

    def kv_descriptor(self) -> PeerDescriptor:
        """Decode worker: how producers reach this incarnation's pool and mailbox (immutable, so
        read from any thread)."""
        return self._engine.role.kv_descriptor()

    def reserve(self, requests: Sequence[WorkRequest], producer: str) -> dict[str, HandoffTarget | str]:
        """Decode worker: reserve blocks and a mailbox slot per request, to be filled by
        `producer`. Per request: its HandoffTarget, "busy: ..." (run it here as a plain request
        instead) or the refusal message (bad input)."""
        arrival = time.monotonic()
        batch = list(requests)
        return self._call(lambda _: self._reserve_all(batch, producer, arrival))

    def _reserve_all(
        self, requests: list[WorkRequest], producer: str, arrival: float
    ) -> dict[str, HandoffTarget | str]:
        result: dict[str, HandoffTarget | str] = {}
        for r in requests:
            outcome = self._engine.role.reserve(r, producer, arrival, in_use=self._live)
            result[r.request_id] = outcome
            if isinstance(outcome, HandoffTarget):
                self._live[r.request_id] = TokenDelta.empty(r.request_id, len(r.prompt_token_ids))
        return result

    def handoff_failed(self, request_ids: Sequence[str], *, certain: bool = True) -> None:
        """Decode worker: the producer side never started for these (certain: nothing will be
        written), or may or may not have (a call lost with its worker: quarantine them)."""
        ids = list(request_ids)
        if certain:
            self._enqueue(lambda outputs: outputs.extend(self._engine.role.producer_failed(ids)))
        else:
            why = "KV handoff: the prefill worker was lost"
            self._enqueue(lambda outputs: outputs.extend(self._engine.role.give_up(ids, why)))

    def producer_down(self, producer: str) -> None:
        """Decode worker: `producer` is dead; its handoffs fall back, its quarantines end."""
        self._enqueue(lambda outputs: outputs.extend(self._engine.role.producer_down(producer)))

    def receive_kv(
        self, slot: int, expected: int, dst_block_ids: list[int], blocks: list[torch.Tensor], payload: Payload
    ) -> None:
        """Decode worker: blocks relayed by a producer (see memory_model/transport.py). Does not wait."""
        self._enqueue(lambda _: self._engine.role.deliver(slot, expected, dst_block_ids, blocks, payload))

    def forget_handoffs(self, request_ids: Sequence[str]) -> list[str]:
        """Prefill worker: of these, the ids it never received; they are refused from now on, so
        the pool may tell their decode workers that nothing will ever be written for them."""
        ids = list(request_ids)
        return self._call(lambda _: self._engine.role.forget(ids))

    def connect(self, peer: PeerDescriptor, relay: Relay | None = None) -> None:
        """Prefill worker: open a decode worker's pool and mailbox (once per incarnation), or
        keep `relay` to reach it through the host (across nodes)."""
        self._call(lambda _: self._engine.role.connect(peer, relay))

    def disconnect(self, key: str) -> None:
        self._call(lambda _: self._engine.role.disconnect(key))


class HandoffActorVerbs:
    """The actor's side: Ray calls these; each delegates to the loop (`_loop`, the actor's)."""

    _loop: HandoffLoopVerbs

    def kv_descriptor(self) -> PeerDescriptor:
        """Decode worker: how producers reach this incarnation's pool and mailbox."""
        return self._loop.kv_descriptor()

    def reserve(self, requests: Sequence[WorkRequest], producer: str) -> dict[str, HandoffTarget | str]:
        return self._loop.reserve(requests, producer)

    def handoff_failed(self, request_ids: Sequence[str], certain: bool = True) -> None:
        self._loop.handoff_failed(request_ids, certain=certain)

    def forget_handoffs(self, request_ids: Sequence[str]) -> list[str]:
        """Prefill worker: which of these it never received (and will now refuse)."""
        return self._loop.forget_handoffs(request_ids)

    def producer_down(self, producer: str) -> None:
        self._loop.producer_down(producer)

    def connect(self, peer: PeerDescriptor, consumer: Any = None) -> None:
        """Prefill worker: open a decode worker's pool and mailbox; `consumer` (its actor handle)
        is the relay used when that is impossible (another node) or configured."""
        self._loop.connect(peer, None if consumer is None else _relay_through(consumer))

    def receive_kv(
        self, slot: int, expected: int, dst: list[int], blocks: list[Any], payload: Payload
    ) -> None:
        """Decode worker: relayed KV blocks (the relay transport)."""
        self._loop.receive_kv(slot, expected, dst, blocks, payload)

    def disconnect(self, key: str) -> None:
        self._loop.disconnect(key)


def _relay_through(consumer: Any) -> Relay:
    """The relay transport's send: a fire-and-forget call of the decode actor's receive_kv."""

    def relay(slot: int, expected: int, dst: list[int], blocks: list[Any], payload: Payload) -> None:
        consumer.receive_kv.remote(slot, expected, dst, blocks, payload)

    return relay
