"""The GPU attention backend: Triton kernels for the KV write, split-K decode and varlen prefill.

Decode-only steps (the shape CUDA graphs capture) pick their split count from static
shapes alone and use a scratch buffer the backend owns, so the decode path allocates
nothing data-dependent and never syncs with the host. Steps with prefill chunks run the
varlen Triton kernel for the chunks and, by default, the decode kernel in varlen mode for the
sequences that add one token (``mixed_decode_kernel``): two launches with grids from shapes
only, so the prefill CUDA graphs capture them and replay at any decode/prefill split. Or
per-sequence ``scaled_dot_product_attention`` as a cross-check (``prefill_impl="sdpa"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_kernels as tk
from . import triton_prefill as tp
from .metadata import AttentionMetadata

_PREFILL_IMPLS = ("triton", "sdpa")
# The interpreter has no SMs; any count works, and a small one keeps CPU grids small.
_CPU_NUM_SMS = 4


class TritonPagedAttention:
    """Implements ``AttentionBackend``; holds only the decode scratch buffer between calls."""

    def __init__(
        self, prefill_impl: str = "triton", max_splits: int = 32, mixed_decode_kernel: bool = True
    ) -> None:
        if prefill_impl not in _PREFILL_IMPLS:
            raise ValueError(f"prefill_impl must be one of {_PREFILL_IMPLS}, got {prefill_impl!r}")
        if max_splits < 1 or max_splits & (max_splits - 1):
            raise ValueError(f"max_splits must be a power of two >= 1, got {max_splits}")
        self.prefill_impl = prefill_impl
        self.max_splits = max_splits
        # Steps with prefill chunks: q_len == 1 sequences through the decode kernel (True), or
        # every sequence through the prefill kernel (False: the single-launch path, kept as the
        # benchmark's and the tests' comparison). Read at launch: graphs keep what they captured.
        self.mixed_decode_kernel = mixed_decode_kernel
        # Flat float32 split partials per device, shared by every layer: the layers run one
        # after another on one stream, so a layer's reduce is done before the next writes.
        self._scratch: dict[torch.device, torch.Tensor] = {}
        # Outgrown buffers stay alive: a CUDA graph captured earlier still reads them.
        self._retired: list[torch.Tensor] = []
        self._num_sms: dict[torch.device, int] = {}

    @property
    def prefill_graph_safe(self) -> bool:
        # The varlen kernel's grid is (num_tokens // BLOCK_Q + num_seqs, Hkv) and it reads every
        # length on the device; the SDPA cross-check loops over host lists.
        return self.prefill_impl == "triton"

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert q.shape[0] == k.shape[0] == meta.slot_mapping.shape[0], (q.shape, k.shape, meta.num_tokens)
        assert q.shape[1] % kv_cache.shape[3] == 0, (q.shape, kv_cache.shape)
        tk.write_kv(k, v, kv_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return self.decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale)
        if self.prefill_impl == "sdpa":
            return sdpa_prefill(q, kv_cache, meta, scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # The two launches write disjoint rows of out; together every row of [0, num_tokens).
        if self.mixed_decode_kernel:
            tk.decode_rows_attention(
                q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale, out
            )
        return tp.prefill_attention(
            q,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            scale,
            out,
            skip_decode_rows=self.mixed_decode_kernel,
        )

    def decode(
        self,
        q: torch.Tensor,  # [B, H, D]
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        seq_lens: torch.Tensor,  # [B] int32; 0 marks a padding row (output zeros)
        scale: float,
    ) -> torch.Tensor:
        """Graph-safe: every size here comes from tensor shapes, never tensor contents."""
        num_seqs, num_heads, head_dim = q.shape
        block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
        num_splits = self.num_splits(
            q.device, num_seqs, num_kv_heads, block_tables.shape[1], block_size, head_dim
        )
        scratch = self._decode_scratch(
            q.device, tk.decode_scratch_numel(num_seqs, num_heads, num_splits, head_dim)
        )
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return tk.decode_attention(q, kv_cache, block_tables, seq_lens, scale, num_splits, scratch, out)

    def num_splits(
        self,
        device: torch.device,
        num_seqs: int,
        num_kv_heads: int,
        max_blocks_per_seq: int,
        block_size: int,
        head_dim: int,
    ) -> int:
        return tk.num_decode_splits(
            num_seqs,
            num_kv_heads,
            max_context=max_blocks_per_seq * block_size,
            block_n=tk.decode_block_n(block_size, head_dim),
            num_sms=self._sm_count(device),
            max_splits=self.max_splits,
        )

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":
            return _CPU_NUM_SMS
        if device not in self._num_sms:
            self._num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._num_sms[device]

    def _decode_scratch(self, device: torch.device, numel: int) -> torch.Tensor:
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self._retired.append(buf)
            # Round up so a growing batch re-allocates a handful of times, not at every size.
            size = 1 << max(20, (numel - 1).bit_length())
            buf = torch.empty(size, dtype=torch.float32, device=device)
            self._scratch[device] = buf
        return buf


def sdpa_prefill(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Reference prefill: gathers each sequence's context and runs one SDPA per sequence.

    q: [T, H, D]; returns [T, H, D] in q's dtype. Uses the host copies of the lengths.
    """
    block_size = kv_cache.shape[2]
    # CPU half-precision matmuls round every partial sum; float32 keeps the fallback exact.
    compute = torch.float32 if q.device.type == "cpu" and q.dtype != torch.float64 else q.dtype
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    start = 0
    for s in range(meta.num_seqs):
        query_len, seq_len = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
        assert 1 <= query_len <= seq_len, (s, query_len, seq_len)
        blocks = meta.block_tables[s, : -(-seq_len // block_size)].long()
        # [2, n, block_size, Hkv, D] -> [2, Hkv, seq_len, D]
        kv = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len].transpose(1, 2).to(compute)
        q_s = q[start : start + query_len].transpose(0, 1).to(compute)  # [H, L, D]
        # Row i is position seq_len - query_len + i: a causal mask offset by the cached prefix.
        rows = torch.arange(query_len, device=q.device)[:, None] + (seq_len - query_len)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= rows  # [L, S]
        o = F.scaled_dot_product_attention(
            q_s[None], kv[0][None], kv[1][None], attn_mask=mask, scale=scale, enable_gqa=True
        )  # [1, H, L, D]
        out[start : start + query_len] = o[0].transpose(0, 1).to(q.dtype)
        start += query_len
    assert start == q.shape[0], (start, q.shape)
    return out
