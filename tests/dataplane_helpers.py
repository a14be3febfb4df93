"""Shared by the data-plane tests: one router process's view of a worker's data plane."""

from __future__ import annotations

import asyncio
import time

from kvrelay.cluster.dataplane import DataPlanePool, WorkerEndpoint
from kvrelay.cluster.interfaces import ModelDescription
from kvrelay.cluster.pool_timeouts import PoolTimeouts
from kvrelay.worker.dataplane import DataPlaneServer
from kvrelay.worker.engine import Engine
from kvrelay.worker.loop_link import LoopLink
from kvrelay.worker.protocol import TokenDelta
from kvrelay.worker.sampling_params import SamplingParams

# The data plane beside the engine loop, or in its own process behind the loop link.
ServedPlane = DataPlaneServer | LoopLink
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
LONG = SamplingParams(max_tokens=3000, ignore_eos=True)
FAST = PoolTimeouts(poll_s=0.05, stall_s=1.0, probe_interval_s=0.1, no_progress_s=30.0)


def model_of(engine: Engine) -> ModelDescription:
    return ModelDescription(
        "tiny", engine.model_config.vocab_size, engine.max_model_len, (), 16, 1 << 20, None
    )


class Router:
    """One router process's view: a DataPlanePool and what its callbacks saw."""

    def __init__(
        self, model: ModelDescription, endpoint: WorkerEndpoint, router_id: str, timeouts: PoolTimeouts = FAST
    ) -> None:
        self.pool = DataPlanePool(model, [endpoint], router_id=router_id, timeouts=timeouts)
        self.deltas: dict[str, TokenDelta] = {}
        self.events: list[tuple[str, int]] = []

    def on_deltas(self, rank: int, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            if d.request_id in self.deltas:
                self.deltas[d.request_id].merge(d)
            else:
                self.deltas[d.request_id] = d

    async def start(self) -> None:
        await self.pool.start(
            self.on_deltas,
            lambda r, why: self.events.append(("down", r)),
            lambda r: self.events.append(("up", r)),
        )

    async def until(self, done: object, timeout_s: float = 30.0) -> None:
        end = time.monotonic() + timeout_s
        while not done():  # type: ignore[operator]
            assert time.monotonic() < end, f"timed out: {self.deltas.keys()} {self.events}"
            await asyncio.sleep(0.01)

    def finished(self, ids: list[str]) -> bool:
        return all(i in self.deltas and self.deltas[i].finished for i in ids)
