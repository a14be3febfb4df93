"""Token-bucket graphs of steps with prefill chunks (worker/prefill_graph.py), on the CPU.

A graph records the padded forward; here the same padded forward runs eagerly
(``attach_prefill_graphs(capture=False)``) with the Triton attention kernels in Triton's
interpreter, and is checked against the torch backend's dense attention run unpadded: the
logits of every step, the greedy tokens, and the whole KV pool (so padding rows wrote nothing).
The GPU tests (tests/test_gpu_prefill_graph.py) check that replays equal this.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before the import
pytest.importorskip("triton")

from checkpoints import make_checkpoint
from engine_helpers import make_engine, random_prompts

from kvrelay.worker.attention import triton_prefill as tp
from kvrelay.worker.attention.torch_backend import TorchPagedAttention
from kvrelay.worker.attention.triton_backend import TritonPagedAttention
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine
from kvrelay.worker.prefill_graph import default_token_buckets, prefill_token_buckets
from kvrelay.worker.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)
# Small steps keep the interpreted kernels fast: buckets 16, 32, 48, 64.
SMALL: dict[str, Any] = {"max_num_batched_tokens": 64, "max_num_seqs": 8, "num_kv_blocks": 48}


def padded_engine(buckets: list[int] | None = None, *, mixed_decode_kernel: bool = True) -> Engine:
    """Triton attention with every step that has a prefill chunk run through its token bucket
    (its decode rows through the decode kernel, or with everything else through the prefill one)."""
    engine = make_engine(attention_backend="triton", device="cpu", **SMALL)
    backend = next(m.attn_backend for m in engine.model.modules() if hasattr(m, "attn_backend"))
    assert isinstance(backend, TritonPagedAttention)
    backend.mixed_decode_kernel = mixed_decode_kernel
    engine.runner.attach_prefill_graphs(
        buckets or default_token_buckets(SMALL["max_num_batched_tokens"]),
        hidden_size=engine.model_config.hidden_size,
        dtype=engine.dtype,
        capture=False,
    )
    return engine


def record_steps(engine: Engine) -> list[tuple[int, int, torch.Tensor]]:
    """Wrap the runner's execute: (num_tokens, num_seqs, logits) of every step run."""
    seen: list[tuple[int, int, torch.Tensor]] = []
    execute = engine.runner.execute

    def recorded(inp: Any) -> torch.Tensor:
        logits = execute(inp)
        seen.append((inp.meta.num_tokens, inp.meta.num_seqs, logits.clone()))
        return logits

    engine.runner.execute = recorded  # type: ignore[method-assign]
    return seen


def test_default_token_buckets() -> None:
    assert default_token_buckets(2048) == [
        16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
        640, 768, 896, 1024, 1280, 1536, 1792, 2048,
    ]  # fmt: skip
    assert default_token_buckets(600) == [*default_token_buckets(512)[:-1], 512, 600]
    assert default_token_buckets(100) == [16, 32, 48, 64, 80, 96, 100]
    assert default_token_buckets(16) == [16]
    assert default_token_buckets(8) == [8]


