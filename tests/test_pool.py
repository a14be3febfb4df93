"""The Ray worker pool on a real local cluster: streaming parity, a worker killed mid-stream, stop.

One pool of two CPU workers serves the whole module (tests run in file order: the last one
stops it).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_helpers import make_engine, random_prompts
from ray_helpers import LoopThread, ray_local  # noqa: F401

from kvrelay.cluster.dataplane import DataPlanePool
from kvrelay.cluster.interfaces import ModelDescription
from kvrelay.cluster.pool import RayWorkerPool
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.model.tiny import tiny_model_dir
from kvrelay.worker.protocol import TokenDelta, WorkRequest
from kvrelay.worker.request import FinishReason
from kvrelay.worker.sampling_params import SamplingParams

CONFIG = EngineConfig(model="tiny", device="cpu", dtype="float32", num_kv_blocks=512, detokenize=False)
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
LONG = SamplingParams(max_tokens=3000, ignore_eos=True)  # still running when its worker is killed
MEDIUM = SamplingParams(max_tokens=300, ignore_eos=True)  # outlives the kill, ends well before a restart


class Recorder:
    """The pool's callbacks (called on the asyncio thread), readable from the test thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.batches: dict[str, int] = defaultdict(int)  # deltas that carried tokens, per request
        self.final: dict[str, tuple[int, TokenDelta]] = {}  # request_id -> (rank, final delta)
        self.down: list[tuple[int, str, float]] = []
        self.up: list[tuple[int, float]] = []

    def on_deltas(self, rank: int, deltas: list[TokenDelta]) -> None:
        with self.cond:
            for d in deltas:
                self.tokens[d.request_id] += d.token_ids
                self.batches[d.request_id] += bool(d.token_ids)
                if d.finish_reason is not None:
                    self.final[d.request_id] = (rank, d)
            self.cond.notify_all()

    def on_worker_down(self, rank: int, why: str) -> None:
        with self.cond:
            self.down.append((rank, why, time.monotonic()))
            self.cond.notify_all()

    def on_worker_up(self, rank: int) -> None:
        with self.cond:
            self.up.append((rank, time.monotonic()))
            self.cond.notify_all()

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout_s), (
                f"timed out after {timeout_s} s waiting for {what}"
            )


@pytest.fixture(scope="module")
def aio() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def rec() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def pool(ray_local: None, aio: LoopThread, rec: Recorder) -> Iterator[RayWorkerPool]:  # noqa: F811
    p = RayWorkerPool(CONFIG, num_workers=2, device="cpu", max_restarts=2)
    aio.run(p.start(rec.on_deltas, rec.on_worker_down, rec.on_worker_up), timeout_s=120)
    yield p
    aio.run(p.stop())


@pytest.fixture(scope="module")
def other() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def second(pool: RayWorkerPool, aio: LoopThread, other: Recorder) -> Iterator[DataPlanePool]:
    """A second router over the same workers, with no Ray: the pool's endpoints, kept current."""
    p = DataPlanePool(pool.model, pool.endpoints(), router_id="second-router")
    pool.on_endpoint_change(p.set_endpoint)
    aio.run(p.start(other.on_deltas, other.on_worker_down, other.on_worker_up), timeout_s=30)
    yield p
    aio.run(p.stop())


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(8, [1, 7, 16, 33, 50, 3, 20, 9], 256, seed=7)


