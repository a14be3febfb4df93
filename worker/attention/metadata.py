"""The per-step attention inputs: the contract between the model runner and every backend.

Tokens of one step are packed: sequence ``s`` owns query rows
``query_start_loc[s] : query_start_loc[s + 1]``, and those rows are the *last*
``query_len[s]`` positions of its context, so query row ``i`` of ``s`` sits at absolute
position ``seq_lens[s] - query_len[s] + i`` and attends to positions ``0 ..`` that one.
Positions before ``seq_lens[s] - query_len[s]`` are already in the paged KV cache
(earlier steps, or blocks shared through prefix caching); the backend writes this step's
K/V through ``slot_mapping`` before it reads.

A paged KV cache of one layer is one tensor ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (K at index 0, V at 1). Block ``b`` of sequence ``s`` is
``block_tables[s, b]``; token ``t`` of ``s`` lives at slot
``block_tables[s, t // block_size] * block_size + t % block_size``.

Every tensor may be a view into a static buffer that the model runner (and, on the GPU,
a captured CUDA graph) reuses across steps, so a backend must not keep references
to it past ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_tokens: int
    # [num_seqs + 1] int32 on the device: prefix sums of query lengths, query_start_loc[0] == 0.
    query_start_loc: torch.Tensor
    # [num_seqs] int32 on the device: context length of each sequence after this step (cached + new).
    seq_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32 on the device; entries past a sequence's last block are 0.
    block_tables: torch.Tensor
    # [num_tokens] int64 on the device: the flat KV slot each new token's K/V is written to.
    slot_mapping: torch.Tensor
    # Host copies, for eager paths that loop over sequences (never read inside a CUDA graph).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def is_decode_only(self) -> bool:
        """Every sequence adds exactly one token: the shape CUDA graphs capture."""
        return self.max_query_len == 1
