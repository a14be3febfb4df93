"""Paged attention in plain PyTorch: the CPU engine's backend and the GPU kernels' reference.

Correctness first, then speed: each step's K/V goes into the cache with one indexed copy;
a batch with any prefill runs one ``scaled_dot_product_attention`` per sequence over its
gathered context, while a decode-only batch runs a single padded, masked call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata

_HALF = (torch.float16, torch.bfloat16)


class TorchPagedAttention:
    """Implements ``AttentionBackend`` on any device. Holds no state between calls."""

    @property
    def prefill_graph_safe(self) -> bool:
        return False  # loops over the host lists query_lens_cpu / seq_lens_cpu

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        assert q.shape[0] == k.shape[0] == meta.slot_mapping.shape[0], (q.shape, k.shape, meta.num_tokens)
        assert k.shape[1:] == (num_kv_heads, head_dim), (k.shape, kv_cache.shape)
        assert q.shape[1] % num_kv_heads == 0, (q.shape, num_kv_heads)
        write_kv(k, v, kv_cache, meta.slot_mapping)
        # CPU half-precision matmuls round every partial sum; float32 keeps the reference exact.
        compute_dtype = torch.float32 if q.device.type == "cpu" and q.dtype in _HALF else q.dtype
        if meta.is_decode_only:
            out = _decode_attention(q.to(compute_dtype), kv_cache, meta, scale)
        else:
            out = _varlen_attention(q.to(compute_dtype), kv_cache, meta, scale)
        return out.to(q.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores token t's k/v at flat slot ``slot_mapping[t]`` of the layer's cache."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    k_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
    v_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    k_slots.index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    v_slots.index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _gather_context(
    cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]: K or V of one layer
    block_ids: torch.Tensor,  # [..., n] int32 block ids
    dtype: torch.dtype,
) -> torch.Tensor:
    """-> [..., Hkv, n * block_size, D]: the blocks' slots in sequence order, heads first."""
    blocks = cache[block_ids.long()]  # [..., n, block_size, Hkv, D]
    ctx = blocks.flatten(-4, -3)  # [..., n * block_size, Hkv, D]
    return ctx.transpose(-3, -2).to(dtype)


def _varlen_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    block_size = kv_cache.shape[2]
    out = torch.empty_like(q)  # [T, H, D]
    start = 0
    for s in range(meta.num_seqs):
        query_len, seq_len = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
        assert 1 <= query_len <= seq_len, (s, query_len, seq_len)
        num_blocks = -(-seq_len // block_size)
        block_ids = meta.block_tables[s, :num_blocks]
        k = _gather_context(kv_cache[0], block_ids, q.dtype)[:, :seq_len]  # [Hkv, S, D]
        v = _gather_context(kv_cache[1], block_ids, q.dtype)[:, :seq_len]
        q_s = q[start : start + query_len].transpose(0, 1)  # [H, L, D]
        # Query row i is position seq_len - query_len + i and sees keys 0 .. that position.
        # SDPA's is_causal aligns top-left, which is only right when L == S.
        mask = None
        if 1 < query_len < seq_len:
            rows = torch.arange(query_len, device=q.device)[:, None] + (seq_len - query_len)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= rows  # [L, S]
        o = F.scaled_dot_product_attention(
            q_s.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=mask,
            is_causal=query_len == seq_len and query_len > 1,
            scale=scale,
            enable_gqa=True,
        )  # [1, H, L, D]
        out[start : start + query_len] = o[0].transpose(0, 1)
        start += query_len
    assert start == q.shape[0], (start, q.shape)
    return out


def _decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    # One query per sequence: pad every context to the longest and mask the tail, so the
    # whole batch is one SDPA call. The padding reads slots never written for this sequence
    # (the tail of its last block, block 0 behind padding entries of the block table):
    # they are zeroed, not just masked, since garbage NaN/inf would survive a -inf mask.
    block_size = kv_cache.shape[2]
    num_seqs = q.shape[0]
    assert num_seqs == meta.num_seqs, (q.shape, meta.num_seqs)
    num_blocks = -(-meta.max_seq_len // block_size)
    block_ids = meta.block_tables[:, :num_blocks]  # [B, n]
    k = _gather_context(kv_cache[0], block_ids, q.dtype)  # [B, Hkv, n * block_size, D]
    v = _gather_context(kv_cache[1], block_ids, q.dtype)
    key_pos = torch.arange(k.shape[2], device=q.device)
    mask = key_pos[None, :] < meta.seq_lens[:, None]  # [B, S]
    k = k.masked_fill(~mask[:, None, :, None], 0.0)
    v = v.masked_fill(~mask[:, None, :, None], 0.0)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k,
        v,
        attn_mask=mask[:, None, None, :],  # [B, 1, 1, S]
        scale=scale,
        enable_gqa=True,
    )  # [B, H, 1, D]
    return o.squeeze(2)
