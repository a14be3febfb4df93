"""The router over the real Ray worker pool (2 CPU worker actors) on a real loopback gRPC server:
streams equal the in-process engine, cancellation and deadlines free blocks on the actors, and a
worker actor killed mid-stream fails only its own streams, within 5 s, and comes back.

Each test runs twice: through the in-process router (`kvrelay serve`), and through 2 router
processes over the same kind of pool (`kvrelay serve --router-processes 2`). Clients that must
reach both routers open connections of their own (SO_REUSEPORT balances connections, not calls)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import make_engine, random_prompts
from ray_helpers import ray_local  # noqa: F401
from router_helpers import generate_spread
from serve_helpers import VOCAB, Served, start_served

from kvrelay.cluster.client import DeadlineExceeded, KvrelayError, Unavailable
from kvrelay.worker.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=[1, 2], ids=["1router", "2routers"])
def served(ray_local: None, request: pytest.FixtureRequest) -> Iterator[Served]:  # noqa: F811
    s = start_served(num_workers=2, max_restarts=2, routers=request.param)
    yield s
    s.stop()


def test_64_concurrent_streams_equal_the_in_process_engine(served: Served) -> None:
    prompts = random_prompts(64, [1, 5, 17, 40, 77], VOCAB, seed=31)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in make_engine(detokenize=False).generate(prompts, params)]
    pids = served.router_pids()
    run = generate_spread(
        lambda: served.client(own_connection=True), pids, served.port, prompts, 12, at_least=4
    )
    assert run.token_ids == expected
    assert run.counted == run.sent and set(run.sent) == set(pids), (
        "each router served its connections' streams"
    )
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
        with served.client(own_connection=True) as c:
            try:
                r: Any = c.generate(prompts[i], max_tokens=600, ignore_eos=True, request_id=f"k{i}")
            except KvrelayError as e:
                r = e
            results[f"k{i}"] = (r, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()

    async def ranks() -> dict[str, int | None]:
        assert served.router is not None
        return {f"k{i}": served.router.worker_of(f"k{i}") for i in range(6)}

    # Where each stream runs: the in-process router says by id; router processes are elsewhere,
    # so there the workers' own counts of running requests tell how many each holds.
    deadline = time.monotonic() + 30
    while True:
        running = [s.num_running if s is not None else -1 for s in served.lt.run(served.pool.stats())]
        where = served.lt.run(ranks()) if served.router is not None else {}
        if sum(running) == 6 and None not in where.values():
            break
        assert time.monotonic() < deadline, (running, where)
        time.sleep(0.02)
    assert running[0] > 0 and running[1] > 0, running
    if where:
        assert Counter(where.values()) == {0: running[0], 1: running[1]}, (where, running)
    ray.kill(served.pool.actor_handle(0), no_restart=False)
    killed_at = time.monotonic()
    for t in threads:
        t.join(120)
    failed = [rid for rid, (r, _) in results.items() if isinstance(r, Exception)]
    assert len(results) == 6 and len(failed) == running[0], (running, results)
    for rid, (r, ended) in results.items():
        if rid in failed:
            assert isinstance(r, Unavailable), r
            assert ended - killed_at < 5.0, f"{rid} failed {ended - killed_at:.1f} s after the kill"
            assert not where or where[rid] == 0, (rid, where)
        else:
            assert len(r.token_ids) == 600, r
    # The restarted actor is taken back, and new requests reach it again.
    while not served.pool.workers[0].healthy:
        assert time.monotonic() - killed_at < 60, "worker 0 did not come back"
        time.sleep(0.1)
    with served.client() as c:
        while c.server_stats().num_healthy_workers != 2:  # this client's router sees it back too
            assert time.monotonic() - killed_at < 60, "the router did not take worker 0 back"
            time.sleep(0.1)
        for p in random_prompts(8, range(5, 20), VOCAB, seed=34):
            assert len(c.generate(p, max_tokens=3).token_ids) == 3
    stats = served.lt.run(served.pool.stats())
    assert stats[0] is not None and stats[0].num_steps > 0, "the restarted worker serves"
    served.wait_idle()
