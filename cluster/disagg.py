"""Disaggregated prefill/decode serving: a `WorkerPool` of decode workers fed by prefill workers.

The router sees only the decode workers (they own the streams: `workers`, loads, deltas,
deaths); the prefill workers are this pool's business. One request, from the router's submit
to a decode worker:

    1. reserve   the decode worker takes the prompt's blocks (its prefix-cache hits first) and a
                 mailbox slot, and answers a HandoffTarget; "busy" (no sequence slot or blocks)
                 means the request runs on the decode worker as a plain request instead
    2. prefill   the least-loaded prefill worker computes the prompt and the first token
                 (max_tokens=1, same sampling parameters and seed) and hands the blocks and the
                 token to the decode worker (memory_model: no host round trip on the data path)
    3. decode    the decode worker sees the signal between its steps, admits the request and
                 streams from the first token on: TTFT includes the handoff

Failures: a prefill worker that refuses, is down, or finishes a request without handing it
over (aborted, failed send) is reported to the decode worker (`handoff_failed`); a prefill
worker that dies is reported to every decode worker (`producer_down`), which frees what it
had quarantined for it. A decode worker's handoff timeout covers a producer that stalls. In
every case the decode worker applies its policy (recompute the prompt itself, or fail the
stream with UNAVAILABLE) and no block leaks on either side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from kvrelay.memory_model.transport import PeerDescriptor
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.protocol import EngineStats, HandoffTarget, TokenDelta, WorkerLoad, WorkRequest
from kvrelay.worker.request import FinishReason

from .dataplane import WorkerEndpoint
from .interfaces import ModelDescription, WorkerClient, WorkerPool
from .pool import PoolTimeouts, RayWorkerClient, RayWorkerPool
from .ray_util import ray_future

log = logging.getLogger("kvrelay")
# After a lost submit to a prefill worker, ask it (if it survived) what it never received.
_FORGET_AFTER_S = 1.0


class DecodeClient:
    """A decode worker as the router sees it; submit goes through a prefill worker."""

    def __init__(self, pool: DisaggregatedPool, inner: RayWorkerClient) -> None:
        self._pool = pool
        self._inner = inner
        self.rank = inner.rank

    @property
    def healthy(self) -> bool:
        return self._inner.healthy

    @property
    def load(self) -> WorkerLoad:
        return self._inner.load

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        return await self._pool.submit_via_prefill(self._inner, list(requests))

    async def abort(self, request_ids: Sequence[str]) -> None:
        await self._inner.abort(request_ids)
        await self._pool.abort_prefill(list(request_ids))


class DisaggregatedPool:
    def __init__(
        self,
        engine_config: EngineConfig,
        num_prefill: int,
        num_decode: int,
        device: str,
        ray_address: str | None = None,
        max_restarts: int = 3,
        *,
        timeouts: PoolTimeouts | None = None,
        log_to_driver: bool = True,
        gpus_per_worker: float = 1.0,
    ) -> None:
        if num_prefill < 1 or num_decode < 1:
            raise ValueError(
                f"prefill_workers and decode_workers must be >= 1, got {num_prefill} and {num_decode}"
            )

        def pool(role: str, n: int) -> RayWorkerPool:
            config = dataclasses.replace(engine_config, kv_role=role)
            return RayWorkerPool(
                config,
                n,
                device,
                ray_address,
                max_restarts,
                timeouts=timeouts,
                log_to_driver=log_to_driver,
                gpus_per_worker=gpus_per_worker,
            )

        self._decode = pool("decode", num_decode)
        self._prefill = pool("prefill", num_prefill)
        self._clients: list[DecodeClient] = []
        self._descriptors: dict[int, PeerDescriptor] = {}  # decode rank -> its current incarnation
        self._incarnations: dict[int, str] = {}  # prefill rank -> its current incarnation
        self._inflight: dict[str, tuple[int, int]] = {}  # request id -> (decode rank, prefill rank)
        self._prefill_outstanding: dict[int, int] = {}
        self._on_decode_deltas: Callable[[int, list[TokenDelta]], None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.num_handoffs = 0
        self.num_local = 0

    @property
    def workers(self) -> Sequence[DecodeClient]:
        return self._clients

    @property
    def model(self) -> ModelDescription:
        return self._decode.model

    def endpoints(self) -> list[WorkerEndpoint]:
        """The decode workers' data-plane endpoints: router processes stream from them, and
        relay their submits to this pool's `handoff` (cluster/handoff_relay.py)."""
        return self._decode.endpoints()

    def on_endpoint_change(self, listener: Callable[[WorkerEndpoint | None, int], None]) -> None:
        """As `RayWorkerPool.on_endpoint_change`, for the decode workers (prefill workers are this
        pool's own business)."""
        self._decode.on_endpoint_change(listener)

    @property
    def prefill_pool(self) -> RayWorkerPool:
        return self._prefill

    @property
    def decode_pool(self) -> RayWorkerPool:
        return self._decode

    # ---- start / stop -------------------------------------------------------------------
    async def start(
        self,
        on_deltas: Callable[[int, list[TokenDelta]], None],
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        def decode_up(rank: int) -> None:
            self._spawn(self._decode_back(rank, on_worker_up))

        await self._decode.start(on_deltas, on_worker_down, decode_up)
        try:
            await self._prefill.start(self._prefill_deltas, self._prefill_down, self._prefill_up)
            if not _same_geometry(self._prefill.model, self._decode.model):
                raise RuntimeError(
                    f"prefill workers serve {self._prefill.model}, decode workers {self._decode.model}"
                )
            for w in self._decode.workers:
                self._descriptors[w.rank] = await ray_future(w.actor.kv_descriptor.remote())
            for w in self._prefill.workers:
                await self._connect_prefill(w)
        except BaseException:
            await self.stop()
            raise
        self._clients = [DecodeClient(self, w) for w in self._decode.workers]
        log.info(
            "disaggregated pool ready: %d prefill + %d decode workers",
            len(self._prefill.workers),
            len(self._decode.workers),
        )

    async def _connect_prefill(self, w: RayWorkerClient) -> None:
        self._incarnations[w.rank] = await ray_future(w.actor.incarnation.remote())
        for rank, desc in self._descriptors.items():
            await ray_future(w.actor.connect.remote(desc, self._decode.workers[rank].actor))

    async def stop(self) -> None:
        await self._prefill.stop()
        await self._decode.stop()

    # ---- the request path -----------------------------------------------------------------
    def _pick_prefill(self) -> RayWorkerClient | None:
        healthy = [w for w in self._prefill.workers if w.healthy and w.rank in self._incarnations]
        if not healthy:
            return None
        return min(
            healthy, key=lambda w: (self._prefill_outstanding.get(w.rank, 0), w.load.outstanding_tokens)
        )

    async def submit_via_prefill(
        self, decode: RayWorkerClient, requests: list[WorkRequest]
    ) -> dict[str, str]:
        rejected, local = await self._handoff(decode, requests, decode.router_id)
        if local:
            rejected.update(await decode.submit(local))
        return rejected

    async def handoff(
        self, rank: int, requests: list[WorkRequest], router_id: str
    ) -> tuple[dict[str, str], list[WorkRequest]]:
        """A router process's submit (cluster/handoff_relay.py): the handoff as `submit_via_prefill`
        does it, the decode worker streaming to `router_id`; returns (refused id -> message, the
        requests the router submits to the decode worker itself). ConnectionError: it is down."""
        decode = self._decode.workers[rank]
        if not decode.healthy:
            raise ConnectionError(f"worker {rank} is unavailable")
        return await self._handoff(decode, requests, router_id)

    async def _handoff(
        self, decode: RayWorkerClient, requests: list[WorkRequest], router_id: str
    ) -> tuple[dict[str, str], list[WorkRequest]]:
        """Reserve on the decode worker (its deltas to router_id) and start the prefill of those
        it took; returns (refused, the ones to run on the decode worker as plain requests)."""
        import ray.exceptions

        prefill = self._pick_prefill()
        if prefill is None:  # degraded: every prefill worker is down, decode workers prefill
            self.num_local += len(requests)
            return {}, requests
        producer = self._incarnations[prefill.rank]
        try:
            answers: dict[str, HandoffTarget | str] = await ray_future(
                decode.actor.reserve.remote(requests, producer, router_id)
            )
        except ray.exceptions.RayError:
            raise ConnectionError(f"worker {decode.rank} is unavailable") from None
        rejected: dict[str, str] = {}
        local: list[WorkRequest] = []
        handed: list[WorkRequest] = []
        for r in requests:
            a = answers[r.request_id]
            if isinstance(a, HandoffTarget):
                params = dataclasses.replace(r.params, max_tokens=1)
                handed.append(dataclasses.replace(r, params=params, handoff=a))
            elif a.startswith("busy: "):
                local.append(r)
            else:
                rejected[r.request_id] = a
        self.num_local += len(local)
        if handed:
            await self._start_prefill(decode, prefill, handed)
        return rejected, local

    async def _start_prefill(
        self, decode: RayWorkerClient, prefill: RayWorkerClient, reqs: list[WorkRequest]
    ) -> None:
        for r in reqs:
            self._inflight[r.request_id] = (decode.rank, prefill.rank)
        self._prefill_outstanding[prefill.rank] = self._prefill_outstanding.get(prefill.rank, 0) + len(reqs)
        try:
            refused = await prefill.submit(reqs)
        except ConnectionError:
            # Lost with its worker: it may or may not have started them, so the decode worker
            # gives up but keeps the blocks until that worker's completion or death is known,
            # or until the worker, if it is still alive, says it never got them.
            log.warning("prefill worker %d was lost with %d handoffs", prefill.rank, len(reqs))
            ids = [r.request_id for r in reqs]
            self._settle(ids, certain=False)
            self._spawn(self._forget_later(prefill, self._incarnations.get(prefill.rank), ids))
            return
        self.num_handoffs += len(reqs) - len(refused)
        if refused:
            log.warning(
                "prefill worker %d refused %d handoffs: %s",
                prefill.rank,
                len(refused),
                next(iter(refused.values())),
            )
            self._settle(list(refused))

    async def _forget_later(self, prefill: RayWorkerClient, incarnation: str | None, ids: list[str]) -> None:
        """After a lost submit: a prefill worker that survived says which ids it never received;
        those are settled for certain (its death would settle all of them instead)."""
        import ray.exceptions

        await asyncio.sleep(_FORGET_AFTER_S)
        if not prefill.healthy or self._incarnations.get(prefill.rank) != incarnation:
            return  # down or restarted: producer_down settles them
        try:
            unseen: list[str] = await ray_future(prefill.actor.forget_handoffs.remote(ids))
        except ray.exceptions.RayError:
            return
        if unseen:
            self._settle(unseen)

    async def abort_prefill(self, request_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        for rid in request_ids:
            if rid in self._inflight:
                by_rank.setdefault(self._inflight[rid][1], []).append(rid)
        for rank, ids in by_rank.items():
            await self._prefill.workers[rank].abort(ids)

    def _settle(self, failed: list[str], *, certain: bool = True) -> None:
        """These never reached (or never left) their prefill worker: nothing was written, so their
        decode workers free what they reserved (an active wait falls back, a quarantine ends).
        certain=False: the prefill worker may have them; the decode worker only gives up."""
        by_decode: dict[int, list[str]] = {}
        for rid in failed:
            where = self._inflight.pop(rid, None) if certain else self._inflight.get(rid)
            if where is None:
                continue
            d, p = where
            if certain:
                self._prefill_outstanding[p] = max(self._prefill_outstanding.get(p, 0) - 1, 0)
            by_decode.setdefault(d, []).append(rid)
        for d, ids in by_decode.items():
            w = self._decode.workers[d]
            if w.healthy:
                w.actor.handoff_failed.remote(ids, certain)

    # ---- prefill workers' events -------------------------------------------------------------
    def _prefill_deltas(self, rank: int, deltas: list[TokenDelta]) -> None:
        failed: list[str] = []
        for d in deltas:
            if d.finish_reason is None:
                continue
            handed_over = d.error is None and d.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
            if handed_over:
                where = self._inflight.pop(d.request_id, None)
                if where is not None:
                    self._prefill_outstanding[where[1]] = max(
                        self._prefill_outstanding.get(where[1], 0) - 1, 0
                    )
            else:
                failed.append(d.request_id)
        if failed:
            self._settle(failed)

    def _prefill_down(self, rank: int, why: str) -> None:
        producer = self._incarnations.pop(rank, None)
        log.warning("prefill worker %d down (%s): its handoffs fall back", rank, why)
        for rid in [rid for rid, (_, p) in self._inflight.items() if p == rank]:
            del self._inflight[rid]
        self._prefill_outstanding[rank] = 0
        if producer is None:
            return
        for w in self._decode.workers:
            if w.healthy:
                w.actor.producer_down.remote(producer)

    def _prefill_up(self, rank: int) -> None:
        self._spawn(self._connect_prefill(self._prefill.workers[rank]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decode_back(self, rank: int, on_worker_up: Callable[[int], None]) -> None:
        """A restarted decode worker has a new pool and mailbox: re-introduce it to producers."""
        old = self._descriptors.get(rank)
        w = self._decode.workers[rank]
        try:
            desc: PeerDescriptor = await ray_future(w.actor.kv_descriptor.remote())
            self._descriptors[rank] = desc
            for p in self._prefill.workers:
                if p.healthy:
                    if old is not None:
                        await ray_future(p.actor.disconnect.remote(old.key))
                    await ray_future(p.actor.connect.remote(desc, w.actor))
        except Exception:
            log.exception("could not re-introduce decode worker %d to the prefill workers", rank)
        on_worker_up(rank)

    # ---- introspection ------------------------------------------------------------------
    async def stats(self) -> list[EngineStats | None]:
        """Decode workers first (by rank), then prefill workers."""
        return list(await self._decode.stats()) + list(await self._prefill.stats())

    async def check_integrity(self) -> None:
        await self._decode.check_integrity()
        await self._prefill.check_integrity()

    def actor_handle(self, rank: int) -> Any:
        return self._decode.actor_handle(rank)


def _same_geometry(a: ModelDescription, b: ModelDescription) -> bool:
    """Same model and KV blocks; the KV capacities of the two kinds of worker may differ."""
    keep = {"kv_capacity_tokens": 0, "model_dir": None}
    return dataclasses.replace(a, **keep) == dataclasses.replace(b, **keep)  # type: ignore[arg-type]


if TYPE_CHECKING:

    def _implements(pool: DisaggregatedPool, client: DecodeClient) -> tuple[WorkerPool, WorkerClient]:
        return pool, client
