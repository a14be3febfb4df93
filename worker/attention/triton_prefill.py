# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""The varlen prefill kernel: causal flash attention over packed query rows, the cached prefix
read through the block table (the kernel contract is in ``triton_kernels.py``'s docstring)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import _LOG2E, _attend_range, _check_cache, _dot_precision, _interpreting


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    # The largest s with query_start_loc[s] // BLOCK_Q + s <= tile. That key is strictly
    # increasing in s and leaves each sequence >= cdiv(query_len, BLOCK_Q) tile slots.
    # Annotated: loop-carried values must be int32 tensors even when num_seqs arrives as
    # the constexpr 1 (Triton specializes integer arguments equal to 1).
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The batch's sequence count and block-table width vary step to step: specialized (Triton keys
# integers on == 1 and % 16), each new combination would compile a variant in the middle of
# serving, seconds of stall the first time a step batches several prompts.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [T, H, D]
    qk_scale,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ckv,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SKIP_DECODE: tl.constexpr,  # q_len == 1 sequences are decode_rows_attention's: skip them
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    t0 = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    skip = t0 >= q_len  # a spare tile slot of this sequence
    if SKIP_DECODE:
        skip = skip | (q_len == 1)
    if skip:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # absolute position of query row 0

    r = tl.arange(0, BLOCK_M)
    t = t0 + r // GROUP_PAD  # query row within the sequence
    g = r % GROUP_PAD
    row_mask = (t < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    token = (q_start + t).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_mask[:, None]
    )
    q = q.to(cache_ptr.dtype.element_ty)  # [BLOCK_M, D]
    q_pos = prefix + t  # [BLOCK_M]; rows past q_len have q_pos >= seq_len and are never stored
    kv_end = tl.minimum(seq_len, prefix + t0 + BLOCK_Q)  # one past the tile's last visible key
    k_base = cache_ptr + kv_head * stride_ch
    v_base = k_base + stride_ckv
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the tile's first query position are visible to every row: no causal mask
    # there. The masked part starts at or before that position, which every row sees, so no
    # row's running max is still -inf after its first tile.
    # Clamped at 0 for the prefill graphs' padding sequence (context 0, so prefix < 0): its rows
    # then attend over no key and store zeros, reading no block-table entry or KV.
    full_end = tl.maximum((prefix + t0 + 1) // BLOCK_N * BLOCK_N, 0)
    m_i, l_i, acc = _attend_range(
        q, m_i, l_i, acc, q_pos, 0, full_end, k_base, v_base, table, qk_scale, stride_cb,
        stride_ct, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, INTERPRET,
    )  # fmt: skip
    m_i, l_i, acc = _attend_range(
        q, m_i, l_i, acc, q_pos, full_end, kv_end, k_base, v_base, table, qk_scale, stride_cb,
        stride_ct, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, INTERPRET,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    skip_decode_rows: bool = False,
) -> torch.Tensor:
    """Causal varlen attention: query row i of sequence s sits at position
    ``seq_lens[s] - query_len[s] + i``. The grid needs only T and num_seqs. With
    ``skip_decode_rows`` the rows of q_len == 1 sequences are left for ``decode_rows_attention``.

    Tile defaults, from an H200 sweep at 4 x 4096-token bf16 prompts (~300 TFLOP/s, about
    half of dense FlashAttention-2 there): 128 query rows x 64 keys with 3 stages; float32
    uses 64 rows and 2 stages to fit shared memory."""
    half = kv_cache.dtype.itemsize <= 2
    block_m = block_m or (128 if half else 64)
    block_n = block_n or 64
    num_stages = num_stages or (3 if half else 2)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    _check_cache(kv_cache, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(-1) == 1 and block_tables.stride(-1) == 1, (q.stride(), block_tables.stride())
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, block_m // group_pad)
    block_n = max(block_n, block_size)
    assert block_n % block_size == 0, (block_n, block_size)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * _LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_q * group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        SKIP_DECODE=skip_decode_rows,
        DOT_PRECISION=_dot_precision(kv_cache.dtype),
        INTERPRET=_interpreting(),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
