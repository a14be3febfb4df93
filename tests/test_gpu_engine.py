"""The engine on one GPU: Triton attention, CUDA-graph decode buckets, parity with the CPU engine."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine, random_prompts

from kvrelay.worker.cuda_graph import default_buckets
from kvrelay.worker.engine import Engine
from kvrelay.worker.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def gpu_engine(**overrides: object) -> Engine:
    fields: dict[str, object] = {"device": "cuda", "num_kv_blocks": 4096, "max_num_seqs": 256}
    fields.update(overrides)
    return make_engine(**fields)


def test_gpu_float32_greedy_equals_cpu() -> None:
    prompts = random_prompts(9, [1, 5, 17, 40, 100, 333], 256, seed=21)
    cpu = make_engine().generate(prompts, GREEDY)
    for eager in (True, False):
        engine = gpu_engine(enforce_eager=eager)
        gpu = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu], f"enforce_eager={eager}"
        engine.check_integrity()


def test_every_bucket_replay_equals_eager() -> None:
    engine = gpu_engine(async_scheduling=False)  # it prepares steps by hand between engine steps
    runner = engine.runner
    graphs = runner.graphs
    assert graphs is not None and graphs.buckets == default_buckets(256)
    for bucket in graphs.buckets:
        for n in sorted({bucket, max(1, bucket - 3)}):  # exact fit, and padded rows
            for i, p in enumerate(random_prompts(n, [3, 20, 47], 256, seed=bucket + n)):
                engine.add_request(f"b{bucket}-{n}-{i}", p, SamplingParams(max_tokens=16, ignore_eos=True))
            while any(r.num_output_tokens == 0 for r in engine.requests.values()):
                engine.step()  # prefill (chunked over the token budget)
            sched = engine.scheduler.schedule()
            inp = runner.prepare(sched, engine.allocator)
            assert inp.graph_bucket == graphs.bucket_for(n)
            replayed = runner.execute(inp).clone()
            runner.graphs = None
            try:
                eager = runner.execute(runner.prepare(sched, engine.allocator))
            finally:
                runner.graphs = graphs
            torch.testing.assert_close(
                replayed, eager, rtol=1e-5, atol=1e-5, msg=f"bucket {bucket}, {n} rows"
            )
            for rid in list(engine.requests):
                engine.abort_request(rid)
            engine.check_integrity()
            assert engine.allocator.num_used_blocks == 0


def test_padded_batch_tokens_equal_unpadded_eager_and_eager_fallback_counts() -> None:
    prompts = random_prompts(13, [4, 9, 30], 256, seed=22)
    eager = gpu_engine(enforce_eager=True).generate(prompts[:5], GREEDY)
    engine = gpu_engine(max_graph_batch_size=8, prefill_graphs=False)  # prompts eager: counted too
    padded = engine.generate(prompts[:5], GREEDY)  # 5 rows run the bucket of 8
    assert [o.token_ids for o in padded] == [o.token_ids for o in eager]
    stats = engine.stats()
    assert stats.num_graph_replays == GREEDY.max_tokens - 1
    before = stats.num_eager_steps
    engine.generate(prompts, GREEDY)  # 13 rows: no bucket fits, decode runs eagerly
    assert engine.stats().num_eager_steps - before == GREEDY.max_tokens


def test_bfloat16_engine_runs_with_graphs() -> None:
    engine = gpu_engine(dtype="bfloat16")
    outs = engine.generate(random_prompts(40, [8, 64, 200], 256, seed=23), GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert engine.stats().num_graph_replays > 0
    engine.check_integrity()
