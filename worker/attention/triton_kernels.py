# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""Triton kernels of the paged-attention backend, and the launchers that size their grids.

Three jobs, each one launch (decode adds a merge launch when it splits); the prefill kernel
lives in ``triton_prefill.py`` and shares the attention loop (``_attend_range``) here:

* ``write_kv``: stores this step's K and V at ``slot_mapping`` (slot < 0: padding, skipped).
* ``decode_attention``: flash-decoding over the paged cache. A program owns one
  (sequence, KV head, split) and all ``num_heads // num_kv_heads`` query heads of that KV
  head as one [GROUP_PAD, D] tile, so each K/V tile is read once per KV head and QK^T is a
  real ``tl.dot``. Split ``j`` covers tokens ``[j * L, (j + 1) * L)`` with ``L`` derived from
  the sequence length *inside* the kernel, so the grid depends only on (batch, heads,
  splits) and the launch can be captured in a CUDA graph. Each program writes a partial
  (normalized output, base-2 log-sum-exp) and a second kernel merges the splits; with one
  split the program writes the output itself.
* ``prefill_attention`` (``triton_prefill.py``): varlen flash attention over packed queries with the cached prefix
  read through the block table. Query rows are tiled as BLOCK_Q tokens x GROUP_PAD heads of
  one KV head; the flat tile index is mapped back to its sequence by a binary search over
  ``query_start_loc``, so the grid (``num_tokens // BLOCK_Q + num_seqs``) is static too.
* ``decode_rows_attention``: the decode kernel in varlen mode, for the q_len == 1 sequences of
  a step that also has prefill chunks (program per (sequence, KV head); any other sequence
  returns at once), while ``prefill_attention(skip_decode_rows=True)`` takes the rest. A
  decode row in the prefill kernel gets a whole BLOCK_M tile with GROUP of its rows live and
  walks its context serially: on an H200 that read 64 x 512-token decodes at ~1.15 TB/s
  where the decode kernel reaches ~3.1 TB/s.

All softmax math is float32 in base 2 (``qk_scale`` already holds ``scale * log2(e)``).
Cache addresses are computed in int64: ``block_id * stride`` overflows int32 on large caches.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    # Float32 inputs would otherwise run the tensor cores in TF32 (10-bit mantissa): 1e-3 error.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(kv_cache: torch.Tensor, head_dim: int) -> None:
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, kv_cache.shape
    assert kv_cache.stride(-1) == 1, kv_cache.stride()
    block_size = kv_cache.shape[2]
    assert block_size >= 8 and block_size & (block_size - 1) == 0, f"block_size {block_size}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} must be a power of two"


# --------------------------------------------------------------------------- shared


def _interpreting() -> bool:
    """Under TRITON_INTERPRET=1 two interpreter gaps need a detour (compiled code keeps the
    fast form): loaded scalars are 1-element arrays, which numpy 2 refuses as range() bounds,
    so loops become while loops (only scf.for gets software-pipelined on the GPU); and its
    tl.dot multiplies bfloat16's raw uint16 bits, so dot operands are upcast to float32."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _attend_tile(
    q,  # [M, D] in the cache dtype
    m_i,  # [M] float32 running max (base 2)
    l_i,  # [M] float32 running sum
    acc,  # [M, D] float32 running numerator
    q_pos,  # [M] absolute query positions (read only when CAUSAL)
    n0,
    kv_end,
    k_base,
    v_base,
    table,  # this sequence's block-table row
    qk_scale,
    stride_cb,
    stride_ct,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Online-softmax update with keys n0 .. n0 + BLOCK_N - 1 (those < kv_end)."""
    d = tl.arange(0, HEAD_DIM)
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < kv_end
    block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    off = block * stride_cb + (n % BLOCK_SIZE) * stride_ct  # [BLOCK_N]
    k = tl.load(k_base + off[:, None] + d[None, :], mask=n_mask[:, None], other=0.0)
    if INTERPRET:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, BLOCK_N]
    if CAUSAL:
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    else:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + off[:, None] + d[None, :], mask=n_mask[:, None], other=0.0)
    if INTERPRET:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_range(
    q,
    m_i,
    l_i,
    acc,
    q_pos,
    start,
    end,
    k_base,
    v_base,
    table,
    qk_scale,
    stride_cb,
    stride_ct,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Folds keys [start, end) into the running (max, sum, numerator) of q's rows."""
    if INTERPRET:
        q = q.to(tl.float32)
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, q_pos, n0, end, k_base, v_base, table, qk_scale, stride_cb,
                stride_ct, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, INTERPRET,
            )  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, q_pos, n0, end, k_base, v_base, table, qk_scale, stride_cb,
                stride_ct, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, INTERPRET,
            )  # fmt: skip
    return m_i, l_i, acc


