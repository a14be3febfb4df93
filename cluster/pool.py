"""`WorkerPool` over Ray: one `WorkerActor` per placement-group bundle (one per GPU, or N CPUs).

Each worker has one asyncio task on the router's event loop that keeps exactly one `poll` in
flight (a threaded actor runs concurrent calls in any order, so two polls could reorder
deltas). A poll returns as soon as the worker has progress, so a busy worker answers about
once per engine step and an idle one every `poll_s`.

Health: a poll that fails because the actor died (RayActorError), that raises inside the actor
(the engine loop broke), or that does not answer within `stall_s` marks the worker down and calls
`on_worker_down` once. So does a worker whose polls answer but whose engine stopped stepping: it
holds unfinished work (requests running or waiting, or a submit not yet answered) and has made no
progress (no delta, no change in its load) for `no_progress_s`. A broken or stalled actor is
killed so Ray restarts it empty (bounded by `max_restarts`); the task then probes `ready()` until
the new incarnation answers and calls `on_worker_up`. Ray restarts an actor with its creation
arguments, so the restarted worker serves the same model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvrelay.worker.actor import WorkerActor
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.protocol import EngineStats, StepBatch, TokenDelta, WorkerLoad, WorkRequest

from .interfaces import ModelDescription, WorkerClient, WorkerPool
from .pool_timeouts import PoolTimeouts
from .ray_util import ProgressWatchdog, error_summary, ray_future

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
# `poll` runs in a thread of its own (concurrency group), so a burst of submits or a slow stats
# call can never delay it into looking like a stall; everything else shares the default group.
_POLL_GROUP = "poll"
_ACTOR_CONCURRENCY = 8


class RayWorkerClient:
    """One worker as the router sees it (`cluster.interfaces.WorkerClient`)."""

    def __init__(self, rank: int, actor: Any, load: WorkerLoad) -> None:
        self.rank = rank
        self.actor = actor  # the Ray ActorHandle; tests kill it through this
        self.poll_method = actor.poll.options(concurrency_group=_POLL_GROUP)
        self._healthy = True
        self._load = load
        self._submits_in_flight = 0  # their requests are the worker's before its load shows them

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def load(self) -> WorkerLoad:
        return self._load

    @property
    def holds_work(self) -> bool:
        """Requests running or waiting at the last poll, or a submit not yet answered."""
        return self._load.num_running + self._load.num_waiting > 0 or self._submits_in_flight > 0

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        """Raises ConnectionError when the worker is down or dies during the call (UNAVAILABLE)."""
        import ray.exceptions

        if not self._healthy:
            raise ConnectionError(f"worker {self.rank} is unavailable")
        self._submits_in_flight += 1
        try:
            rejected: dict[str, str] = await self.actor.submit.remote(list(requests))
        except ray.exceptions.RayError as e:
            log.warning("submit to worker %d failed: %s", self.rank, e)
            raise ConnectionError(f"worker {self.rank} is unavailable") from None
        finally:
            self._submits_in_flight -= 1
        return rejected

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Best effort: a down worker's requests are already gone."""
        import ray.exceptions

        if not self._healthy or not request_ids:
            return
        try:
            await self.actor.abort.remote(list(request_ids))
        except ray.exceptions.RayError as e:
            log.info("abort on worker %d failed (it is going down): %s", self.rank, e)


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
        self._workers = [RayWorkerClient(rank, a, self._empty_load()) for rank, a in enumerate(self._actors)]
        callbacks = _Callbacks(on_deltas, on_worker_down, on_worker_up)
        self._tasks = [
            asyncio.create_task(self._watch(w, callbacks), name=f"kvrelay-poll-{w.rank}")
            for w in self._workers
        ]
        log.info("pool of %d %s workers ready (ray %s)", self._num_workers, self._device, ray.__version__)

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
            "concurrency_groups": {_POLL_GROUP: 1},
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
            ).remote(self._config, rank, gpu)
            for rank in range(self._num_workers)
        ]

    async def stop(self) -> None:
        """Cancel the poll tasks, shut every actor down, free the placement group (and Ray, if ours)."""
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
        self._workers = []
        if self._pg is not None:
            remove_placement_group(self._pg)  # also kills actors of a failed start
            self._pg = None
        self._model = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # ---- health -------------------------------------------------------------------------
    async def _watch(self, w: RayWorkerClient, cb: _Callbacks) -> None:
        """Poll one worker for as long as the pool runs; take it down and back up as it fails."""
        try:
            await self._watch_forever(w, cb)
        except Exception:  # a bug here must not leave a worker marked healthy that nobody polls
            log.exception("the poll task of worker %d crashed; the worker stays down", w.rank)
            if w.healthy:
                w._healthy = False
                cb.call(cb.on_worker_down, w.rank, f"worker {w.rank} is not monitored")

    async def _watch_forever(self, w: RayWorkerClient, cb: _Callbacks) -> None:
        watchdog = ProgressWatchdog(self._timeouts.no_progress_s)
        while not self._stopping:
            batch, why = await self._poll_once(w)
            if batch is not None:
                progressed = bool(batch.deltas) or (batch.load is not None and batch.load != w._load)
                if batch.load is not None:
                    w._load = batch.load
                if batch.deltas:
                    cb.call(cb.on_deltas, w.rank, batch.deltas)
                why = self._check_progress(w, watchdog, progressed)
                if why is None:
                    continue
            assert why is not None
            w._healthy = False
            cb.call(cb.on_worker_down, w.rank, why)
            await self._wait_until_back(w)
            w._load = self._empty_load()
            w._healthy = True
            watchdog.reset(time.monotonic())
            log.info("worker %d is serving again", w.rank)
            cb.call(cb.on_worker_up, w.rank)

    def _check_progress(self, w: RayWorkerClient, watchdog: ProgressWatchdog, progressed: bool) -> str | None:
        """None while the worker progresses or is idle; else kill it and say why it is down."""
        import ray

        stalled_s = watchdog.observe(time.monotonic(), holds_work=w.holds_work, progressed=progressed)
        if stalled_s is None:
            return None
        why = f"worker {w.rank} stalled: no progress for {stalled_s:.1f} s"
        log.warning("%s; restarting it", why)
        ray.kill(w.actor, no_restart=False)  # as for an unanswered poll: Ray restarts it empty
        return why

    async def _poll_once(self, w: RayWorkerClient) -> tuple[StepBatch | None, str | None]:
        """One poll: (batch, None), or (None, why) when the worker must be taken down."""
        import ray
        import ray.exceptions

        t = self._timeouts
        try:
            batch: StepBatch = await asyncio.wait_for(ray_future(w.poll_method.remote(t.poll_s)), t.stall_s)
            return batch, None
        except ray.exceptions.RayActorError as e:
            log.warning("worker %d died: %s", w.rank, e)
            return None, f"worker {w.rank} died"
        except asyncio.TimeoutError:
            why = f"worker {w.rank} did not answer a poll within {t.stall_s:g} s"
        except ray.exceptions.RayError as e:  # the poll raised inside the actor: its engine broke
            log.error("worker %d failed: %s", w.rank, e)
            why = f"worker {w.rank} failed"
        log.warning("%s; restarting it", why)
        ray.kill(w.actor, no_restart=False)  # a restart brings it back with an empty engine
        return None, why

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
        blocks = self.model.kv_capacity_tokens // self.model.block_size
        return WorkerLoad(0, 0, 0.0, blocks, 0, num_kv_blocks=blocks)

    def actor_handle(self, rank: int) -> Any:
        """The Ray actor of a rank (operational tools and tests kill or inspect it)."""
        return self._workers[rank].actor


@dataclasses.dataclass(frozen=True)
class _Callbacks:
    on_deltas: Callable[[int, list[TokenDelta]], None]
    on_worker_down: Callable[[int, str], None]
    on_worker_up: Callable[[int], None]

    @staticmethod
    def call(fn: Callable[..., None], *args: Any) -> None:
        """The router's bug must not stop the poll task: log it and keep polling."""
        try:
            fn(*args)
        except Exception:
            log.exception("pool callback %s%r raised", getattr(fn, "__name__", fn), args[:1])


def _same_model(a: ModelDescription, b: ModelDescription) -> bool:
    """Equal but for model_dir: a directory's path may differ between nodes."""
    return dataclasses.replace(a, model_dir=None) == dataclasses.replace(b, model_dir=None)


if TYPE_CHECKING:

    def _implements(pool: RayWorkerPool, client: RayWorkerClient) -> tuple[WorkerPool, WorkerClient]:
        return pool, client  # mypy proves both satisfy the router's protocols
