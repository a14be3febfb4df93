"""`WorkerPool` over Ray: one `WorkerActor` per placement-group bundle (one per GPU, or N CPUs).

Ray is the control plane: placement, actor lifecycle and restarts, `ready`, `reset`, `stats`,
`check_integrity`, and liveness (one `watch` call kept in flight per actor fails the moment the
actor dies). Submits, aborts, deltas and load go over the data plane (`cluster/dataplane.py`):
each worker pushes its deltas as soon as a step's outputs exist and heartbeats its load every
`poll_s`; this pool's `RayWorkerClient`s are `DataPlaneClient`s that also hold the actor.

Health: a worker whose actor dies (the watch fails), that sends ERROR (its engine loop broke),
that is silent for `stall_s`, or that holds unfinished work (requests running or waiting, or a
submit not yet answered) and makes no progress for `no_progress_s` is marked down and
`on_worker_down` is called once. A broken, silent or stalled actor is killed so Ray restarts it
empty (bounded by `max_restarts`); the pool then probes `ready()` until the new incarnation
answers, resets it, connects to its new data-plane endpoint and calls `on_worker_up` once it
heartbeats. Ray restarts an actor with its creation arguments, so it serves the same model.

Other router processes (issue 14 item 3) reach the same workers through `endpoints()` and are
told of restarts through `on_endpoint_change` (a `DataPlanePool.set_endpoint`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq.asyncio

from kvrelay.worker.actor import WorkerActor
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.protocol import EngineStats, TokenDelta, WorkerLoad

from .dataplane import DataPlaneClient, PoolCallbacks, WorkerEndpoint, empty_load, watch_worker
from .interfaces import ModelDescription, WorkerClient, WorkerPool
from .pool_timeouts import PoolTimeouts
from .ray_util import error_summary, ray_future

# Re-exported: PoolTimeouts was defined here before the data plane shared it.
__all__ = ["PoolTimeouts", "RayWorkerClient", "RayWorkerPool"]

log = logging.getLogger("kvrelay")

# Each actor's environment: every GPU of the node visible (CUDA IPC between actors needs it), and
# NVLink multicast off (NCCL's NVLS and torch's symmetric memory would map multicast objects,
# which the lent GPU machines do not allow).
_GPU_ENV = {
    "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# `watch` (liveness) blocks a thread of its own (concurrency group), so it never holds up stats or
# the handoff verbs; everything else shares the default group.
_WATCH_GROUP = "watch"
_ACTOR_CONCURRENCY = 8
# One `watch` call lasts this long before the pool issues the next (its death fails it at once).
_WATCH_S = 30.0


class RayWorkerClient(DataPlaneClient):
    """One worker as the router sees it (`cluster.interfaces.WorkerClient`): its data plane, plus
    the Ray actor (the control plane; tests kill it through `actor`)."""

    def __init__(
        self, rank: int, actor: Any, load: WorkerLoad, router_id: str, ctx: zmq.asyncio.Context | None = None
    ) -> None:
        super().__init__(rank, router_id, load, ctx)
        self.actor = actor
        self.watch_method = actor.watch.options(concurrency_group=_WATCH_GROUP)
        self.died = False  # the control plane saw the actor die (Ray restarts it: no kill needed)


class RayWorkerPool:
    def __init__(
        self,
        engine_config: EngineConfig,
        num_workers: int,
        device: str,
        ray_address: str | None = None,
        max_restarts: int = 3,
        *,
        timeouts: PoolTimeouts | None = None,
        log_to_driver: bool = True,
        env: dict[str, str] | None = None,
        gpus_per_worker: float = 1.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if not 0 < gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {gpus_per_worker}")
        self._config = dataclasses.replace(engine_config, device=device)
        self._gpus_per_worker = gpus_per_worker
        self._num_workers = num_workers
        self._device = device
        self._ray_address = ray_address
        self._max_restarts = max_restarts
        self._timeouts = timeouts or PoolTimeouts()
        self._log_to_driver = log_to_driver
        self._env = dict(env or {})
        self._owns_ray = False
        self._pg: Any = None
        self._actors: list[Any] = []  # by rank; kept apart from _workers to clean up a failed start
        self._workers: list[RayWorkerClient] = []
        self._model: ModelDescription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # This router process's identity on every worker's data plane.
        self.router_id = f"pool-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._ctx: zmq.asyncio.Context | None = None
        self._endpoint_listeners: list[Callable[[WorkerEndpoint | None, int], None]] = []

    @property
    def workers(self) -> Sequence[RayWorkerClient]:
        return self._workers

    @property
    def model(self) -> ModelDescription:
        if self._model is None:
            raise RuntimeError("the pool is not started")
        return self._model

    # ---- start / stop -------------------------------------------------------------------
    async def start(
        self,
        on_deltas: Callable[[int, list[TokenDelta]], None],
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        import ray

        if self._model is not None:
            raise RuntimeError("the pool is already started")
        self._init_ray()
        try:
            self._actors = await self._create_actors()
            descs = await self._ready_all()
            for rank, d in enumerate(descs):
                if not _same_model(d, descs[0]):
                    raise RuntimeError(f"worker {rank} serves {d}, but worker 0 serves {descs[0]}")
        except BaseException:
            await self._teardown()
            raise
        self._model = descs[0]
        self._ctx = zmq.asyncio.Context()
        self._workers = [
            RayWorkerClient(rank, a, self._empty_load(), self.router_id, self._ctx)
            for rank, a in enumerate(self._actors)
        ]
        try:
            for w in self._workers:
                await self._connect(w)
        except BaseException:
            await self._teardown()
            raise
        callbacks = PoolCallbacks(on_deltas, on_worker_down, on_worker_up)
        self._tasks = [
            asyncio.create_task(self._watch(w, callbacks), name=f"kvrelay-watch-{w.rank}")
            for w in self._workers
        ]
        log.info("pool of %d %s workers ready (ray %s)", self._num_workers, self._device, ray.__version__)

    async def _connect(self, w: RayWorkerClient) -> None:
        """Connect w's data plane to its actor's current incarnation; healthy once it heartbeats."""
        address, incarnation = await asyncio.wait_for(
            ray_future(w.actor.data_plane.remote()), self._timeouts.call_s
        )
        endpoint = WorkerEndpoint(w.rank, address, incarnation)
        w.connect(endpoint)
        if not await w.wait_heartbeat(self._timeouts.call_s):
            raise RuntimeError(
                f"worker {w.rank}'s data plane at {address} does not answer within {self._timeouts.call_s:g} s "
                "(is that address reachable from this host? KVRELAY_DATAPLANE_HOST sets the one workers bind)"
            )
        w.mark_up()
        for listener in self._endpoint_listeners:
            _notify(listener, endpoint, w.rank)

    def endpoints(self) -> list[WorkerEndpoint]:
        """Every worker's current data-plane endpoint, by rank (for router processes that do not own
        the workers: `DataPlanePool`)."""
        out = []
        for w in self._workers:
            if w.endpoint is None:
                raise RuntimeError(f"worker {w.rank} has no data-plane endpoint yet")
            out.append(w.endpoint)
        return out

    def on_endpoint_change(self, listener: Callable[[WorkerEndpoint | None, int], None]) -> None:
        """listener(endpoint, rank) on this pool's event loop: None when worker `rank` goes down, its
        new endpoint once it serves again (a `DataPlanePool.set_endpoint` fits)."""
        self._endpoint_listeners.append(listener)

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": self._log_to_driver}
        if self._ray_address is None and "RAY_ADDRESS" not in os.environ and self._device == "cpu":
            # A local cluster's CPU count is only a scheduling token: N CPU workers should start
            # even on a machine with fewer cores (the driver keeps one for itself).
            kwargs["num_cpus"] = max(os.cpu_count() or 1, self._num_workers + 1)
        ray.init(address=self._ray_address, **kwargs)
        self._owns_ray = True

    async def _create_actors(self) -> list[Any]:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = self._device == "cuda"
        bundle = {"GPU": self._gpus_per_worker, "CPU": 1.0} if gpu else {"CPU": 1.0}
        self._pg = placement_group([dict(bundle) for _ in range(self._num_workers)], strategy="PACK")
        try:
            await asyncio.wait_for(ray_future(self._pg.ready()), self._timeouts.start_s)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"cannot place {self._num_workers} workers of {bundle} each within "
                f"{self._timeouts.start_s:.0f} s; the cluster has {ray.cluster_resources()}"
            ) from None
        env = {k: v for k, v in os.environ.items() if k.startswith("KVRELAY_")}
        env.update(_GPU_ENV if gpu else {})
        env.update(self._env)
        # Concurrency groups can only be declared here, not in .options(); Ray's stubs omit both keys.
        actor_options: dict[str, Any] = {
            "concurrency_groups": {_WATCH_GROUP: 1},
            "max_concurrency": _ACTOR_CONCURRENCY,
        }
        remote_cls = ray.remote(**actor_options)(WorkerActor)
        return [
            remote_cls.options(
                num_cpus=1,
                num_gpus=self._gpus_per_worker if gpu else 0,
                max_restarts=self._max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank
                ),
                runtime_env={"env_vars": env} if env else None,
            ).remote(self._config, rank, gpu, self._timeouts.poll_s)
            for rank in range(self._num_workers)
        ]

    async def stop(self) -> None:
        """Cancel the watch tasks, shut every actor down, free the placement group (and Ray, if ours)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._teardown()

    async def _teardown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        actors, self._actors = self._actors, []
        if actors:
            # A graceful shutdown first, so each engine loop aborts its requests and logs it.
            calls = [asyncio.ensure_future(a.shutdown.remote()) for a in actors]
            done, pending = await asyncio.wait(calls, timeout=self._timeouts.call_s)
            for f in done:
                f.exception()  # a dead actor's error is expected here: retrieved, not logged by asyncio
            for f in pending:
                f.cancel()
            for a in actors:
                ray.kill(a, no_restart=True)
            await self._await_dead(actors)
        for w in self._workers:
            w.close()
            w.mark_down()
        self._workers = []
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._pg is not None:
            remove_placement_group(self._pg)  # also kills actors of a failed start
            self._pg = None
        self._model = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    async def _await_dead(self, actors: list[Any]) -> None:
        """`ray.kill` only asks: a call made right after it may still be served by the live actor.
        Probe each actor until its calls fail (bounded by call_s), so `stop()` returns with every
        actor gone (seen in CI: a `ready()` right after `stop()` answered)."""
        import ray.exceptions

        deadline = time.monotonic() + self._timeouts.call_s
        for a in actors:
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(ray_future(a.incarnation.remote()), 1.0)
                except (ray.exceptions.RayError, asyncio.TimeoutError):
                    break  # dead (RayActorError), or too far gone to answer
                await asyncio.sleep(0.05)

    # ---- health -------------------------------------------------------------------------
    async def _watch(self, w: RayWorkerClient, cb: PoolCallbacks) -> None:
        """Serve one worker for as long as the pool runs; take it down and back up as it fails."""
        try:
            await watch_worker(w, cb, self._timeouts, self._recover, self._died)  # type: ignore[arg-type]
        except Exception:  # a bug here must not leave a worker marked healthy that nobody watches
            log.exception("the watch task of worker %d crashed; the worker stays down", w.rank)
            if w.healthy:
                w.mark_down()
                cb.on_worker_down(w.rank, f"worker {w.rank} is not monitored")

    async def _died(self, w: RayWorkerClient) -> str:
        """Returns when Ray sees the actor die (one `watch` call in flight at a time)."""
        import ray.exceptions

        while True:
            try:
                await ray_future(w.watch_method.remote(_WATCH_S))
            except ray.exceptions.RayActorError as e:
                log.warning("worker %d died: %s", w.rank, e)
                w.died = True
                return f"worker {w.rank} died"
            except ray.exceptions.RayError as e:
                log.error("worker %d failed: %s", w.rank, e)
                return f"worker {w.rank} failed"

    async def _recover(self, w: RayWorkerClient, why: str) -> None:
        """Down: restart it unless it died (Ray restarts that), wait until it is back, reconnect."""
        import ray

        for listener in self._endpoint_listeners:
            _notify(listener, None, w.rank)
        if not w.died:
            log.warning("%s; restarting it", why)
            ray.kill(w.actor, no_restart=False)  # a restart brings it back with an empty engine
        w.died = False
        while True:
            await self._wait_until_back(w)
            try:
                address, incarnation = await asyncio.wait_for(
                    ray_future(w.actor.data_plane.remote()), self._timeouts.call_s
                )
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                log.info("worker %d's data plane address: %s", w.rank, e)
                continue
            endpoint = WorkerEndpoint(w.rank, address, incarnation)
            w.connect(endpoint)
            for listener in self._endpoint_listeners:
                _notify(listener, endpoint, w.rank)
            return

    async def _wait_until_back(self, w: RayWorkerClient) -> None:
        """Keep one ready() in flight (it queues while Ray restarts the actor) until one answers."""
        import ray.exceptions

        interval = self._timeouts.probe_interval_s
        probe: asyncio.Future[ModelDescription] | None = None
        warned = False
        while True:
            if probe is None:
                probe = ray_future(w.actor.ready.remote())
            done, _ = await asyncio.wait([probe], timeout=interval)
            if not done:
                continue
            try:
                desc = probe.result()
            except ray.exceptions.RayError as e:
                # Not restarted yet, or out of restarts (then it never comes back).
                if isinstance(e, ray.exceptions.ActorDiedError) and not warned:
                    log.warning("worker %d is dead and may not restart (max_restarts spent?): %s", w.rank, e)
                    warned = True
                probe = None
                await asyncio.sleep(interval)
                continue
            if not _same_model(desc, self.model):
                raise RuntimeError(f"worker {w.rank} came back serving {desc}, not {self._model}")
            try:
                # A worker that was only unreachable still holds the requests the router failed.
                await asyncio.wait_for(ray_future(w.actor.reset.remote()), self._timeouts.call_s)
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                log.info("reset of worker %d failed: %s", w.rank, e)
                probe = None
                continue
            return

    # ---- introspection ------------------------------------------------------------------
    async def stats(self) -> list[EngineStats | None]:
        """Each worker's engine counters, by rank; None where the worker is down or did not answer."""
        import ray.exceptions

        async def one(w: RayWorkerClient) -> EngineStats | None:
            if not w.healthy:
                return None
            try:
                s: EngineStats = await asyncio.wait_for(
                    ray_future(w.actor.stats.remote()), self._timeouts.call_s
                )
                return s
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                log.info("stats of worker %d: %s", w.rank, e)
                return None

        return list(await asyncio.gather(*(one(w) for w in self._workers)))

    async def check_integrity(self) -> None:
        """Every healthy worker's engine invariants; RuntimeError naming the first that fails."""
        healthy = [w for w in self._workers if w.healthy]
        results = await asyncio.gather(
            *(
                asyncio.wait_for(ray_future(w.actor.check_integrity.remote()), self._timeouts.call_s)
                for w in healthy
            ),
            return_exceptions=True,
        )
        for w, r in zip(healthy, results, strict=True):
            if isinstance(r, BaseException):
                cause = getattr(r, "cause", None) or r
                raise RuntimeError(f"worker {w.rank}: {type(cause).__name__}: {cause}") from r

    async def _ready_all(self) -> list[ModelDescription]:
        """Every worker's first ready(); a worker's failure is reduced to its one-line cause."""
        import ray.exceptions

        async def one(rank: int, actor: Any) -> ModelDescription:
            try:
                desc: ModelDescription = await ray_future(actor.ready.remote())
                return desc
            except ray.exceptions.RayError as e:
                kind, msg = error_summary(e)
                log.error("worker %d failed to start: %s: %s", rank, kind, msg)
                log.debug("worker %d start failure in full: %s", rank, e)
                if kind == "ValueError":  # bad input (model path, config): the field is named in msg
                    raise ValueError(msg) from None
                raise RuntimeError(f"worker {rank} failed to start: {kind}: {msg}") from None

        start = asyncio.gather(*(one(rank, a) for rank, a in enumerate(self._actors)))
        try:
            return list(await asyncio.wait_for(start, self._timeouts.start_s))
        except asyncio.TimeoutError:
            raise RuntimeError(f"workers were not ready within {self._timeouts.start_s:.0f} s") from None

    def _empty_load(self) -> WorkerLoad:
        return empty_load(self.model)

    def actor_handle(self, rank: int) -> Any:
        """The Ray actor of a rank (operational tools and tests kill or inspect it)."""
        return self._workers[rank].actor


def _notify(
    listener: Callable[[WorkerEndpoint | None, int], None], endpoint: WorkerEndpoint | None, rank: int
) -> None:
    try:
        listener(endpoint, rank)
    except Exception:
        log.exception("endpoint listener %r raised", listener)


def _same_model(a: ModelDescription, b: ModelDescription) -> bool:
    """Equal but for model_dir: a directory's path may differ between nodes."""
    return dataclasses.replace(a, model_dir=None) == dataclasses.replace(b, model_dir=None)


if TYPE_CHECKING:

    def _implements(pool: RayWorkerPool, client: RayWorkerClient) -> tuple[WorkerPool, WorkerClient]:
        return pool, client  # mypy proves both satisfy the router's protocols