# --------------------------------------------------------------------------- KV write


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ckv,
    stride_cb,
    stride_ct,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HD: tl.constexpr,  # next power of two >= NUM_KV_HEADS * HEAD_DIM
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HD)
    head = i // HEAD_DIM
    d = i % HEAD_DIM
    # A negative slot is a padding row: the whole program stores nothing.
    mask = (i < NUM_KV_HEADS * HEAD_DIM) & (slot >= 0)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + head * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + d, mask=mask)
    tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + stride_ckv + dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (any token/head strides); token t goes to flat slot ``slot_mapping[t]``."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and kv_cache.shape[3:] == (num_kv_heads, head_dim), (k.shape, kv_cache.shape)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, (k.stride(), v.stride())
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim),
        num_warps=4,
    )


# --------------------------------------------------------------------------- decode


# The block-table width varies between eager steps (and is 1 or a multiple of 16 now and then):
# specialized, each would compile a variant mid-serving (see _prefill_kernel).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_partial_kernel(
    q_ptr,  # [B, H, D]; VARLEN: [T, H, D], sequence b's query at token row query_start_loc[b]
    cache_ptr,  # [2, num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # VARLEN: [B + 1] int32; otherwise unread
    part_out_ptr,  # [B, H, NUM_SPLITS, D] float32
    part_lse_ptr,  # [B, H, NUM_SPLITS] float32
    out_ptr,  # [B, H, D] (VARLEN: [T, H, D]): written here directly when NUM_SPLITS == 1
    qk_scale,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    VARLEN: tl.constexpr,  # packed [T, H, D] rows of a mixed step; only q_len == 1 sequences
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    if VARLEN:
        row = tl.load(query_start_loc_ptr + seq)  # the sequence's first (only) query row
        q_len = tl.load(query_start_loc_ptr + seq + 1) - row
    else:
        row = seq
        q_len = 1
    # Prompt chunks are the prefill kernel's; q_len 0 is a prefill graph's spare sequence row.
    # (A top-level early return, as in _prefill_kernel; without VARLEN the test folds away.)
    if q_len != 1:
        return
    row = row.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits are whole BLOCK_N tiles; trailing splits of a short sequence get nothing.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * stride_qt + head[:, None] * stride_qh + d[None, :], mask=g_mask[:, None])
    q = q.to(cache_ptr.dtype.element_ty)  # [GROUP_PAD, D]
    k_base = cache_ptr + kv_head * stride_ch
    v_base = k_base + stride_ckv
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    m_i, l_i, acc = _attend_range(
        q, m_i, l_i, acc, q, start, end, k_base, v_base, table, qk_scale, stride_cb, stride_ct,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, INTERPRET,
    )  # fmt: skip

    # An empty split (or a seq_len 0 padding row) leaves l_i == 0: output 0, weight 2^-inf.
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    if NUM_SPLITS == 1:  # nothing to merge: skip the reduce launch
        o_ptrs = out_ptr + row * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (seq * num_heads + head) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,  # [B, H, NUM_SPLITS, D] float32
    part_lse_ptr,  # [B, H, NUM_SPLITS] float32
    out_ptr,  # [B, H, D]
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row)  # [NUM_SPLITS]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight is 2^-inf = 0
    w = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :])  # [NUM_SPLITS, D]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# Tuned on an H200 (bf16, D=128, 8 KV heads): 2 warps and 3 cp.async stages of 16 KiB K/V
# tiles beat 4 warps / 2 stages by 2-10% at batch 8-256; float32 tiles are twice the size,
# so they keep 2 stages to fit shared memory.
DECODE_NUM_WARPS = 2


def _decode_num_stages(dtype: torch.dtype) -> int:
    return 3 if dtype.itemsize <= 2 else 2


