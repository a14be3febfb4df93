"""The attention backend interface the model calls once per layer."""

from __future__ import annotations

from typing import Protocol

import torch

from .metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache, then attends over each sequence's context.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] of this layer.
    Returns [num_tokens, num_heads, head_dim] in q's dtype. Grouped-query attention:
    query head h reads KV head h // (num_heads // num_kv_heads).
    """

    @property
    def prefill_graph_safe(self) -> bool:
        """True when a step with prefill chunks can be captured in a CUDA graph: every size the
        backend uses comes from tensor shapes and every length is read on the device, never from
        the metadata's host lists (worker/prefill_graph.py)."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...
