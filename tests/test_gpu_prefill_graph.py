"""Token-bucket CUDA graphs of steps with prefill chunks on one GPU: replay == eager for every
bucket on mixed steps, padding rows write no KV, greedy tokens unchanged, capture reported."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine, random_prompts

from kvrelay.worker.engine import Engine
from kvrelay.worker.prefill_graph import default_token_buckets
from kvrelay.worker.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
DECODING = SamplingParams(max_tokens=64, ignore_eos=True)


def gpu_engine(**overrides: object) -> Engine:
    fields: dict[str, object] = {"device": "cuda", "num_kv_blocks": 2048, "max_num_seqs": 64}
    fields.update(overrides)
    return make_engine(**fields)


def changed_slots(before: list[torch.Tensor], after: list[torch.Tensor]) -> set[int]:
    """Flat KV slots whose K or V differ in any layer (NaN == NaN)."""
    out: set[int] = set()
    for b, a in zip(before, after, strict=True):
        same = (a == b) | (a.isnan() & b.isnan())  # [2, blocks, block_size, Hkv, D]
        diff = ~same.all(dim=-1).all(dim=-1).all(dim=0)  # [blocks, block_size]
        out |= set(diff.flatten().nonzero().flatten().tolist())
    return out


def test_every_token_bucket_replay_equals_eager_on_mixed_steps_and_pads_write_no_kv() -> None:
    engine = gpu_engine(async_scheduling=False)  # it prepares steps by hand between engine steps
    runner, pg = engine.runner, engine.runner.prefill_graphs
    assert pg is not None and pg.buckets == default_token_buckets(2048)
    for cache in runner.kv_caches:  # unwritten slots are NaN: a stray write shows, a stray read too
        cache.fill_(float("nan"))
    vocab = engine.model_config.vocab_size
    for bucket in pg.buckets:
        for target in sorted({bucket, bucket - 3}):  # exact fit, and padded rows
            decodes = min(8, target // 4)
            for i, p in enumerate(random_prompts(decodes, [3, 20, 47], vocab, seed=bucket + target)):
                engine.add_request(f"d{bucket}-{target}-{i}", p, DECODING)
            while any(r.num_output_tokens == 0 for r in engine.requests.values()):
                engine.step()
            # One prompt (a fresh seed: no prefix-cache hit) fills the
            # step to `target` tokens beside the decodes.
            engine.add_request(
                f"p{bucket}-{target}", random_prompts(1, [target - decodes], vocab, seed=-target)[0], GREEDY
            )
            sched = engine.scheduler.schedule()
            inp = runner.prepare(sched, engine.allocator)
            assert (inp.meta.num_tokens, inp.meta.num_seqs) == (target, decodes + 1)
            assert pg.bucket_for(target) == bucket
            before = [c.clone() for c in runner.kv_caches]
            replays = pg.num_replays
            replayed = runner.execute(inp).clone()
            assert pg.num_replays == replays + 1
            real = set(inp.meta.slot_mapping[:target].tolist())
            assert changed_slots(before, runner.kv_caches) <= real, f"bucket {bucket}: a pad row wrote KV"
            runner.prefill_graphs = None
            try:
                eager = runner.execute(runner.prepare(sched, engine.allocator))
            finally:
                runner.prefill_graphs = pg
            torch.testing.assert_close(
                replayed, eager, rtol=1e-5, atol=1e-4, msg=f"bucket {bucket}, {target} tokens"
            )
            for rid in list(engine.requests):
                engine.abort_request(rid)
            engine.check_integrity()
            assert engine.allocator.num_used_blocks == 0


def test_greedy_tokens_identical_with_and_without_prefill_graphs() -> None:
    # Prompt lengths across several buckets, chunked past the 256-token budget, decodes mixed in.
    prompts = random_prompts(12, [1, 7, 16, 33, 100, 255, 600], 256, seed=31)
    common = {"max_num_batched_tokens": 256}
    want = gpu_engine(prefill_graphs=False, **common).generate(prompts, GREEDY)
    engine = gpu_engine(**common)
    got = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    stats = engine.stats()
    assert stats.num_prefill_graph_replays > 0 and stats.num_eager_steps == 0
    engine.check_integrity()


def test_greedy_tokens_identical_with_decode_rows_through_either_kernel() -> None:
    """Mixed steps (chunks beside decodes, graphed) with the decode rows through the decode kernel
    (the default) and through the prefill kernel (prefill graphs captured again with it off)."""
    from kvrelay.worker.bench.prefill import MixedDecodeKernel, triton_backend

    prompts = random_prompts(12, [1, 7, 16, 33, 100, 255, 600], 256, seed=37)
    engine = gpu_engine(max_num_batched_tokens=256)
    backend = triton_backend(engine)
    assert backend is not None and backend.mixed_decode_kernel
    got = engine.generate(prompts, GREEDY)
    replays = engine.stats().num_prefill_graph_replays
    with MixedDecodeKernel(engine, backend, on=False):
        assert engine.runner.prefill_graphs is not None and not backend.mixed_decode_kernel
        want = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert replays > 0 and engine.stats().num_eager_steps == 0
    engine.check_integrity()


def test_capture_is_reported_and_oversized_steps_run_eagerly() -> None:
    engine = gpu_engine(prefill_graph_tokens=(16, 64), max_num_batched_tokens=512)
    pg = engine.runner.prefill_graphs
    assert pg is not None and sorted(pg.graphs) == [16, 64]
    stats = engine.stats()
    assert stats.graph_memory_bytes == engine.runner.graph_memory_bytes > 0
    assert stats.graph_capture_s > 0
    engine.generate(random_prompts(1, [40], 256, seed=1), SamplingParams(max_tokens=1))
    engine.generate(random_prompts(1, [300], 256, seed=2), SamplingParams(max_tokens=1))
    stats = engine.stats()
    assert (stats.num_prefill_graph_replays, stats.num_eager_steps) == (1, 1)
    engine.check_integrity()


def test_bfloat16_prefill_graphs_run_and_off_switch_captures_none() -> None:
    engine = gpu_engine(dtype="bfloat16")
    outs = engine.generate(random_prompts(20, [8, 64, 700], 256, seed=23), GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert engine.stats().num_prefill_graph_replays > 0
    engine.check_integrity()
    off = gpu_engine(prefill_graphs=False)
    assert off.runner.prefill_graphs is None and off.runner.graphs is not None