def reference(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [o.token_ids for o in make_engine(detokenize=False).generate(prompts, params)]


def work(rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> WorkRequest:
    return WorkRequest(rid, prompt, params)


def test_pool_starts_and_describes_the_model(pool: RayWorkerPool) -> None:
    m = pool.model
    assert m.model_dir is not None and Path(m.model_dir).resolve() == tiny_model_dir().resolve()
    assert m == ModelDescription(
        model="tiny",
        vocab_size=320,
        max_model_len=4096,
        eos_token_ids=(257,),
        block_size=16,
        kv_capacity_tokens=512 * 16,
        model_dir=m.model_dir,
    )
    assert [(w.rank, w.healthy, w.load.num_kv_blocks) for w in pool.workers] == [
        (0, True, 512),
        (1, True, 512),
    ]


def test_each_worker_streams_the_in_process_engines_tokens(
    pool: RayWorkerPool, aio: LoopThread, rec: Recorder, prompts: list[list[int]]
) -> None:
    expected = reference(prompts[:6], GREEDY)
    w0, w1 = pool.workers
    assert aio.run(w0.submit([work(f"s{i}", prompts[i]) for i in range(3)])) == {}
    bad = work("bad", [1, 999])
    assert aio.run(w1.submit([work(f"s{i}", prompts[i]) for i in range(3, 6)] + [bad])) == {
        "bad": "prompt: token id 999 is outside the vocabulary [0, 320)"
    }
    ids = [f"s{i}" for i in range(6)]
    rec.wait("6 streams to finish", lambda: all(i in rec.final for i in ids), 30)
    for i, rid in enumerate(ids):
        rank, final = rec.final[rid]
        assert rank == (0 if i < 3 else 1)
        assert rec.tokens[rid] == expected[i]
        assert (final.finish_reason, final.completion_tokens) == (FinishReason.LENGTH, GREEDY.max_tokens)
        assert rec.batches[rid] >= 2  # streamed as it was generated, not in one piece at the end
    assert "bad" not in rec.tokens
    deadline = time.monotonic() + 5
    while any(w.load.outstanding_tokens or w.load.num_running for w in pool.workers):
        assert time.monotonic() < deadline, [w.load for w in pool.workers]
        time.sleep(0.05)
    aio.run(pool.check_integrity())


def test_a_second_router_shares_the_workers_and_gets_only_its_own_deltas(
    pool: RayWorkerPool,
    second: DataPlanePool,
    aio: LoopThread,
    rec: Recorder,
    other: Recorder,
    prompts: list[list[int]],
) -> None:
    assert [e.rank for e in pool.endpoints()] == [0, 1]
    assert all(e.address.startswith("tcp://") for e in pool.endpoints())
    expected = reference(prompts[6:8], GREEDY)
    assert [w.healthy for w in second.workers] == [True, True]
    assert aio.run(second.workers[0].submit([work("o0", prompts[6])])) == {}
    assert aio.run(pool.workers[0].submit([work("p0", prompts[7])])) == {}
    rec.wait("p0", lambda: "p0" in rec.final, 30)
    other.wait("o0", lambda: "o0" in other.final, 30)
    assert [other.tokens["o0"], rec.tokens["p0"]] == expected
    assert "o0" not in rec.tokens and "p0" not in other.tokens
    # Both routers see the worker's load from its heartbeats.
    assert second.workers[1].load.num_kv_blocks == 512


def test_killed_worker_goes_down_alone_and_comes_back_empty(
    pool: RayWorkerPool,
    second: DataPlanePool,
    aio: LoopThread,
    rec: Recorder,
    other: Recorder,
    prompts: list[list[int]],
) -> None:
    import ray

    survivors = reference(prompts[2:4], MEDIUM)
    w0, w1 = pool.workers
    assert aio.run(w0.submit([work("k0", prompts[0], LONG), work("k1", prompts[1], LONG)])) == {}
    assert aio.run(w1.submit([work("m0", prompts[2], MEDIUM), work("m1", prompts[3], MEDIUM)])) == {}
    rec.wait("all four streams to start", lambda: all(rec.tokens[i] for i in ("k0", "k1", "m0", "m1")), 10)

    killed_at = time.monotonic()
    ray.kill(pool.actor_handle(0), no_restart=False)
    rec.wait("worker 0 down", lambda: bool(rec.down), 5)
    assert [(rank, why) for rank, why, _ in rec.down] == [(0, "worker 0 died")]
    assert rec.down[0][2] - killed_at < 5.0
    assert not w0.healthy and w1.healthy
    with pytest.raises(ConnectionError, match="worker 0 is unavailable"):
        aio.run(w0.submit([work("refused", prompts[0])]))

    # The other worker's streams, in flight during the kill, complete with the right tokens.
    rec.wait("worker 1 streams to finish", lambda: "m0" in rec.final and "m1" in rec.final, 30)
    assert [rec.tokens["m0"], rec.tokens["m1"]] == survivors
    assert {rec.final[i][1].finish_reason for i in ("m0", "m1")} == {FinishReason.LENGTH}

    rec.wait("worker 0 back up", lambda: bool(rec.up), 60)
    assert [rank for rank, _ in rec.up] == [0] and rec.up[0][1] > rec.down[0][2]
    assert w0.healthy and len(rec.down) == 1
    assert "k0" not in rec.final and "k1" not in rec.final  # lost with the worker: the router fails them
    # The second router was told (endpoint None, then the new one): down and up for rank 0 alone.
    other.wait("the second router to see worker 0 back", lambda: bool(other.up), 30)
    assert [r for r, _, _ in other.down] == [0] and [r for r, _ in other.up] == [0]
    assert second.workers[0].endpoint == pool.endpoints()[0]

    expected = reference(prompts[4:6], GREEDY)
    assert aio.run(w0.submit([work("r0", prompts[4]), work("r1", prompts[5])])) == {}
    rec.wait("the restarted worker to serve", lambda: "r0" in rec.final and "r1" in rec.final, 30)
    assert [rec.tokens["r0"], rec.tokens["r1"]] == expected
    stats = aio.run(pool.stats())
    assert stats[0] is not None and stats[1] is not None
    # A fresh engine: exactly the steps of the two requests it served since the restart.
    assert (stats[0].num_steps, stats[0].num_used_blocks) == (GREEDY.max_tokens, 0)
    assert stats[1].num_used_blocks == 0
    aio.run(pool.check_integrity())


def test_a_worker_that_cannot_start_fails_start_with_its_one_line_cause(
    ray_local: None,  # noqa: F811
    aio: LoopThread,
) -> None:
    bad = RayWorkerPool(dataclasses.replace(CONFIG, model="/nonexistent"), num_workers=1, device="cpu")
    rec = Recorder()
    with pytest.raises(ValueError) as info:
        aio.run(bad.start(rec.on_deltas, rec.on_worker_down, rec.on_worker_up))
    assert (
        str(info.value)
        == "model: '/nonexistent' is not 'tiny', 'smollm2', a .gguf file nor an existing directory"
    )
    assert bad.workers == [] and (rec.down, rec.up) == ([], [])


@pytest.mark.multi_gpu
def test_gpu_workers_see_every_gpu_and_pick_their_own(
    ray_local: None,  # noqa: F811
    aio: LoopThread,
    prompts: list[list[int]],
) -> None:
    import ray

    config = dataclasses.replace(CONFIG, device="cuda", enforce_eager=True)
    gpu_rec = Recorder()
    gpu_pool = RayWorkerPool(config, num_workers=2, device="cuda")
    aio.run(gpu_pool.start(gpu_rec.on_deltas, gpu_rec.on_worker_down, gpu_rec.on_worker_up), timeout_s=300)
    try:
        infos = [ray.get(gpu_pool.actor_handle(r).device_info.remote()) for r in range(2)]
        assert sorted(infos) == [("cuda:0", 2), ("cuda:1", 2)]
        for w in gpu_pool.workers:
            assert aio.run(w.submit([work(f"g{w.rank}", prompts[3])])) == {}
        gpu_rec.wait("both GPU streams", lambda: "g0" in gpu_rec.final and "g1" in gpu_rec.final, 60)
        # Same model, same prompt, two GPUs: the same greedy tokens.
        assert gpu_rec.tokens["g0"] == gpu_rec.tokens["g1"]
        assert len(gpu_rec.tokens["g0"]) == GREEDY.max_tokens
        aio.run(gpu_pool.check_integrity())
    finally:
        aio.run(gpu_pool.stop())


def test_stop_leaves_no_actors_and_frees_the_placement_group(
    pool: RayWorkerPool,
    aio: LoopThread,
    ray_local: None,  # noqa: F811
) -> None:
    import ray
    import ray.exceptions

    handles = [pool.actor_handle(r) for r in range(2)]
    total_cpus = ray.cluster_resources()["CPU"]
    aio.run(pool.stop())
    for h in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.ready.remote(), timeout=10)
    deadline = time.monotonic() + 10
    while (free := ray.available_resources()).get("CPU") != total_cpus or any(
        k.startswith("bundle_group") for k in free
    ):
        assert time.monotonic() < deadline, free
        time.sleep(0.1)
    assert pool.workers == []
