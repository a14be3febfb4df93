"""Paged-attention test inputs for the Triton backend: one step's packed queries over a NaN-filled
paged cache, with every sequence's whole context kept dense for a float64 reference.

Importing this module selects Triton's interpreter on a CPU-only machine (the kernels read
TRITON_INTERPRET when they are decorated), so test modules import it before the kernels."""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kvrelay.worker.attention.metadata import AttentionMetadata
from kvrelay.worker.attention.triton_backend import TritonPagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class PagedBatch:
    """One step's inputs over a NaN-filled paged cache (a read of any slot the step may not
    read shows up as NaN), plus every sequence's whole context K/V, kept dense for the
    reference. ``seqs`` holds (query_len, seq_len); seq_len 0 is a decode padding row."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        seed: int = 0,
        max_blocks: int | None = None,
        num_blocks: int | None = None,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        data_gen = torch.Generator(DEVICE).manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            # The offset keeps values away from zero, so a slot left unwritten cannot look right.
            return (torch.randn(*shape, generator=data_gen, device=DEVICE) + 0.3).to(dtype)

        self.seqs = seqs
        nblocks = [-(-seq_len // block_size) for _, seq_len in seqs]
        num_blocks = num_blocks or sum(nblocks) + 3  # spare blocks stay unwritten
        max_blocks = max_blocks or max(max(nblocks), 1)
        ids = torch.randperm(num_blocks, generator=gen)  # shuffled, non-contiguous block ids
        self.block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        self.kv_cache = torch.full(
            (2, num_blocks, block_size, num_kv_heads, head_dim), math.nan, dtype=dtype, device=DEVICE
        )
        self.ctx_k = [randn(seq_len, num_kv_heads, head_dim) for _, seq_len in seqs]
        self.ctx_v = [randn(seq_len, num_kv_heads, head_dim) for _, seq_len in seqs]
        self.q = randn(sum(q for q, _ in seqs), num_heads, head_dim)
        k_new, v_new, slots, used = [], [], [], 0
        for s, (query_len, seq_len) in enumerate(seqs):
            table = ids[used : used + nblocks[s]]
            used += nblocks[s]
            self.block_tables[s, : nblocks[s]] = table
            pos = torch.arange(seq_len)
            seq_slots = (table[pos // block_size] * block_size + pos % block_size).to(DEVICE)
            prefix = seq_len - query_len
            flat = self.kv_cache.view(2, -1, num_kv_heads, head_dim)
            flat[0, seq_slots[:prefix]] = self.ctx_k[s][:prefix]
            flat[1, seq_slots[:prefix]] = self.ctx_v[s][:prefix]
            if seq_len == 0:  # padding: its token must not be written anywhere
                k_new.append(randn(query_len, num_kv_heads, head_dim))
                v_new.append(randn(query_len, num_kv_heads, head_dim))
                slots.append(torch.full((query_len,), -1, dtype=torch.int64, device=DEVICE))
            else:
                k_new.append(self.ctx_k[s][prefix:])
                v_new.append(self.ctx_v[s][prefix:])
                slots.append(seq_slots[prefix:])
        self.k, self.v = torch.cat(k_new), torch.cat(v_new)
        query_lens = [q for q, _ in seqs]
        seq_lens = [n for _, n in seqs]
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        self.meta = AttentionMetadata(
            num_seqs=len(seqs),
            num_tokens=qsl[-1],
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            block_tables=self.block_tables.to(DEVICE),
            slot_mapping=torch.cat(slots),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )

    def reference(self, scale: float) -> torch.Tensor:
        """[T, H, D] float64: row i of a sequence is position seq_len - query_len + i."""
        out = torch.zeros(self.q.shape, dtype=torch.float64, device=DEVICE)
        group = self.q.shape[1] // self.ctx_k[0].shape[1] if self.ctx_k else 1
        start = 0
        for s, (query_len, seq_len) in enumerate(self.seqs):
            rows = slice(start, start + query_len)
            start += query_len
            if seq_len == 0:
                continue
            q = self.q[rows].double()  # [L, H, D]
            k = self.ctx_k[s].double().repeat_interleave(group, dim=1)  # [S, H, D]
            v = self.ctx_v[s].double().repeat_interleave(group, dim=1)
            scores = torch.einsum("lhd,shd->hls", q, k) * scale
            pos = torch.arange(query_len, device=DEVICE)[:, None] + (seq_len - query_len)
            visible = torch.arange(seq_len, device=DEVICE)[None, :] <= pos  # [L, S]
            probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
            out[rows] = torch.einsum("hls,shd->lhd", probs, v)
        return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def run_backend(batch: PagedBatch, backend: TritonPagedAttention, scale: float) -> torch.Tensor:
    return backend.forward(batch.q, batch.k, batch.v, batch.kv_cache, batch.meta, scale)
