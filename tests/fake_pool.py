"""An in-process `WorkerPool` for router tests: real engines, no Ray.

Each worker owns a real `Engine` (detokenize=False, as served workers run) stepped by an asyncio
task: requests and aborts are applied between steps on the event loop, the step itself runs on a
thread (so the gRPC server on the same loop stays responsive), and every step's outputs go to
`on_deltas` as one batch with the worker's load, as the Ray pool delivers them.

`kill(rank)` is a worker death: its requests vanish without a final delta, submits to it raise
ConnectionError, `on_worker_down` is called at once, and after `revive_after_s` the worker comes
back empty (`on_worker_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvrelay.cluster.interfaces import ModelDescription
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine
from kvrelay.worker.engine_loop import delta_of, engine_load
from kvrelay.worker.model.loader import resolve_model
from kvrelay.worker.protocol import TokenDelta, WorkerLoad, WorkRequest
from kvrelay.worker.request import RequestOutput

DeltasCallback = Callable[[int, list[TokenDelta]], None]


def engine_config(**overrides: Any) -> EngineConfig:
    fields: dict[str, Any] = {
        "model": "tiny",
        "device": "cpu",
        "dtype": "float32",
        "num_kv_blocks": 128,
        "detokenize": False,
    }
    fields.update(overrides)
    return EngineConfig(**fields)


class FakeWorker:
    def __init__(self, pool: FakePool, rank: int, engine: Engine) -> None:
        self.rank = rank
        self.engine = engine
        self._pool = pool
        self._healthy = True
        self._load = engine_load(engine)
        self._inbox: list[tuple[str, Any, asyncio.Future[Any] | None]] = []
        self._wake = asyncio.Event()
        self._killed = False  # set by kill(); the task drops the engine's requests before stepping again
        self.num_submit_calls = 0
        self.submitted: list[list[str]] = []  # request ids of each submit call
        self.aborted: list[str] = []
        self.task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def load(self) -> WorkerLoad:
        return self._load

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        if not self._healthy:
            raise ConnectionError(f"worker {self.rank} is unavailable")
        self.num_submit_calls += 1
        self.submitted.append([r.request_id for r in requests])
        rejected: dict[str, str] = await self._call("submit", list(requests))
        return rejected

    async def abort(self, request_ids: Sequence[str]) -> None:
        if not self._healthy:
            return
        self.aborted += request_ids
        self._inbox.append(("abort", list(request_ids), None))
        self._wake.set()

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) between steps (tests read the engine's state through this)."""
        return await self._call("call", fn)

    async def _call(self, kind: str, payload: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.append((kind, payload, fut))
        self._wake.set()
        return await fut

    async def run(self) -> None:
        engine = self.engine
        while True:
            if not self._inbox and not engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
            outputs = self._apply_inbox()
            if engine.has_unfinished_requests():
                outputs += await asyncio.to_thread(engine.step)
            if self._killed:  # died mid-step: nothing of it is ever delivered
                self._drop_all()
                continue
            self._load = engine_load(engine)
            if outputs:
                self._pool.on_deltas(self.rank, [delta_of(o) for o in outputs])
            await asyncio.sleep(0)  # let the router read before the next step

    def _apply_inbox(self) -> list[RequestOutput]:
        inbox, self._inbox = self._inbox, []
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for kind, payload, fut in inbox:
            if kind == "submit":
                rejected: dict[str, str] = {}
                for r in payload:
                    deadline = None if r.timeout_s is None else now + r.timeout_s
                    try:
                        self.engine.add_request(r.request_id, r.prompt_token_ids, r.params, deadline=deadline)
                    except ValueError as e:
                        rejected[r.request_id] = str(e)
                result: Any = rejected
            elif kind == "abort":
                for rid in payload:
                    out = self.engine.abort_request(rid)
                    if out is not None:
                        outputs.append(out)
                result = None
            else:
                result = payload(self.engine)
            if fut is not None and not fut.done():
                fut.set_result(result)
        return outputs

    def _drop_all(self) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        for _, _, fut in self._inbox:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"worker {self.rank} died"))
        self._inbox = []
        self._load = engine_load(self.engine)

    def kill(self) -> None:
        self._healthy = False
        self._killed = True
        self._wake.set()


class FakePool:
    def __init__(self, num_workers: int = 2, *, revive_after_s: float = 0.5, **engine_overrides: Any) -> None:
        self._config = engine_config(**engine_overrides)
        self._num_workers = num_workers
        self._revive_after_s = revive_after_s
        self._workers: list[FakeWorker] = []
        self._model: ModelDescription | None = None
        self._on_deltas: DeltasCallback | None = None
        self._on_down: Callable[[int, str], None] | None = None
        self._on_up: Callable[[int], None] | None = None
        self.deltas_seen: list[tuple[int, int]] = []  # (rank, number of deltas) per delivered batch

    @property
    def workers(self) -> Sequence[FakeWorker]:
        return self._workers

    @property
    def model(self) -> ModelDescription:
        assert self._model is not None, "the pool is not started"
        return self._model

    async def start(
        self,
        on_deltas: DeltasCallback,
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        self._on_deltas, self._on_down, self._on_up = on_deltas, on_worker_down, on_worker_up
        engines = [await asyncio.to_thread(Engine, self._config) for _ in range(self._num_workers)]
        e = engines[0]
        self._model = ModelDescription(
            model=self._config.model,
            vocab_size=e.model_config.vocab_size,
            max_model_len=e.max_model_len,
            eos_token_ids=tuple(sorted(e.eos_token_ids)),
            block_size=self._config.block_size,
            kv_capacity_tokens=e.allocator.num_blocks * e.allocator.block_size,
            model_dir=str(resolve_model(self._config.model)),
        )
        self._workers = [FakeWorker(self, rank, eng) for rank, eng in enumerate(engines)]
        for w in self._workers:
            w.task = asyncio.create_task(w.run(), name=f"fake-worker-{w.rank}")

    def on_deltas(self, rank: int, deltas: list[TokenDelta]) -> None:
        assert self._on_deltas is not None
        self.deltas_seen.append((rank, len(deltas)))
        self._on_deltas(rank, deltas)

    def kill(self, rank: int) -> None:
        """The worker dies now; it comes back empty after revive_after_s."""
        w = self._workers[rank]
        w.kill()
        assert self._on_down is not None
        self._on_down(rank, f"worker {rank} died")
        asyncio.get_running_loop().call_later(self._revive_after_s, self._revive, rank)

    def _revive(self, rank: int) -> None:
        w = self._workers[rank]
        if w._inbox or w.engine.has_unfinished_requests():  # the task has not dropped them yet
            asyncio.get_running_loop().call_later(0.05, self._revive, rank)
            return
        w._killed = False
        w._healthy = True
        assert self._on_up is not None
        self._on_up(rank)

    async def stop(self) -> None:
        for w in self._workers:
            if w.task is not None:
                w.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w.task
