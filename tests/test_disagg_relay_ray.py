"""Disaggregated serving with the relay transport (what workers on different nodes use, forced
here on one machine) and the "fail" policy: streams equal the colocated engine, and a prefill
worker killed mid-handoff fails exactly its streams with UNAVAILABLE, leaking no block."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_helpers import random_prompts
from ray_helpers import ray_local  # noqa: F401
from serve_helpers import VOCAB, Served, start_served
from test_disagg_ray import _expected

from kvrelay.cluster.client import Unavailable
from kvrelay.cluster.pool import PoolTimeouts


@pytest.fixture(scope="module")
def served(ray_local: None) -> Iterator[Served]:  # noqa: F811
    engine = {"kv_transport": "relay", "handoff_policy": "fail", "handoff_timeout_s": 5.0}
    s = start_served(
        disaggregated=(1, 1),
        engine=engine,
        max_restarts=2,
        timeouts=PoolTimeouts(stall_s=20.0, no_progress_s=60.0),
    )
    yield s
    s.stop()


def test_relay_streams_equal_the_colocated_engine(served: Served) -> None:
    prompts = random_prompts(8, [9, 33, 48], VOCAB, seed=51)
    before = served.pool.num_handoffs
    with served.client() as c, ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: c.generate(p, max_tokens=6, ignore_eos=True).token_ids, prompts))
    assert [list(g) for g in got] == _expected(prompts, 6)
    assert served.pool.num_handoffs - before == 8
    served.wait_idle()


def test_prefill_killed_mid_handoff_fails_its_streams_unavailable(served: Served) -> None:
    import ray

    prompts = random_prompts(3, [20, 30], VOCAB, seed=52)
    ray.get(served.pool.prefill_pool.actor_handle(0).debug_stall.remote(30.0))
    with served.client() as c, ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(c.generate, p, max_tokens=8, ignore_eos=True) for p in prompts]
        time.sleep(1.0)
        ray.kill(served.pool.prefill_pool.actor_handle(0), no_restart=False)
        t0 = time.monotonic()
        for f in futures:
            with pytest.raises(Unavailable, match=r"KV handoff: the prefill worker (died|was lost)"):
                f.result(timeout=30)
        assert time.monotonic() - t0 < 10.0
    served.wait_idle()
