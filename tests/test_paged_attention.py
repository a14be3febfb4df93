"""TorchPagedAttention against a float64 dense causal attention computed per sequence
from contiguous K/V with an explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import assign_blocks, make_metadata

from kvrelay.worker.attention.metadata import AttentionMetadata
from kvrelay.worker.attention.torch_backend import TorchPagedAttention

NUM_HEADS = 8
# (cached_len, query_len): fresh prefills, a decode, chunks on top of cached prefixes, a
# decode crossing into a new block, a one-token prompt.
MIXED = [(0, 37), (20, 1), (33, 15), (64, 1), (5, 30), (0, 1)]
# Every sequence adds one token: the batched decode path. Lengths 1, block edges, long.
DECODE = [(0, 1), (15, 1), (16, 1), (31, 1), (47, 1), (100, 1)]


def dense_reference(
    q: torch.Tensor,  # [L, H, D]
    k: torch.Tensor,  # [S, Hkv, D]: the sequence's whole context
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """[L, H, D] float64; query i is position S - L + i and sees keys 0 ..= that position."""
    q, k, v = q.double(), k.double(), v.double()
    L, H, _ = q.shape
    S, Hkv, _ = k.shape
    out = torch.empty_like(q)
    for h in range(H):
        kv_head = h // (H // Hkv)
        scores = (q[:, h] @ k[:, kv_head].T) * scale  # [L, S]
        visible = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + (S - L)
        scores = scores.masked_fill(~visible, -math.inf)
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        out[:, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ v[:, kv_head]
    return out


class Batch:
    """A step's inputs plus each sequence's full context K/V, the cached part already in
    the cache, which is filled with NaN everywhere else to expose reads of unwritten slots."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            # Offset keeps values away from zero, so a slot left unwritten cannot look right.
            return (torch.randn(*shape, generator=gen) + 0.5).to(dtype)

        self.seqs, self.block_size = seqs, block_size
        seq_lens = [c + n for c, n in seqs]
        self.tables = assign_blocks(seq_lens, block_size, shuffle_seed=seed)
        num_blocks = sum(len(t) for t in self.tables) + 3  # spare blocks stay unwritten
        self.cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), math.nan, dtype=dtype)
        self.k_full = [randn(n, num_kv_heads, head_dim) for n in seq_lens]
        self.v_full = [randn(n, num_kv_heads, head_dim) for n in seq_lens]
        self.q = randn(sum(n for _, n in seqs), NUM_HEADS, head_dim)
        for s, (cached, _) in enumerate(seqs):
            for p in range(cached):
                block, offset = self.slot(s, p)
                self.cache[0, block, offset] = self.k_full[s][p]
                self.cache[1, block, offset] = self.v_full[s][p]
        self.k = torch.cat([k[c : c + n] for k, (c, n) in zip(self.k_full, seqs, strict=True)])
        self.v = torch.cat([v[c : c + n] for v, (c, n) in zip(self.v_full, seqs, strict=True)])
        self.meta: AttentionMetadata = make_metadata(seqs, block_size, self.tables)

    def slot(self, s: int, position: int) -> tuple[int, int]:
        return self.tables[s][position // self.block_size], position % self.block_size

    def reference(self, scale: float) -> torch.Tensor:
        outs, start = [], 0
        for s, (_, n) in enumerate(self.seqs):
            outs.append(dense_reference(self.q[start : start + n], self.k_full[s], self.v_full[s], scale))
            start += n
        return torch.cat(outs)


CONFIGS = [
    pytest.param(bs, ratio, d, id=f"bs{bs}-gqa{ratio}-d{d}")
    for bs in (16, 32)
    for ratio in (1, 4, 8)
    for d in (64, 128)
]


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize(("block_size", "gqa_ratio", "head_dim"), CONFIGS)
def test_matches_dense_reference(
    seqs: list[tuple[int, int]], block_size: int, gqa_ratio: int, head_dim: int
) -> None:
    batch = Batch(seqs, block_size, NUM_HEADS // gqa_ratio, head_dim)
    scale = head_dim**-0.5
    assert batch.meta.is_decode_only == (seqs is DECODE)
    out = TorchPagedAttention().forward(batch.q, batch.k, batch.v, batch.cache, batch.meta, scale)
    assert out.shape == batch.q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), batch.reference(scale), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_cache_holds_exactly_the_written_kv(seqs: list[tuple[int, int]]) -> None:
    batch = Batch(seqs, block_size=16, num_kv_heads=2, head_dim=64, seed=3)
    TorchPagedAttention().forward(batch.q, batch.k, batch.v, batch.cache, batch.meta, 0.125)
    written = torch.zeros(batch.cache.shape[1:3], dtype=torch.bool)  # [num_blocks, block_size]
    for s, (cached, n) in enumerate(seqs):
        for p in range(cached + n):
            block, offset = batch.slot(s, p)
            assert torch.equal(batch.cache[0, block, offset], batch.k_full[s][p]), (s, p)
            assert torch.equal(batch.cache[1, block, offset], batch.v_full[s][p]), (s, p)
            written[block, offset] = True
    # Nothing outside the sequences' slots was touched.
    assert batch.cache[:, ~written].isnan().all()


def test_slot_mapping_follows_the_block_table() -> None:
    meta = make_metadata([(3, 2), (0, 1)], block_size=4, block_tables=[[7, 2], [5]])
    assert meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 5 * 4 + 0]
    assert meta.query_start_loc.tolist() == [0, 2, 3]
    assert meta.block_tables.tolist() == [[7, 2], [5, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_half_precision_keeps_dtype_and_accuracy(dtype: torch.dtype, seqs: list[tuple[int, int]]) -> None:
    batch = Batch(seqs, block_size=16, num_kv_heads=2, head_dim=64, dtype=dtype, seed=4)
    out = TorchPagedAttention().forward(batch.q, batch.k, batch.v, batch.cache, batch.meta, 0.125)
    assert out.dtype == dtype
    # Inputs are exactly representable; the only error left is rounding the output once.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), batch.reference(0.125), atol=4 * eps, rtol=2 * eps)


def test_gqa_query_head_reads_its_kv_group() -> None:
    # One query per head, one key/value token per KV head, values = KV head index: with a
    # single visible token the output is that token's value, so head h must read h // 4.
    meta = make_metadata([(0, 1)], block_size=16, block_tables=[[0]])
    cache = torch.zeros(2, 1, 16, 2, 4)
    q = torch.randn(1, 8, 4)
    k = torch.randn(1, 2, 4)
    v = torch.arange(2, dtype=torch.float32)[None, :, None].expand(1, 2, 4).contiguous()
    out = TorchPagedAttention().forward(q, k, v, cache, meta, 0.5)
    assert out[0, :, 0].tolist() == [0.0] * 4 + [1.0] * 4