def decode_block_n(block_size: int, head_dim: int) -> int:
    """Tokens per decode loop step: several cache blocks, and the same bytes per tile across
    head dims (64 tokens of D=128 or 128 of D=64: 16 KiB of K in bf16)."""
    return max(block_size, 8192 // head_dim)


def decode_scratch_numel(num_seqs: int, num_heads: int, num_splits: int, head_dim: int) -> int:
    """Float32 elements of the split partials: outputs [B, H, S, D] then log-sum-exps [B, H, S]."""
    return num_seqs * num_heads * num_splits * (head_dim + 1)


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    num_splits: int,
    scratch: torch.Tensor,  # flat float32, >= decode_scratch_numel(...) elements
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """One query token per sequence. The launch reads no tensor contents on the host and
    allocates nothing data-dependent, so it is safe inside CUDA-graph capture."""
    num_seqs, num_heads, head_dim = q.shape
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, f"num_splits {num_splits}"
    assert seq_lens.shape == (num_seqs,) and block_tables.shape[0] == num_seqs
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    rows = num_seqs * num_heads * num_splits
    # One split writes the output directly and needs no scratch.
    assert num_splits == 1 or scratch.numel() >= rows * (head_dim + 1), (scratch.shape, rows)
    assert scratch.dtype == torch.float32, scratch.dtype
    part_out = scratch[: rows * head_dim]
    part_lse = scratch[rows * head_dim : rows * (head_dim + 1)]
    _launch_decode(
        q, kv_cache, block_tables, seq_lens, None, part_out, part_lse, out, scale, num_splits,
        block_n=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits == 1:
        return out
    _decode_reduce_kernel[(num_seqs, num_heads)](
        part_out,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        num_warps=4 if head_dim * num_splits >= 4096 else 2,
    )
    return out


def decode_rows_attention(
    q: torch.Tensor,  # [T, H, D]: a mixed step's packed query rows
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    scale: float,
    out: torch.Tensor,  # [T, H, D]: only the rows of q_len == 1 sequences are written
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The decode kernel over the q_len == 1 sequences of a varlen step; every other sequence's
    program returns at once. Grid (S, Hkv, 1) from shapes only, so a prefill graph captured at
    one decode/prefill split replays correctly at any other.

    One split, no scratch and no reduce launch: the prefill kernel beside it does not split
    either, and the decode-only path already picks one split from 64 sequences on an H200
    (``num_decode_splits``); a step with only a few decodes has little decode KV to read."""
    num_seqs = seq_lens.shape[0]
    assert q.shape == out.shape, (q.shape, out.shape)
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    # The partial pointers are never read with one split: out stands in for them.
    _launch_decode(
        q, kv_cache, block_tables, seq_lens, query_start_loc, out, out, out, scale, 1,
        block_n=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def _launch_decode(
    q: torch.Tensor,  # [B, H, D], or [T, H, D] with query_start_loc
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,  # [B] int32: the grid's first axis
    query_start_loc: torch.Tensor | None,  # [B + 1] int32: varlen mode
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    num_splits: int,
    *,
    block_n: int | None,
    num_warps: int | None,
    num_stages: int | None,
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    _check_cache(kv_cache, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(-1) == 1 and block_tables.stride(-1) == 1, (q.stride(), block_tables.stride())
    group = num_heads // num_kv_heads
    block_n = block_n or decode_block_n(block_size, head_dim)
    assert block_n % block_size == 0, (block_n, block_size)
    _decode_partial_kernel[(seq_lens.shape[0], num_kv_heads, num_splits)](
        q,
        kv_cache,
        block_tables,
        seq_lens,
        seq_lens if query_start_loc is None else query_start_loc,  # unread without VARLEN
        part_out,
        part_lse,
        out,
        scale * _LOG2E,
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
        # tl.dot needs M >= 16: pad the head group with masked rows.
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        VARLEN=query_start_loc is not None,
        DOT_PRECISION=_dot_precision(kv_cache.dtype),
        INTERPRET=_interpreting(),
        num_warps=num_warps or DECODE_NUM_WARPS,
        num_stages=num_stages or _decode_num_stages(kv_cache.dtype),
    )


def num_decode_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int, max_splits: int
) -> int:
    """Splits per sequence from static shapes only (never the live context lengths), so a
    CUDA graph captured at a batch size keeps a valid grid. The largest power of two that
    keeps (sequence, KV head, split) programs within ~4 per SM (on an H200, batch 64 x 8 KV
    heads ran fastest unsplit, batch 8 with 8 splits), and no more splits than the longest
    possible context has BLOCK_N tiles."""
    programs = max(1, num_seqs * num_kv_heads)
    splits = 1
    while programs * splits * 2 <= 4 * num_sms:
        splits *= 2
    tiles = max(1, math.ceil(max_context / block_n))
    return max(1, min(splits, 1 << (tiles.bit_length() - 1), max_splits))
