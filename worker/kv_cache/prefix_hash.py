"""Chained prefix hashes of full KV blocks: one definition for the engine's block allocator and the
router's prefix-aware balancer (`cluster/routing.py`), which hash the same prompts in different
processes and must agree bit for bit. Plain Python, no torch."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

# The parent of a prompt's first block. Fixed forever: the router hashes prompts in another process,
# so changing it silently disables prefix-aware routing against older workers.
_ROOT_HASH = hashlib.sha256(b"kvrelay.prefix-cache.root.v1").digest()  # 32 bytes
_HASH_BYTES = 16


@lru_cache(maxsize=64)
def _uint32_le(num_tokens: int) -> struct.Struct:
    # One compiled Struct per block length (in practice: one per block size).
    return struct.Struct(f"<{num_tokens}I")


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one FULL block.

    sha256(parent digest, or the fixed 32-byte root for the first block, + token ids as little-endian
    uint32), truncated to 16 bytes. Deterministic across processes and machines (no Python `hash()`),
    so the router can compute the same value for prefix-aware routing.
    """
    try:
        packed = _uint32_le(len(token_ids)).pack(*token_ids)
    except struct.error as exc:
        raise ValueError(f"token_ids must be ints in [0, 2**32), got {list(token_ids)!r}") from exc
    digest = hashlib.sha256(_ROOT_HASH if parent is None else parent)
    digest.update(packed)
    return BlockHash(digest.digest()[:_HASH_BYTES])


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Hashes of every full block of token_ids, each chained on the previous one; a partial tail is skipped."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
