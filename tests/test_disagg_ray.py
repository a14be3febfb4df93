"""Disaggregated serving end to end on the CPU: a real gRPC server, the router, and a
DisaggregatedPool of 1 prefill + 1 decode worker actor (separate processes, handing KV blocks
over through shared memory with the memory_model protocol). Streams equal one in-process
engine; a prefill worker killed mid-handoff costs no stream and leaks no block. Each test runs
through the in-process router and through 2 router processes (which relay their submits to the
controller's pool: cluster/handoff_relay.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_helpers import make_engine, random_prompts
from ray_helpers import ray_local  # noqa: F401
from router_helpers import generate_spread
from serve_helpers import VOCAB, Served, start_served

from kvrelay.cluster.pool import PoolTimeouts
from kvrelay.worker.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=[1, 2], ids=["1router", "2routers"])
def served(ray_local: None, request: pytest.FixtureRequest) -> Iterator[Served]:  # noqa: F811
    s = start_served(
        disaggregated=(1, 1),
        engine={"handoff_timeout_s": 5.0},
        max_restarts=2,
        timeouts=PoolTimeouts(stall_s=20.0, no_progress_s=60.0),
        routers=request.param,
    )
    yield s
    s.stop()


def _expected(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [o.token_ids for o in make_engine(detokenize=False).generate(prompts, params)]


def test_streams_equal_the_colocated_engine(served: Served) -> None:
    prompts = random_prompts(16, [3, 16, 31, 50], VOCAB, seed=41)
    before = served.pool.num_handoffs
    pids = served.router_pids()
    run = generate_spread(lambda: served.client(own_connection=True), pids, served.port, prompts, 10)
    assert run.token_ids == _expected(prompts, 10)
    assert run.counted == run.sent and set(run.sent) == set(pids), "each router served its connections"
    assert served.pool.num_handoffs - before == 16, "every request went through a prefill worker"
    if served.router is not None:  # the in-process router's registry (router processes: their own)
        registry = served.router.metrics.registry
        received = registry.get_sample_value(
            "kvrelay_worker_kv_handoffs_total", {"worker": "0", "result": "received"}
        )
        assert received is not None and received >= 16, received
        waits = registry.get_sample_value("kvrelay_worker_kv_handoff_wait_seconds_count", {"worker": "0"})
        assert waits == received, (waits, received)
    decode_stats, prefill_stats = served.lt.run(served.pool.stats())
    assert decode_stats is not None and prefill_stats is not None
    assert prefill_stats.num_steps > 0 and decode_stats.num_steps > 0
    served.wait_idle()


def test_prefill_worker_killed_mid_handoff(served: Served) -> None:
    """The prefill worker stalls with requests in it, then dies: the decode worker hears of the
    death, recomputes those prompts itself (policy "recompute"), and every stream completes."""
    import ray

    prompts = random_prompts(4, [20, 40], VOCAB, seed=42)
    prefill_actor = served.pool.prefill_pool.actor_handle(0)
    ray.get(prefill_actor.debug_stall.remote(30.0))
    with served.client() as c, ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(c.generate, p, max_tokens=8, ignore_eos=True) for p in prompts]
        time.sleep(1.0)  # the requests are reserved on the decode worker, stuck in the prefill one
        assert not any(f.done() for f in futures)
        ray.kill(prefill_actor, no_restart=False)
        got = [list(f.result(timeout=60).token_ids) for f in futures]
    assert got == _expected(prompts, 8)
    served.wait_idle()
    # The prefill worker comes back and handoffs resume.
    deadline = time.monotonic() + 60
    while not served.pool.prefill_pool.workers[0].healthy:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    before = served.pool.num_handoffs
    with served.client() as c:
        r = c.generate(prompts[0], max_tokens=8, ignore_eos=True)
    assert list(r.token_ids) == _expected(prompts[:1], 8)[0]
    assert served.pool.num_handoffs == before + 1
    served.wait_idle()
