"""What the router needs from the worker pool, and nothing more.

`cluster/pool.py` implements it over Ray actors (one per GPU, or N CPU workers). The router
(`cluster/router.py`) only ever talks to these protocols, so it can be tested against any
pool, and the pool knows nothing of gRPC.

Threading: every method and callback runs on the router's asyncio event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kvrelay.worker.protocol import ModelDescription, TokenDelta, WorkerLoad, WorkRequest

# ModelDescription is a worker->router contract (worker/protocol.py); re-exported here for the
# router modules and callers that import it from the pool interface.
__all__ = ["ModelDescription", "WorkerClient", "WorkerPool"]


class WorkerClient(Protocol):
    rank: int

    @property
    def healthy(self) -> bool:
        """False from the moment a death is noticed until the restarted worker answers again."""
        ...

    @property
    def load(self) -> WorkerLoad:
        """As of the latest poll."""
        ...

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        """One call for many requests; returns the ones the worker refused (id -> message, always
        bad input: INVALID_ARGUMENT). Raises ConnectionError when the worker is down or dies during
        the call (UNAVAILABLE). Deltas may later arrive for ids the router no longer tracks (the
        final ABORT delta of an abort it sent itself): ignore them."""
        ...

    async def abort(self, request_ids: Sequence[str]) -> None: ...


class WorkerPool(Protocol):
    @property
    def workers(self) -> Sequence[WorkerClient]: ...

    @property
    def model(self) -> ModelDescription: ...

    async def start(
        self,
        on_deltas: Callable[[int, list[TokenDelta]], None],
        on_worker_down: Callable[[int, str], None],
        on_worker_up: Callable[[int], None],
    ) -> None:
        """Start the workers, wait until every one is ready, then poll each in its own task.

        on_deltas(rank, deltas): a batch of progress from one worker (one engine step or more).
        on_worker_down(rank, why): the worker died or stopped answering; every request it held is
            lost (the router fails those streams with UNAVAILABLE). Called within 5 s of the death.
        on_worker_up(rank): a restarted worker is serving again (with an empty engine).
        """
        ...

    async def stop(self) -> None: ...
