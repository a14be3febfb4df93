"""One local Ray cluster per test module (start-up costs seconds, so tests share it), and an
asyncio loop on its own thread so a pool started once can serve several tests.

Use: `from ray_helpers import ray_local  # noqa: F401`, then take `ray_local` as a fixture.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPO_ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another module's cluster is still up: share it
        yield
        return
    # Ray's processes inherit this environment: they import the checkout under test (whatever
    # `kvrelay` is installed), and read KVRELAY_CACHE_DIR that conftest set.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, saved) if p)
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield
    finally:
        ray.shutdown()


class LoopThread:
    """An asyncio event loop running on a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-asyncio", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
