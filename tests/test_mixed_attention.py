"""Steps with prefill chunks: the q_len == 1 sequences through the decode kernel in varlen mode
and the chunks through the prefill kernel (``mixed_decode_kernel=True``), or everything through
the prefill kernel (False), both against the float64 dense reference (attention_helpers.PagedBatch).
On a CPU-only machine the kernels run in Triton's interpreter at small sizes; the ``gpu`` tests
use realistic sizes and replay a captured mixed step at another decode/prefill split."""

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
from kvrelay.worker.attention import triton_prefill as tp
from kvrelay.worker.attention.metadata import AttentionMetadata
from kvrelay.worker.attention.triton_backend import TritonPagedAttention


def mixed_seqs(block_size: int) -> list[tuple[int, int]]:
    """(query_len, seq_len): decodes (context 1, unaligned, several tiles, block-aligned)
    interleaved with a fresh prompt, chunks on unaligned and block-aligned cached prefixes, and
    a prefix long enough for the prefill kernel's unmasked phase."""
    return [
        (1, 40),
        (21, 21),
        (1, 1),
        (19, 70),
        (1, 333),
        (9, 9 + 2 * block_size),
        (1, 4 * block_size),
        (5, 150),
    ]


def decode_rows(seqs: list[tuple[int, int]]) -> list[int]:
    starts = [sum(q for q, _ in seqs[:s]) for s in range(len(seqs))]
    return [starts[s] for s, (q, _) in enumerate(seqs) if q == 1]


@pytest.mark.parametrize("mixed_decode_kernel", [True, False], ids=["decode-kernel", "prefill-kernel"])
@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype"),
    [(16, 4, 64, torch.float32), (32, 1, 128, torch.bfloat16), (16, 8, 64, torch.bfloat16)],
)
def test_mixed_step_matches_reference(
    mixed_decode_kernel: bool, block_size: int, group: int, head_dim: int, dtype: torch.dtype
) -> None:
    seqs = mixed_seqs(block_size)
    batch = PagedBatch(
        seqs,
        num_heads=group * 2,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=5,
    )
    scale = head_dim**-0.5
    backend = TritonPagedAttention(mixed_decode_kernel=mixed_decode_kernel)
    out = run_backend(batch, backend, scale)
    assert out.shape == batch.q.shape and out.dtype == dtype
    ref = batch.reference(scale)
    assert rel_err(out, ref) <= TOL[dtype]
    rows = decode_rows(seqs)
    assert rel_err(out[rows], ref[rows]) <= TOL[dtype]  # the decode rows on their own


def test_the_two_launches_write_disjoint_rows_that_cover_the_step() -> None:
    """Into a NaN-filled output: the decode launch writes exactly the q_len == 1 rows, the
    prefill launch with skip_decode_rows exactly the others, each equal to the reference."""
    seqs = mixed_seqs(16)
    batch = PagedBatch(
        seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, seed=2
    )
    tk.write_kv(batch.k, batch.v, batch.kv_cache, batch.meta.slot_mapping)
    m, ref = batch.meta, batch.reference(0.125)
    is_decode = torch.zeros(m.num_tokens, dtype=torch.bool, device=DEVICE)
    is_decode[decode_rows(seqs)] = True

    dec = torch.full_like(batch.q, math.nan)
    tk.decode_rows_attention(
        batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, 0.125, dec
    )
    assert dec[~is_decode].isnan().all() and not dec[is_decode].isnan().any()
    assert rel_err(dec[is_decode], ref[is_decode]) <= 1e-4

    pre = torch.full_like(batch.q, math.nan)
    tp.prefill_attention(
        batch.q,
        batch.kv_cache,
        m.block_tables,
        m.seq_lens,
        m.query_start_loc,
        0.125,
        pre,
        skip_decode_rows=True,
    )
    assert pre[is_decode].isnan().all() and not pre[~is_decode].isnan().any()
    assert rel_err(pre[~is_decode], ref[~is_decode]) <= 1e-4


