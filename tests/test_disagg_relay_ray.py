"""Disaggregated serving with the relay transport (what workers on different nodes use, forced
here on one machine) and the "fail" policy: streams equal the colocated engine, and a prefill
worker killed mid-handoff fails exactly its streams with UNAVAILABLE, leaking no block."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_helpers import random_prompts
from ray_helpers import LoopThread, ray_local  # noqa: F401
from test_disagg_ray import VOCAB, Served, _expected

from kvrelay.cluster.client import Unavailable
from kvrelay.cluster.config import load_config
from kvrelay.cluster.disagg import DisaggregatedPool
from kvrelay.cluster.grpc_server import build_server
from kvrelay.cluster.pool import PoolTimeouts
from kvrelay.cluster.router import GenerationRouter


@pytest.fixture(scope="module")
def served(ray_local: None) -> Iterator[Served]:  # noqa: F811
    lt = LoopThread()
    engine = {
        "num_kv_blocks": 512,
        "kv_transport": "relay",
        "handoff_policy": "fail",
        "handoff_timeout_s": 5.0,
    }
    config = load_config(None, {"port": 0, "device": "cpu", "engine": engine})
    pool = DisaggregatedPool(
        config.engine, 1, 1, "cpu", max_restarts=2, timeouts=PoolTimeouts(stall_s=20.0, no_progress_s=60.0)
    )

    async def start() -> Served:
        router = GenerationRouter(pool, config)  # type: ignore[arg-type]
        await router.start()
        server, port = build_server(router, config)
        await server.start()
        return Served(lt, pool, router, server, f"127.0.0.1:{port}")

    s = lt.run(start(), timeout_s=180)
    yield s
    lt.run(s.server.stop(0))
    lt.run(s.router.stop())
    lt.close()


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
