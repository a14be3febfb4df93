"""TritonPagedAttention against a float64 dense causal attention computed from each
sequence's contiguous K/V. On a CPU-only machine the kernels run in Triton's interpreter
at small sizes; the ``gpu`` tests sweep the real shapes and capture decode in a CUDA graph."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before the import
pytest.importorskip("triton")

from attention_helpers import DEVICE, TOL, PagedBatch, rel_err, run_backend

from kvrelay.worker.attention import triton_kernels as tk
from kvrelay.worker.attention.triton_backend import TritonPagedAttention

# ----------------------------------------------------------------------------- CPU / interpreter


def test_write_kv_exact_and_skips_padding() -> None:
    num_kv_heads, head_dim, block_size = 2, 64, 16
    cache = torch.full((2, 5, block_size, num_kv_heads, head_dim), math.nan, device=DEVICE)
    # k and v as strided views into one fused projection row, as the model produces them.
    kv = torch.randn(4, 3 * num_kv_heads * head_dim, device=DEVICE) + 0.3
    k = kv[:, : num_kv_heads * head_dim].view(4, num_kv_heads, head_dim)
    v = kv[:, 2 * num_kv_heads * head_dim :].view(4, num_kv_heads, head_dim)
    slots = torch.tensor([17, -1, 79, 0], dtype=torch.int64, device=DEVICE)
    tk.write_kv(k, v, cache, slots)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    for t, slot in ((0, 17), (2, 79), (3, 0)):
        assert torch.equal(flat[0, slot], k[t]) and torch.equal(flat[1, slot], v[t])
    written = torch.zeros(flat.shape[1], dtype=torch.bool)
    written[[17, 79, 0]] = True
    assert flat[:, ~written.to(DEVICE)].isnan().all()  # the padding token went nowhere


@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype"),
    [
        (16, 1, 64, torch.float32),
        (32, 4, 128, torch.bfloat16),
        (16, 8, 64, torch.float16),
        (32, 8, 64, torch.float32),
    ],
)
def test_decode_matches_reference(block_size: int, group: int, head_dim: int, dtype: torch.dtype) -> None:
    num_kv_heads = 2
    # Context 1, a non-multiple of the block size, several splits' worth, and a padding row.
    seqs = [(1, 1), (1, 45), (1, 333), (1, 0)]
    batch = PagedBatch(
        seqs,
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=group,
        max_blocks=24,
    )
    backend = TritonPagedAttention()
    assert backend.num_splits(DEVICE, len(seqs), num_kv_heads, 24, block_size, head_dim) > 1
    scale = head_dim**-0.5
    out = run_backend(batch, backend, scale)
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # seq_len 0: zeros, no NaN read
    assert rel_err(out, batch.reference(scale)) <= TOL[dtype]


def test_decode_split_count_does_not_change_result() -> None:
    batch = PagedBatch(
        [(1, 200), (1, 3), (1, 129)],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=3,
    )
    tk.write_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    ref = batch.reference(0.1)
    for splits in (1, 2, 8):
        scratch = torch.empty(tk.decode_scratch_numel(3, 8, splits, 64), device=DEVICE)
        out = tk.decode_attention(
            batch.q, batch.kv_cache, batch.meta.block_tables, batch.meta.seq_lens, 0.1, splits, scratch
        )
        assert rel_err(out, ref) <= 1e-4, splits


@pytest.mark.parametrize("prefill_impl", ["triton", "sdpa"])
@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype"),
    [(16, 4, 64, torch.float32), (32, 1, 128, torch.bfloat16), (16, 8, 64, torch.bfloat16)],
)
def test_prefill_matches_reference(
    prefill_impl: str, block_size: int, group: int, head_dim: int, dtype: torch.dtype
) -> None:
    # A fresh prompt, a decode row, chunks on unaligned and block-aligned cached prefixes,
    # and a prefix long enough for the kernel's unmasked phase.
    seqs = [(21, 21), (1, 40), (19, 70), (9, 9 + 2 * block_size), (5, 150)]
    batch = PagedBatch(
        seqs,
        num_heads=group * 2,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=7,
    )
    scale = head_dim**-0.5
    out = run_backend(batch, TritonPagedAttention(prefill_impl=prefill_impl), scale)
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert rel_err(out, batch.reference(scale)) <= TOL[dtype]


def test_num_decode_splits_depends_on_shapes_only() -> None:
    # Many programs already: one split. Few: as many as the SMs want, capped.
    assert tk.num_decode_splits(256, 8, 4096, 64, num_sms=132, max_splits=32) == 1
    assert tk.num_decode_splits(1, 8, 32768, 64, num_sms=132, max_splits=32) == 32
    assert tk.num_decode_splits(1, 8, 160, 64, num_sms=132, max_splits=32) == 2  # 3 tiles at most
    assert tk.num_decode_splits(8, 8, 4096, 64, num_sms=132, max_splits=32) == 8
    assert tk.num_decode_splits(64, 8, 4096, 64, num_sms=132, max_splits=32) == 1


def test_rejects_bad_prefill_impl() -> None:
    with pytest.raises(ValueError, match="prefill_impl"):
        TritonPagedAttention(prefill_impl="flash")


# ----------------------------------------------------------------------------- GPU

SWEEP_CONTEXTS = [1, 17, 512, 2048, 8192]


def _sweep_batches(batch: int) -> list[list[tuple[int, int]]]:
    """Batch 1 runs each context alone; larger batches mix them (they are per-row data)."""
    if batch == 1:
        return [[(1, c)] for c in SWEEP_CONTEXTS]
    return [[(1, SWEEP_CONTEXTS[(i * 3) % len(SWEEP_CONTEXTS)]) for i in range(batch)]]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_sweep_gpu(block_size: int, group: int, head_dim: int) -> None:
    # 2 KV heads keep the largest batch (256 rows, mean context ~2.1k) near 0.6 GB of cache.
    # One block-table width for all, as the engine sizes it from max_model_len: the split
    # count then depends on the batch size alone.
    max_blocks = max(SWEEP_CONTEXTS) // block_size
    backend = TritonPagedAttention()
    scale = head_dim**-0.5
    for batch_size in (1, 7, 64, 256):
        for i, seqs in enumerate(_sweep_batches(batch_size)):
            batch = PagedBatch(
                seqs,
                num_heads=2 * group,
                num_kv_heads=2,
                head_dim=head_dim,
                block_size=block_size,
                dtype=torch.bfloat16,
                seed=batch_size + i,
                max_blocks=max_blocks,
            )
            err = rel_err(run_backend(batch, backend, scale), batch.reference(scale))
            assert err <= 1e-2, (batch_size, seqs[0], err)


@pytest.mark.gpu
@pytest.mark.parametrize(("block_size", "group", "head_dim"), [(16, 1, 128), (32, 8, 64), (16, 4, 128)])
def test_decode_fp32_gpu(block_size: int, group: int, head_dim: int) -> None:
    seqs = [(1, c) for c in [*SWEEP_CONTEXTS, 0, 17]]
    batch = PagedBatch(
        seqs,
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float32,
    )
    out = run_backend(batch, TritonPagedAttention(), 0.1)
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    assert rel_err(out, batch.reference(0.1)) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype"),
    [
        (16, 4, 128, torch.bfloat16),
        (32, 1, 64, torch.bfloat16),
        (16, 8, 64, torch.bfloat16),
        (32, 4, 128, torch.float32),
    ],
)
def test_prefill_gpu(block_size: int, group: int, head_dim: int, dtype: torch.dtype) -> None:
    seqs = [(1000, 1000), (300, 1500), (1, 2049), (64, 96), (17, 117), (1, 1), (130, 130 + 4 * block_size)]
    batch = PagedBatch(
        seqs,
        num_heads=4 * group,
        num_kv_heads=4,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    scale = head_dim**-0.5
    ref = batch.reference(scale)
    for impl in ("triton", "sdpa"):
        out = run_backend(batch, TritonPagedAttention(prefill_impl=impl), scale)
        assert rel_err(out, ref) <= TOL[dtype], impl


@pytest.mark.gpu
def test_decode_cuda_graph_replay_follows_new_lengths() -> None:
    """Capture once, then change lengths, block tables and slots in place: the replay must
    attend over the new contexts (the grid and split count never saw the lengths)."""
    max_blocks, num_blocks, scale = 160, 1200, 128**-0.5

    def make(contexts: list[int], seed: int) -> PagedBatch:
        return PagedBatch(
            [(1, c) for c in contexts],
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            block_size=16,
            dtype=torch.bfloat16,
            seed=seed,
            max_blocks=max_blocks,
            num_blocks=num_blocks,
        )

    first, second = make([5, 700, 2048, 1], seed=0), make([2500, 0, 33, 1024], seed=1)
    backend = TritonPagedAttention()
    static = first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_backend(static, backend, scale)  # compile and allocate scratch outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_backend(static, backend, scale)
    for batch in (first, second):
        for name in ("q", "k", "v", "kv_cache"):
            getattr(static, name).copy_(getattr(batch, name))
        for name in ("seq_lens", "block_tables", "slot_mapping", "query_start_loc"):
            getattr(static.meta, name).copy_(getattr(batch.meta, name))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, batch.reference(scale)) <= 1e-2
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.gpu
def test_bench_decode_attention_reports_bandwidth() -> None:
    from kvrelay.worker.bench.attention import bench_decode_attention

    result = bench_decode_attention(batch=8, context=512, iters=5)
    assert result["attn_ms"] > 0 and result["attn_gbps"] > 0 and result["copy_gbps"] > 0
    assert result["ratio"] == pytest.approx(result["attn_gbps"] / result["copy_gbps"])


@pytest.mark.gpu
def test_prefill_compiles_once_for_any_batch_gpu() -> None:
    """Serving meets a new sequence count and block-table width on many steps; none of them may
    compile a new kernel variant (a compile stalls every stream of the worker for ~1-2 s). The
    mixed path's decode launch (varlen mode) runs in every such step, decodes or not: widths 1
    and 16 (Triton's integer specializations) must not compile it again either."""
    knobs = pytest.importorskip("triton").knobs
    if not hasattr(knobs.runtime, "jit_cache_hook"):
        pytest.skip("this Triton has no jit_cache_hook")
    compiles: list[str] = []

    def hook(**kwargs: object) -> bool:
        compiles.append(str(kwargs.get("repr")).split("[", 1)[0])
        return False  # count, then compile as usual

    backend = TritonPagedAttention(prefill_impl="triton")
    batches = [
        [(17, 17)],
        [(16, 16), (100, 100)],
        [(5, 40)] * 16,
        [(33, 33)] * 17,
        [(1, 300), (1000, 1000)],
        [(3, 3), (1, 5)],  # block-table width 1
        [(1, 256), (40, 40), (1, 9)],  # width 16
    ]
    shape = {"num_heads": 8, "num_kv_heads": 2, "head_dim": 64, "block_size": 16, "dtype": torch.bfloat16}
    run_backend(PagedBatch(batches[0], **shape), backend, 0.125)  # type: ignore[arg-type]
    old = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        for seqs in batches[1:]:
            batch = PagedBatch(seqs, **shape)  # type: ignore[arg-type]
            assert rel_err(run_backend(batch, backend, 0.125), batch.reference(0.125)) <= TOL[torch.bfloat16]
    finally:
        knobs.runtime.jit_cache_hook = old
    assert "_prefill_kernel" not in compiles and "_decode_partial_kernel" not in compiles, compiles
