"""The router over the real Ray worker pool (2 CPU worker actors) on a real loopback gRPC server:
streams equal the in-process engine, cancellation and deadlines free blocks on the actors, and a
worker actor killed mid-stream fails only its own streams, within 5 s, and comes back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from engine_helpers import make_engine, random_prompts
from ray_helpers import ray_local  # noqa: F401
from serve_helpers import VOCAB, Served, start_served

from kvrelay.cluster.client import DeadlineExceeded, KvrelayError, Unavailable
from kvrelay.worker.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def served(ray_local: None) -> Iterator[Served]:  # noqa: F811
    s = start_served(num_workers=2, max_restarts=2)
    yield s
    s.stop()


def test_64_concurrent_streams_equal_the_in_process_engine(served: Served) -> None:
    prompts = random_prompts(64, [1, 5, 17, 40, 77], VOCAB, seed=31)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in make_engine(detokenize=False).generate(prompts, params)]
    with served.client() as c, ThreadPoolExecutor(64) as ex:
        got = list(ex.map(lambda p: c.generate(p, max_tokens=12, ignore_eos=True).token_ids, prompts))
    assert [list(g) for g in got] == expected
    stats = served.lt.run(served.pool.stats())
    assert all(s is not None and s.num_steps > 0 for s in stats), "both actors served"
    served.wait_idle()


def test_cancel_and_deadline_free_blocks_on_the_actors(served: Served) -> None:
    prompt = random_prompts(1, [60], VOCAB, seed=32)[0]
    with served.client() as c:
        stream = c.stream(prompt, max_tokens=3000, ignore_eos=True)
        next(stream)
        stream.close()  # cancels the call
        with pytest.raises(DeadlineExceeded):
            c.generate(prompt, max_tokens=3000, ignore_eos=True, timeout=1.0)
    served.wait_idle()


def test_worker_actor_killed_mid_stream(served: Served) -> None:
    import ray

    prompts = random_prompts(6, range(10, 30), VOCAB, seed=33)
    results: dict[str, tuple[Any, float]] = {}  # id -> (result or error, when it ended)

    def run(i: int) -> None:
        with served.client() as c:
            try:
                r: Any = c.generate(prompts[i], max_tokens=600, ignore_eos=True, request_id=f"k{i}")
            except KvrelayError as e:
                r = e
            results[f"k{i}"] = (r, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()

    async def ranks() -> dict[str, int | None]:
        return {f"k{i}": served.router.worker_of(f"k{i}") for i in range(6)}

    deadline = time.monotonic() + 30
    while None in (where := served.lt.run(ranks())).values():
        assert time.monotonic() < deadline, where
        time.sleep(0.02)
    assert set(where.values()) == {0, 1}, where
    ray.kill(served.pool.actor_handle(0), no_restart=False)
    killed_at = time.monotonic()
    for t in threads:
        t.join(120)
    for rid, rank in where.items():
        r, ended = results[rid]
        if rank == 0:
            assert isinstance(r, Unavailable), r
            assert ended - killed_at < 5.0, f"{rid} failed {ended - killed_at:.1f} s after the kill"
        else:
            assert not isinstance(r, Exception) and len(r.token_ids) == 600, r
    # The restarted actor is taken back, and new requests reach it again.
    while not served.pool.workers[0].healthy:
        assert time.monotonic() - killed_at < 60, "worker 0 did not come back"
        time.sleep(0.1)
    with served.client() as c:
        for p in random_prompts(8, range(5, 20), VOCAB, seed=34):
            assert len(c.generate(p, max_tokens=3).token_ids) == 3
    stats = served.lt.run(served.pool.stats())
    assert stats[0] is not None and stats[0].num_steps > 0, "the restarted worker serves"
    served.wait_idle()
