"""Fault injection on the real Ray pool behind the real gRPC router (2 CPU worker actors): a worker
whose engine stops stepping (mid-stream, or idle when a submit arrives) and a worker killed
mid-stream. Each time only the faulty worker's streams end UNAVAILABLE, the others finish, the
worker comes back and serves, and both engines pass their integrity check with every KV block free.

The watchdog's clock (`ProgressWatchdog`) and its config are tested first, without Ray.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import random_prompts
from ray_helpers import ray_local  # noqa: F401
from serve_helpers import VOCAB, Served, start_served

from kvrelay.cluster.client import GenerationResult, KvrelayError, Unavailable
from kvrelay.cluster.pool import PoolTimeouts
from kvrelay.cluster.ray_util import ProgressWatchdog

NO_PROGRESS_S = 1.5
TIMEOUTS = PoolTimeouts(poll_s=0.1, stall_s=3.0, probe_interval_s=0.2, no_progress_s=NO_PROGRESS_S)
# From the stall to its streams failing: the watchdog's limit, one poll, the router's callback.
DETECT_MARGIN_S = 2.5


# ---- the watchdog's clock -----------------------------------------------------------------
def test_watchdog_never_fires_on_an_idle_or_progressing_worker() -> None:
    w = ProgressWatchdog(2.0)
    assert [w.observe(float(t), holds_work=False, progressed=False) for t in range(0, 100, 10)] == [None] * 10
    assert [w.observe(100.0 + t, holds_work=True, progressed=True) for t in range(0, 100, 10)] == [None] * 10


def test_watchdog_fires_after_no_progress_s_of_held_work() -> None:
    w = ProgressWatchdog(2.0)
    assert w.observe(0.0, holds_work=False, progressed=False) is None
    assert w.observe(50.0, holds_work=False, progressed=False) is None  # idle time never counts
    assert w.observe(50.5, holds_work=True, progressed=False) is None  # work arrived: clock from 50.0
    assert w.observe(51.75, holds_work=True, progressed=False) is None
    assert w.observe(52.0, holds_work=True, progressed=False) == 2.0
    assert w.observe(53.0, holds_work=True, progressed=True) is None  # progress restarts the clock
    assert w.observe(54.5, holds_work=True, progressed=False) is None
    assert w.observe(55.5, holds_work=True, progressed=False) == 2.5
    w.reset(100.0)  # the worker came back
    assert w.observe(101.0, holds_work=True, progressed=False) is None
    assert w.observe(102.0, holds_work=True, progressed=False) == 2.0


def test_watchdog_and_timeouts_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match=r"^no_progress_s must be > 0 seconds, got 0.0$"):
        ProgressWatchdog(0.0)
    with pytest.raises(ValueError, match=r"^timeouts.no_progress_s must be > 0 seconds, got -1.0$"):
        PoolTimeouts(no_progress_s=-1.0)
    with pytest.raises(
        ValueError, match=r"^timeouts.poll_s \(0.5\) must be < timeouts.no_progress_s \(0.5\)$"
    ):
        PoolTimeouts(poll_s=0.5, no_progress_s=0.5)
    assert PoolTimeouts().no_progress_s == 30.0


# ---- on the real pool ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(ray_local: None) -> Iterator[Served]:  # noqa: F811
    s = start_served(num_workers=2, num_kv_blocks=512, max_restarts=4, timeouts=TIMEOUTS)
    yield s
    s.stop()


class Calls:
    """Generate calls on threads of their own; each outcome is (result or error, when it ended)."""

    def __init__(self, served: Served, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
        self.ids = [f"{tag}{i}" for i in range(len(prompts))]
        self.outcomes: dict[str, tuple[GenerationResult | KvrelayError, float]] = {}
        self._threads = [
            threading.Thread(target=self._run, args=(served, rid, p, max_tokens))
            for rid, p in zip(self.ids, prompts, strict=True)
        ]
        for t in self._threads:
            t.start()

    def _run(self, served: Served, rid: str, prompt: list[int], max_tokens: int) -> None:
        with served.client() as c:
            r: GenerationResult | KvrelayError
            try:
                r = c.generate(prompt, max_tokens=max_tokens, ignore_eos=True, request_id=rid)
            except KvrelayError as e:
                r = e
            self.outcomes[rid] = (r, time.monotonic())

    def join(self) -> None:
        for t in self._threads:
            t.join(120)
        assert sorted(self.outcomes) == sorted(self.ids), "a call did not end"


def routed(served: Served, ids: list[str], timeout_s: float = 30.0) -> dict[str, int]:
    """The worker of each open stream, once every one is routed."""

    async def ranks() -> dict[str, int | None]:
        return {rid: served.router.worker_of(rid) for rid in ids}

    deadline = time.monotonic() + timeout_s
    while True:
        where = served.lt.run(ranks())
        if None not in where.values():
            return {rid: r for rid, r in where.items() if r is not None}
        assert time.monotonic() < deadline, where
        time.sleep(0.02)


def assert_comes_back_and_serves(served: Served, rank: int) -> None:
    served.wait_healthy(rank)
    with served.client() as c:
        for p in random_prompts(8, range(5, 20), VOCAB, seed=40 + rank):
            assert len(c.generate(p, max_tokens=3, ignore_eos=True).token_ids) == 3
    s = served.lt.run(served.pool.stats())[rank]
    assert s is not None and s.num_steps > 0, "the restarted worker serves"
    served.wait_idle()


def test_stalled_worker_fails_its_streams_and_comes_back(served: Served) -> None:
    rec = served.router
    downs, ups = len(rec.down), len(rec.up)
    calls = Calls(served, random_prompts(8, range(10, 30), VOCAB, seed=41), max_tokens=600, tag="st")
    where = routed(served, calls.ids)
    assert set(where.values()) == {0, 1}, where
    stall_at = time.monotonic()
    served.pool.actor_handle(0).debug_stall.remote(60.0)
    calls.join()
    for rid, rank in where.items():
        r, ended = calls.outcomes[rid]
        if rank == 0:
            assert isinstance(r, Unavailable), r
            assert r.details == "worker 0 became unavailable; retry the request"
            # Not before the watchdog's limit (polls kept answering), and soon after it.
            assert NO_PROGRESS_S - 0.5 < ended - stall_at < NO_PROGRESS_S + DETECT_MARGIN_S, ended - stall_at
        else:
            assert isinstance(r, GenerationResult) and len(r.token_ids) == 600, r
    stalled = [
        (rank, why.startswith("worker 0 stalled: no progress for ")) for rank, why, _ in rec.down[downs:]
    ]
    assert stalled == [(0, True)], rec.down
    assert_comes_back_and_serves(served, 0)
    assert [rank for rank, _ in rec.up[ups:]] == [0]


def test_stall_of_an_idle_worker_is_noticed_once_a_submit_waits(served: Served) -> None:
    rec = served.router
    downs = len(rec.down)
    served.wait_idle()
    served.pool.actor_handle(0).debug_stall.remote(60.0)
    time.sleep(2 * NO_PROGRESS_S)  # idle: nothing to progress on, so not a fault
    assert served.pool.workers[0].healthy and len(rec.down) == downs, rec.down
    sent_at = time.monotonic()
    calls = Calls(served, random_prompts(8, range(10, 30), VOCAB, seed=42), max_tokens=40, tag="si")
    calls.join()
    results = [r for r, _ in calls.outcomes.values()]
    failed = [(r, ended) for r, ended in calls.outcomes.values() if not isinstance(r, GenerationResult)]
    # Those sent to worker 0 wait in its stalled submit until the watchdog takes it down.
    assert failed and len(failed) < len(results), results
    for r, ended in failed:
        assert isinstance(r, Unavailable), r
        assert ended - sent_at < NO_PROGRESS_S + DETECT_MARGIN_S, ended - sent_at
    assert all(len(r.token_ids) == 40 for r in results if isinstance(r, GenerationResult))
    assert [(rank, why.startswith("worker 0 stalled: ")) for rank, why, _ in rec.down[downs:]] == [(0, True)]
    assert_comes_back_and_serves(served, 0)


def test_worker_killed_mid_stream(served: Served) -> None:
    import ray

    rec = served.router
    downs, ups = len(rec.down), len(rec.up)
    calls = Calls(served, random_prompts(24, range(10, 60), VOCAB, seed=43), max_tokens=400, tag="k")
    where = routed(served, calls.ids)
    assert set(where.values()) == {0, 1}, where
    ray.kill(served.pool.actor_handle(1), no_restart=False)
    killed_at = time.monotonic()
    rec.wait("worker 1 down", lambda: len(rec.down) > downs, 10)
    # While worker 1 restarts, new requests go to worker 0.
    assert not served.pool.workers[1].healthy
    with served.client() as c:
        for p in random_prompts(4, range(5, 20), VOCAB, seed=44):
            assert len(c.generate(p, max_tokens=4, ignore_eos=True).token_ids) == 4
    calls.join()
    outcomes: dict[int, list[Any]] = {0: [], 1: []}
    for rid, rank in where.items():
        r, ended = calls.outcomes[rid]
        outcomes[rank].append(r)
        if rank == 1:
            assert isinstance(r, Unavailable), r
            assert ended - killed_at < 5.0, f"{rid} failed {ended - killed_at:.1f} s after the kill"
    assert all(isinstance(r, GenerationResult) and len(r.token_ids) == 400 for r in outcomes[0]), outcomes[0]
    assert [rank for rank, _, _ in rec.down[downs:]] == [1] and rec.down[downs][1] == "worker 1 died"
    assert_comes_back_and_serves(served, 1)
    assert [rank for rank, _ in rec.up[ups:]] == [1]