def _real_part(batch: PagedBatch, num_seqs: int, num_tokens: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """The step without the prefill graph's padding: its first sequences and token rows, over a
    copy of the cache as it was before the step."""
    m = batch.meta
    meta = AttentionMetadata(
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        query_start_loc=m.query_start_loc[: num_seqs + 1].clone(),
        seq_lens=m.seq_lens[:num_seqs].clone(),
        block_tables=m.block_tables[:num_seqs].clone(),
        slot_mapping=m.slot_mapping[:num_tokens].clone(),
        query_lens_cpu=m.query_lens_cpu[:num_seqs],
        seq_lens_cpu=m.seq_lens_cpu[:num_seqs],
        max_query_len=max(m.query_lens_cpu[:num_seqs]),
        max_seq_len=max(m.seq_lens_cpu[:num_seqs]),
    )
    return batch.kv_cache.clone(), meta


@pytest.mark.parametrize("mixed_decode_kernel", [True, False], ids=["decode-kernel", "prefill-kernel"])
@pytest.mark.parametrize("pad_rows", [7, 1], ids=["pad-chunk", "pad-one-row"])
def test_prefill_graph_padding_stays_inert(mixed_decode_kernel: bool, pad_rows: int) -> None:
    """The layout of prefill_graph.py's ``_pad``: real sequences, then the padding sequence with
    context 0 owning the token rows past num_tokens (one row: it looks like a decode), then two
    sequences owning no rows. Real rows are bit-identical to the unpadded step, padding rows 0."""
    real = [(1, 40), (6, 30), (1, 5), (1, 17)]
    num_tokens = sum(q for q, _ in real)
    seqs = [*real, (pad_rows, 0), (0, 0), (0, 0)]
    batch = PagedBatch(
        seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, seed=4
    )
    cache, meta = _real_part(batch, len(real), num_tokens)
    backend = TritonPagedAttention(mixed_decode_kernel=mixed_decode_kernel)
    padded = run_backend(batch, backend, 0.125)
    exact = backend.forward(
        batch.q[:num_tokens], batch.k[:num_tokens], batch.v[:num_tokens], cache, meta, 0.125
    )
    assert torch.equal(padded[:num_tokens], exact)
    assert torch.equal(padded[num_tokens:], torch.zeros_like(padded[num_tokens:]))
    assert rel_err(exact, batch.reference(0.125)[:num_tokens]) <= 1e-4
    # The padding wrote no KV: the two caches agree, NaN where nothing was written.
    assert torch.equal(cache.isnan(), batch.kv_cache.isnan())


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mixed_decode_kernel", [True, False], ids=["decode-kernel", "prefill-kernel"])
@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype"),
    [(16, 4, 128, torch.bfloat16), (32, 1, 64, torch.bfloat16), (16, 8, 64, torch.float32)],
)
def test_mixed_step_gpu(
    mixed_decode_kernel: bool, block_size: int, group: int, head_dim: int, dtype: torch.dtype
) -> None:
    """The profiled shape (a 256-token chunk beside 64 decodes at context 512) plus decodes at
    other contexts and a chunk on a long cached prefix."""
    seqs = [(256, 256), *[(1, 512)] * 64, (128, 1024), *[(1, c) for c in (1, 17, 2048, 8192)]]
    batch = PagedBatch(
        seqs, num_heads=8 * group, num_kv_heads=8, head_dim=head_dim, block_size=block_size, dtype=dtype
    )
    scale = head_dim**-0.5
    out = run_backend(batch, TritonPagedAttention(mixed_decode_kernel=mixed_decode_kernel), scale)
    assert rel_err(out, batch.reference(scale)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("mixed_decode_kernel", [True, False], ids=["decode-kernel", "prefill-kernel"])
def test_mixed_cuda_graph_replay_at_another_split_equals_eager(mixed_decode_kernel: bool) -> None:
    """Capture a mixed step with 3 decodes beside 2 chunks, replay it with 3 other sequences
    decoding (same token and sequence counts, new lengths, tables and slots): bit-identical to the
    eager launch of the second step, and both equal the reference."""
    shape = {
        "num_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "block_size": 16,
        "dtype": torch.bfloat16,
        "max_blocks": 160,
        "num_blocks": 1200,
    }
    first = PagedBatch([(1, 500), (1, 30), (60, 60), (1, 900), (30, 200)], seed=0, **shape)  # type: ignore[arg-type]
    second = PagedBatch([(40, 40), (1, 700), (1, 2), (50, 300), (1, 2500)], seed=1, **shape)  # type: ignore[arg-type]
    eager_cache = second.kv_cache.clone()
    backend = TritonPagedAttention(mixed_decode_kernel=mixed_decode_kernel)
    scale = 128**-0.5
    static = first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_backend(static, backend, scale)  # compile outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_backend(static, backend, scale)
    for name in ("q", "k", "v", "kv_cache"):
        getattr(static, name).copy_(getattr(second, name))
    for name in ("seq_lens", "block_tables", "slot_mapping", "query_start_loc"):
        getattr(static.meta, name).copy_(getattr(second.meta, name))
    graph.replay()
    eager = backend.forward(second.q, second.k, second.v, eager_cache, second.meta, scale)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert rel_err(out, second.reference(scale)) <= 1e-2


@pytest.mark.gpu
def test_bench_mixed_attention_reports_both_paths() -> None:
    from kvrelay.worker.bench.attention import bench_mixed_attention

    r = bench_mixed_attention(chunk=64, decodes=8, context=512, iters=5)
    assert r["mixed_ms"] > 0 and r["prefill_kernel_ms"] > 0 and r["decode_kv_gbps"] > 0
    assert r["speedup"] == pytest.approx(r["prefill_kernel_ms"] / r["mixed_ms"])