def test_which_engines_get_prefill_graphs() -> None:
    triton, config = TritonPagedAttention(), EngineConfig(max_num_batched_tokens=512)
    assert prefill_token_buckets(config, triton) == default_token_buckets(512)
    assert prefill_token_buckets(EngineConfig(prefill_graph_tokens=(64, 16, 64)), triton) == [16, 64]
    assert prefill_token_buckets(EngineConfig(prefill_graphs=False), triton) == []
    # Backends that read the metadata's host lists cannot be captured with a prefill.
    assert prefill_token_buckets(config, TorchPagedAttention()) == []
    assert prefill_token_buckets(config, TritonPagedAttention(prefill_impl="sdpa")) == []


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ((), "prefill_graph_tokens must name at least one token bucket"),
        ((16, 4096), "max_num_batched_tokens=2048], got 4096"),
        ((0, 16), "got 0"),
    ],
)
def test_bad_token_buckets_are_refused(tokens: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EngineConfig(prefill_graph_tokens=tokens)


@pytest.mark.parametrize("mixed_decode_kernel", [True, False], ids=["decode-kernel", "prefill-kernel"])
def test_padded_buckets_equal_dense_reference_logits_tokens_and_kv(mixed_decode_kernel: bool) -> None:
    """Prefill, mixed (chunk + decodes) and padded steps, then prefix hits, against the torch
    backend's unpadded eager path: same logits, same greedy tokens, the same KV pool bit for bit
    where written and untouched elsewhere."""
    padded, ref = padded_engine(mixed_decode_kernel=mixed_decode_kernel), make_engine(**SMALL)
    for engine in (padded, ref):  # NaN everywhere: a slot written by a padding row shows up
        for cache in engine.runner.kv_caches:
            cache.fill_(float("nan"))
    got, want = record_steps(padded), record_steps(ref)
    # Budget 64: step 1 = 5 + 20 + 37 + 2 tokens of the 70-token prompt (bucket 64, exact);
    # step 2 = 3 decodes + 61 of its chunk (64, mixed); step 3 = 3 decodes + its last 7
    # (10 tokens, padded to 16), the short ones finish; then decode-only steps (eager).
    prompts = random_prompts(4, [5, 20, 37, 70], 256, seed=3)
    outs = [padded.generate(prompts, GREEDY), padded.generate(prompts[1:3], GREEDY)]
    refs = [ref.generate(prompts, GREEDY), ref.generate(prompts[1:3], GREEDY)]
    for o, r in zip(outs, refs, strict=True):
        assert [c.token_ids for c in o] == [c.token_ids for c in r]
    assert padded.stats().prefix_cache_hits > 0  # the second call's prompts come from the cache
    assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in want]
    assert [(t, s) for t, s, _ in got[:4]] == [(64, 4), (64, 4), (10, 4), (1, 1)]
    for i, ((_, _, a), (_, _, b)) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {i}")
    for layer, (a, b) in enumerate(zip(padded.runner.kv_caches, ref.runner.kv_caches, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"KV of layer {layer}")
    pg = padded.runner.prefill_graphs
    assert pg is not None
    # Steps with a prefill chunk: 3 in the first call, 1 in the second (two 20/37-token prompts
    # whose full blocks hit the cache: 4 + 5 tokens left).
    assert pg.num_replays == 4
    assert padded.stats().num_prefill_graph_replays == 4
    padded.check_integrity()


def test_steps_past_the_largest_bucket_run_eagerly_and_are_counted() -> None:
    engine = padded_engine(buckets=[16])
    engine.generate(random_prompts(2, [5, 30], 256, seed=4), GREEDY)
    # 35 prompt tokens: no bucket, eager; then 2 decode-only steps, eager (no decode graphs here).
    assert (engine.runner.num_eager_steps, engine.stats().num_prefill_graph_replays) == (3, 0)
    engine.generate(random_prompts(1, [9], 256, seed=5), SamplingParams(max_tokens=1))
    assert (engine.runner.num_eager_steps, engine.stats().num_prefill_graph_replays) == (3, 1)
    engine.check_integrity()


def test_padding_sequence_reads_nothing_writes_zeros_and_real_rows_are_unchanged() -> None:
    """The varlen kernel on a graph's padded layout: two real sequences (12 tokens), the padding
    sequence owning rows 12..159 with context 0, then two sequences with no rows. Every block but
    the real context's is NaN (block 0 too), so a padding row that read any KV would not be 0."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 32, 16
    cache = torch.full((2, 8, block, kv_heads, dim), float("nan"))
    cache[:, [3, 5, 6]] = torch.randn(2, 3, block, kv_heads, dim, generator=gen)
    q = torch.randn(160, heads, dim, generator=gen)
    tables = torch.tensor([[3, 5], [6, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 7, 0, 0, 0], dtype=torch.int32)
    starts = torch.tensor([0, 5, 12, 160, 160, 160], dtype=torch.int32)
    padded = tp.prefill_attention(q, cache, tables, seq_lens, starts, 0.3)  # [160, H, D]
    exact = tp.prefill_attention(q[:12].clone(), cache, tables[:2], seq_lens[:2], starts[:3], 0.3)
    assert torch.equal(padded[:12], exact)
    assert torch.equal(padded[12:], torch.zeros(148, heads, dim))


def test_preemption_and_recompute_through_buckets_match_the_reference(tmp_path: Path) -> None:
    """A pool too small for every sequence: requests are preempted and recomputed, and those
    recomputes (prompt + generated tokens) run through the buckets too. A 2-layer Qwen3
    checkpoint (q/k norms in the RoPE launch) keeps the interpreted kernels quick."""
    model = make_checkpoint(tmp_path, "qwen3")
    small = {**SMALL, "num_kv_blocks": 6, "model": str(model)}  # 96 tokens for 4 sequences of up to 32
    padded = make_engine(attention_backend="triton", **small)
    padded.runner.attach_prefill_graphs(
        [16, 32, 64], hidden_size=padded.model_config.hidden_size, dtype=padded.dtype, capture=False
    )
    ref = make_engine(**small)
    prompts = random_prompts(4, [20, 9, 17, 12], 256, seed=6)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    got, want = padded.generate(prompts, params), ref.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert padded.stats().num_preemptions == ref.stats().num_preemptions > 0
    padded.check_integrity()
