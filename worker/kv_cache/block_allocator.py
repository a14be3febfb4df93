"""Paged-KV block allocator with prefix caching: ids, ref counts, chained block hashes, LRU queues.

Plain Python, no torch: the scheduler calls it on every step. The block hashes are `prefix_hash.py`'s,
shared with the router.

Each block is in exactly one of three states:
  - used:      ref_cnt > 0, held by the requests that reference it (hash optional);
  - cached:    ref_cnt == 0 with a hash, in the evictable queue (a prefix-cache hit can revive it);
  - free:      ref_cnt == 0 without a hash, in the free queue.
Allocation takes free blocks first and evicts cached blocks only when none is left, both in LRU order
(the block that reached ref 0 longest ago first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

from .prefix_hash import BlockHash, hash_block_tokens

BlockId = NewType("BlockId", int)


@dataclass(slots=True)
class KVCacheBlock:
    # Index of the block in the paged KV tensors; never changes.
    block_id: BlockId
    # Number of live requests whose block table holds this block; 0 means it sits in one of the queues.
    ref_cnt: int = 0
    # Chained hash of the full prefix ending at this block, set once the block is full and computed;
    # None while partial, uncached, or after eviction. Only a block with a hash can be a cache hit.
    block_hash: BlockHash | None = None


class BlockAllocator:
    """Hands out KV blocks to requests, shares full prefix blocks between them, and evicts in LRU order."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._enable_prefix_caching = enable_prefix_caching
        self._blocks = [KVCacheBlock(BlockId(i)) for i in range(num_blocks)]
        # Two LRU queues, head = reached ref 0 longest ago. OrderedDict rather than a deque because a
        # prefix-cache hit removes an arbitrary block from the middle of the evictable queue: O(1) here,
        # O(n) in a deque. Values are unused.
        self._free_queue: OrderedDict[BlockId, None] = OrderedDict.fromkeys(b.block_id for b in self._blocks)
        self._evictable_queue: OrderedDict[BlockId, None] = OrderedDict()
        self._hash_to_block: dict[BlockHash, BlockId] = {}
        # Per request: its block table, and the chained hashes of its first len(hashes) full blocks
        # (kept even where a duplicate left the block itself unhashed, so the chain continues).
        self._req_blocks: dict[str, list[BlockId]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self._prefix_cache_queries = 0  # prompt tokens looked up
        self._prefix_cache_hits = 0  # of those, tokens found cached

    # ---- counters -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: uncached free + evictable cached."""
        return len(self._free_queue) + len(self._evictable_queue)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._evictable_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self._num_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return self._prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self._prefix_cache_hits

    # ---- prefix cache lookup ---------------------------------------------------------------------

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[BlockId], int]:
        """Longest cached prefix of full blocks, as (block ids, number of cached tokens).

        At most (len(token_ids) - 1) // block_size blocks, so at least one prompt token is left to compute
        (its logits are needed to sample). Takes no references: pass the ids to allocate_slots. Hashes stop
        at the first miss, so the cost is O(hit blocks + 1).
        """
        if not self._enable_prefix_caching:
            return [], 0
        bs = self._block_size
        max_blocks = max(len(token_ids) - 1, 0) // bs
        hit: list[BlockId] = []
        parent: BlockHash | None = None
        for i in range(max_blocks):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            hit.append(block_id)
        num_cached_tokens = len(hit) * bs
        self._prefix_cache_queries += len(token_ids)
        self._prefix_cache_hits += num_cached_tokens
        return hit, num_cached_tokens

    # ---- allocation ------------------------------------------------------------------------------

    def allocate_slots(self, req_id: str, num_tokens: int, computed_blocks: Sequence[BlockId] = ()) -> bool:
        """Make req_id hold ceil(num_tokens / block_size) blocks; all-or-nothing.

        num_tokens counts every token the request needs KV for (cached + computed + new). computed_blocks
        (from get_computed_blocks) are accepted only on the request's first call and become its first
        blocks. Returns False, with no state changed, when the free supply cannot cover the need.
        """
        held = self._req_blocks.get(req_id)
        # Fast path, a decode step's usual case: the request already holds enough blocks (a new one
        # is needed once every block_size tokens). Exactly the cases the checks below pass and
        # change nothing in; every other call (bad input included) takes the full path.
        if held is not None and not computed_blocks and 0 <= num_tokens <= len(held) * self._block_size:
            return True
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens} (req_id={req_id!r})")
        if held is not None and computed_blocks:
            raise ValueError(f"computed_blocks given for req_id={req_id!r}, which already holds blocks")
        num_required = -(-num_tokens // self._block_size)
        num_held = len(held) if held is not None else len(computed_blocks)
        if num_held > num_required:
            if held is None:
                raise ValueError(
                    f"computed_blocks ({len(computed_blocks)} blocks) exceed num_tokens={num_tokens} "
                    f"for req_id={req_id!r}"
                )
            return True  # already holds enough; blocks are only returned by free()
        # A computed block with ref 0 sits in the evictable queue: reviving it spends supply too.
        num_revived = self._validate_computed(req_id, computed_blocks) if held is None else 0
        if num_required - num_held + num_revived > self.num_free_blocks:
            return False

        if held is None:
            held = self._req_blocks[req_id] = []
            hashes = self._req_hashes[req_id] = []
            for block_id in computed_blocks:
                block = self._blocks[block_id]
                if block.ref_cnt == 0:
                    del self._evictable_queue[block_id]
                block.ref_cnt += 1
                held.append(block_id)
                assert block.block_hash is not None
                hashes.append(block.block_hash)
        for _ in range(num_required - len(held)):
            held.append(self._take_free_block())
        return True

    def _validate_computed(self, req_id: str, computed_blocks: Sequence[BlockId]) -> int:
        """Check that computed_blocks are distinct cached blocks; return how many have ref 0."""
        num_revived = 0
        for block_id in computed_blocks:
            if not 0 <= block_id < self._num_blocks:
                raise ValueError(f"computed block id {block_id} out of range for req_id={req_id!r}")
            block = self._blocks[block_id]
            if block.block_hash is None:
                raise ValueError(
                    f"computed block {block_id} for req_id={req_id!r} is not cached (evicted since lookup?)"
                )
            num_revived += block.ref_cnt == 0
        if len(set(computed_blocks)) != len(computed_blocks):
            raise ValueError(f"computed_blocks for req_id={req_id!r} repeat a block: {list(computed_blocks)}")
        return num_revived

    def _take_free_block(self) -> BlockId:
        if self._free_queue:
            block_id, _ = self._free_queue.popitem(last=False)
        else:
            block_id, _ = self._evictable_queue.popitem(last=False)
            block = self._blocks[block_id]
            assert block.block_hash is not None
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
        self._blocks[block_id].ref_cnt = 1
        return block_id

    # ---- prefix cache registration ---------------------------------------------------------------

    def cache_full_blocks(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the hashes of req_id's blocks that are full and computed.

        token_ids are the request's tokens so far (prompt + output); block i is registered once
        (i + 1) * block_size <= num_computed_tokens. Each call hashes only blocks not hashed before.
        A hash already held by another block (two requests computed the same prefix at once) keeps its
        existing block; this one stays unhashed and is freed as uncached.
        """
        if not self._enable_prefix_caching:
            return
        held = self._req_blocks.get(req_id)
        if held is None:
            raise ValueError(f"cache_full_blocks: req_id={req_id!r} holds no blocks")
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens must be in [0, len(token_ids)={len(token_ids)}], "
                f"got {num_computed_tokens} (req_id={req_id!r})"
            )
        bs = self._block_size
        num_full = num_computed_tokens // bs
        hashes = self._req_hashes[req_id]
        if num_full <= len(hashes):
            # Nothing new to hash (the usual call: a block fills once every block_size tokens).
            # len(hashes) <= len(held) always, so the span check below cannot fail here.
            return
        if num_full > len(held):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} spans {num_full} blocks but req_id={req_id!r} "
                f"holds {len(held)}"
            )
        for i in range(len(hashes), num_full):
            block_hash = hash_block_tokens(hashes[-1] if hashes else None, token_ids[i * bs : (i + 1) * bs])
            hashes.append(block_hash)
            block = self._blocks[held[i]]
            assert block.block_hash is None, f"block {block.block_id} hashed twice"
            if block_hash not in self._hash_to_block:
                self._hash_to_block[block_hash] = block.block_id
                block.block_hash = block_hash

    # ---- release ---------------------------------------------------------------------------------

    def free(self, req_id: str) -> None:
        """Drop req_id's references; unknown ids are a no-op (abort before any allocation).

        Blocks reaching ref 0 join the queue tails last block first, so eviction (from the head) takes a
        prefix's tail before its head: the head is the part other prompts are likely to share.
        """
        held = self._req_blocks.pop(req_id, None)
        self._req_hashes.pop(req_id, None)
        if held is None:
            return
        for block_id in reversed(held):
            block = self._blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                queue = self._free_queue if block.block_hash is None else self._evictable_queue
                queue[block_id] = None

    def transfer(self, req_id: str, new_owner: str) -> None:
        """Hand req_id's blocks (and hash chain) to another owner id, unchanged: a KV handoff that
        was given up keeps its blocks quarantined under a private id while a late producer may
        still write them, and the request id itself is free to be used again."""
        if new_owner in self._req_blocks:
            raise ValueError(f"transfer: owner {new_owner!r} already holds blocks")
        if req_id not in self._req_blocks:
            raise ValueError(f"transfer: req_id={req_id!r} holds no blocks")
        self._req_blocks[new_owner] = self._req_blocks.pop(req_id)
        self._req_hashes[new_owner] = self._req_hashes.pop(req_id)

    def get_block_ids(self, req_id: str) -> list[BlockId]:
        """A copy of req_id's block table, in token order."""
        held = self._req_blocks.get(req_id)
        if held is None:
            raise ValueError(f"req_id={req_id!r} holds no blocks")
        return list(held)

    def block_ids_view(self, req_id: str) -> Sequence[BlockId]:
        """req_id's block table itself, no copy: the model runner's per-step read. Never mutate it."""
        held = self._req_blocks.get(req_id)
        if held is None:
            raise ValueError(f"req_id={req_id!r} holds no blocks")
        return held

    def reset_prefix_cache(self) -> None:
        """Forget every cached block with ref 0 (they become plain free blocks, LRU order kept).

        Blocks held by live requests keep their hashes: their KV is still valid.
        """
        for block_id in self._evictable_queue:
            block = self._blocks[block_id]
            assert block.block_hash is not None
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
            self._free_queue[block_id] = None
        self._evictable_queue.clear()

    # ---- invariants ------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant. O(num_blocks + held blocks): tests only."""
        holders = [0] * self._num_blocks
        for req_id, held in self._req_blocks.items():
            if len(set(held)) != len(held):
                raise RuntimeError(f"req {req_id!r} holds a block twice: {held}")
            for block_id in held:
                if not 0 <= block_id < self._num_blocks:
                    raise RuntimeError(f"req {req_id!r} holds out-of-range block {block_id}")
                holders[block_id] += 1
            self._check_req_hashes(req_id, held)
        for queue, name in ((self._free_queue, "free"), (self._evictable_queue, "evictable")):
            for block_id in queue:
                if not 0 <= block_id < self._num_blocks:
                    raise RuntimeError(f"{name} queue holds out-of-range block {block_id}")
        num_used = 0
        for block in self._blocks:
            self._check_block(block, holders[block.block_id])
            num_used += block.ref_cnt > 0
        total = len(self._free_queue) + len(self._evictable_queue) + num_used
        if total != self._num_blocks:
            raise RuntimeError(
                f"free ({len(self._free_queue)}) + cached ({len(self._evictable_queue)}) + used ({num_used}) "
                f"= {total} != num_blocks ({self._num_blocks})"
            )
        for block_hash, block_id in self._hash_to_block.items():
            if not 0 <= block_id < self._num_blocks or self._blocks[block_id].block_hash != block_hash:
                raise RuntimeError(
                    f"hash map sends {block_hash.hex()} to block {block_id}, which holds another"
                )
        if self._req_blocks.keys() != self._req_hashes.keys():
            raise RuntimeError("block tables and hash chains track different requests")

    def _check_block(self, block: KVCacheBlock, num_holders: int) -> None:
        block_id = block.block_id
        if block.ref_cnt != num_holders:
            raise RuntimeError(f"block {block_id} has ref_cnt {block.ref_cnt} but {num_holders} holders")
        in_free = block_id in self._free_queue
        in_evictable = block_id in self._evictable_queue
        if in_free + in_evictable + (block.ref_cnt > 0) != 1:
            raise RuntimeError(
                f"block {block_id} must be in exactly one state: free={in_free} "
                f"evictable={in_evictable} ref_cnt={block.ref_cnt}"
            )
        if in_free and block.block_hash is not None:
            raise RuntimeError(f"free-queue block {block_id} still has a hash")
        if in_evictable and block.block_hash is None:
            raise RuntimeError(f"evictable block {block_id} has no hash")
        if block.block_hash is not None:
            if not self._enable_prefix_caching:
                raise RuntimeError(f"block {block_id} has a hash with prefix caching off")
            if self._hash_to_block.get(block.block_hash) != block_id:
                raise RuntimeError(f"block {block_id} hash {block.block_hash.hex()} is not mapped to it")

    def _check_req_hashes(self, req_id: str, held: list[BlockId]) -> None:
        hashes = self._req_hashes.get(req_id, [])
        if len(hashes) > len(held):
            raise RuntimeError(f"req {req_id!r} has {len(hashes)} hashes for {len(held)} blocks")
        for i, block_hash in enumerate(hashes):
            own = self._blocks[held[i]].block_hash
            if own is not None and own != block_hash:
                raise RuntimeError(f"req {req_id!r} block {held[i]} hash differs from the request's chain")
