"""Tests for the paged-KV block allocator: exact block ids, LRU and eviction order, prefix-cache hits."""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kvrelay.worker.kv_cache.block_allocator import BlockAllocator, BlockId
from kvrelay.worker.kv_cache.prefix_hash import BlockHash, hash_block_tokens, hash_prompt_blocks

# ---- factory helpers --------------------------------------------------------------------------------


def make_alloc(num_blocks: int = 8, block_size: int = 4, caching: bool = True) -> BlockAllocator:
    return BlockAllocator(num_blocks, block_size, enable_prefix_caching=caching)


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def admit(alloc: BlockAllocator, req_id: str, tokens: Sequence[int], compute: bool = True) -> list[BlockId]:
    """Prefix lookup + allocation for a prompt, then (optionally) mark the whole prompt computed."""
    hit, _ = alloc.get_computed_blocks(tokens)
    assert alloc.allocate_slots(req_id, len(tokens), hit)
    if compute:
        alloc.cache_full_blocks(req_id, tokens, len(tokens))
    return alloc.get_block_ids(req_id)


def ids(*values: int) -> list[BlockId]:
    return [BlockId(v) for v in values]


def snapshot(alloc: BlockAllocator) -> tuple[Any, ...]:
    """Every piece of allocator state, to assert a failed call changed nothing."""
    return (
        {r: list(b) for r, b in alloc._req_blocks.items()},
        {r: list(h) for r, h in alloc._req_hashes.items()},
        list(alloc._free_queue),
        list(alloc._evictable_queue),
        dict(alloc._hash_to_block),
        [(b.ref_cnt, b.block_hash) for b in alloc._blocks],
    )


def ref_counts(alloc: BlockAllocator) -> list[int]:
    return [b.ref_cnt for b in alloc._blocks]


# ---- hashing ----------------------------------------------------------------------------------------


def test_hash_matches_independent_sha256_reference() -> None:
    # Pinned format: the router recomputes these hashes in another process.
    root = hashlib.sha256(b"kvrelay.prefix-cache.root.v1").digest()
    h0 = hashlib.sha256(root + struct.pack("<4I", 1, 2, 3, 70000)).digest()[:16]
    h1 = hashlib.sha256(h0 + struct.pack("<4I", 5, 6, 7, 8)).digest()[:16]
    assert hash_block_tokens(None, [1, 2, 3, 70000]) == h0
    assert hash_block_tokens(BlockHash(h0), [5, 6, 7, 8]) == h1
    assert hash_prompt_blocks([1, 2, 3, 70000, 5, 6, 7, 8, 9], 4) == [h0, h1]  # partial tail skipped
    assert hash_prompt_blocks([1, 2, 3], 4) == []
    with pytest.raises(ValueError, match="token_ids"):
        hash_block_tokens(None, [-1])
    with pytest.raises(ValueError, match="block_size"):
        hash_prompt_blocks([1], 0)


def test_chained_hash_same_tokens_under_other_parent_miss() -> None:
    alloc = make_alloc(num_blocks=8, block_size=2)
    admit(alloc, "a", [1, 2, 3, 4, 5])
    alloc.free("a")
    assert hash_block_tokens(None, [3, 4]) != hash_prompt_blocks([1, 2, 3, 4], 2)[1]
    assert alloc.get_computed_blocks([9, 9, 3, 4, 5]) == ([], 0)  # block [3, 4] under another parent
    assert alloc.get_computed_blocks([3, 4, 5]) == ([], 0)  # block [3, 4] as a first block
    assert alloc.get_computed_blocks([1, 2, 3, 4, 5]) == (ids(0, 1), 4)
    alloc.check_integrity()


# ---- allocation -------------------------------------------------------------------------------------


def test_fresh_allocator_hands_out_ids_in_order() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    assert alloc.allocate_slots("a", 10)
    assert alloc.get_block_ids("a") == ids(0, 1, 2)
    assert alloc.allocate_slots("b", 5)
    assert alloc.get_block_ids("b") == ids(3, 4)
    assert alloc.allocate_slots("a", 12)  # still fits in 3 blocks
    assert alloc.get_block_ids("a") == ids(0, 1, 2)
    assert alloc.allocate_slots("a", 13)
    assert alloc.get_block_ids("a") == ids(0, 1, 2, 5)
    assert alloc.allocate_slots("a", 3)  # never shrinks
    assert alloc.get_block_ids("a") == ids(0, 1, 2, 5)
    assert alloc.allocate_slots("c", 0)
    assert alloc.get_block_ids("c") == []
    assert (alloc.num_used_blocks, alloc.num_free_blocks, alloc.num_cached_free_blocks) == (6, 2, 0)
    assert alloc.usage == 6 / 8
    alloc.check_integrity()


def test_allocation_failure_changes_nothing() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    assert alloc.allocate_slots("a", 24)  # 6 blocks
    before = snapshot(alloc)
    assert not alloc.allocate_slots("b", 9)  # needs 3, 2 left
    assert not alloc.allocate_slots("a", 33)  # grow by 3, 2 left
    assert snapshot(alloc) == before
    with pytest.raises(ValueError, match="holds no blocks"):
        alloc.get_block_ids("b")
    assert alloc.allocate_slots("b", 8)  # exactly the 2 left
    assert alloc.get_block_ids("b") == ids(6, 7)
    assert alloc.num_free_blocks == 0
    alloc.check_integrity()


def test_allocation_failure_counts_revived_computed_blocks_and_leaves_them_cached() -> None:
    alloc = make_alloc(num_blocks=4, block_size=4)
    shared = toks(8, start=100)
    admit(alloc, "a", [*shared, 1])  # blocks 0, 1 hashed; block 2 partial
    alloc.free("a")  # free queue [3, 2], evictable [1, 0]
    assert alloc.allocate_slots("c", 4)
    assert alloc.get_block_ids("c") == ids(3)
    prompt_b = [*shared, *toks(7)]  # 4 blocks: 2 computed (both evictable) + 2 new
    hit, num_cached = alloc.get_computed_blocks(prompt_b)
    assert (hit, num_cached) == (ids(0, 1), 8)
    # 2 new <= 3 allocatable, but reviving the 2 cached blocks spends supply too: 4 > 3.
    before = snapshot(alloc)
    assert not alloc.allocate_slots("b", len(prompt_b), hit)
    assert snapshot(alloc) == before
    assert alloc.num_cached_free_blocks == 2
    assert alloc.get_computed_blocks(prompt_b) == (ids(0, 1), 8)
    alloc.free("c")
    assert alloc.allocate_slots("b", len(prompt_b), hit)
    assert alloc.get_block_ids("b") == ids(0, 1, 2, 3)
    assert ref_counts(alloc) == [1, 1, 1, 1]
    alloc.check_integrity()


def test_free_queue_is_lru_with_request_tail_first() -> None:
    alloc = make_alloc(num_blocks=6, block_size=2)
    assert alloc.allocate_slots("a", 4)
    assert alloc.allocate_slots("b", 4)
    assert alloc.get_block_ids("a") == ids(0, 1)
    assert alloc.get_block_ids("b") == ids(2, 3)
    alloc.free("a")
    alloc.free("b")
    alloc.free("never-allocated")  # no-op
    # Never-used blocks 4, 5 come first, then A's (freed first, its tail first), then B's.
    assert alloc.allocate_slots("c", 12)
    assert alloc.get_block_ids("c") == ids(4, 5, 1, 0, 3, 2)
    alloc.check_integrity()


# ---- prefix caching ---------------------------------------------------------------------------------


def test_prefix_hit_after_free() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt = toks(10, start=50)
    assert admit(alloc, "a", prompt) == ids(0, 1, 2)
    alloc.free("a")
    assert alloc.get_computed_blocks(prompt) == (ids(0, 1), 8)
    assert (alloc.prefix_cache_queries, alloc.prefix_cache_hits) == (20, 8)
    assert admit(alloc, "b", prompt) == ids(0, 1, 3)  # block 2 (uncached, freed last) is behind 3..7
    assert alloc.num_cached_free_blocks == 0
    alloc.check_integrity()


def test_prefix_hit_capped_so_one_token_is_computed() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt = toks(12, start=50)
    assert admit(alloc, "a", prompt) == ids(0, 1, 2)  # all 3 blocks full and hashed
    alloc.free("a")
    assert alloc.num_cached_free_blocks == 3
    assert alloc.get_computed_blocks(prompt) == (ids(0, 1), 8)  # not 3 blocks: last token recomputed
    assert alloc.get_computed_blocks(prompt[:5]) == (ids(0), 4)
    assert alloc.get_computed_blocks(prompt[:4]) == ([], 0)
    assert alloc.get_computed_blocks([]) == ([], 0)
    assert admit(alloc, "b", prompt) == ids(0, 1, 3)
    assert alloc.num_cached_free_blocks == 1  # block 2 still cached
    alloc.check_integrity()


def test_partial_last_block_never_cached() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    tokens = toks(10, start=7)
    admit(alloc, "a", tokens)
    alloc.cache_full_blocks("a", tokens, 10)  # repeat call: nothing new
    assert alloc._blocks[2].block_hash is None
    # Decode fills block 2; only then does it get a hash.
    tokens += [90, 91]
    assert alloc.allocate_slots("a", len(tokens))
    alloc.cache_full_blocks("a", tokens, 11)
    assert alloc._blocks[2].block_hash is None
    alloc.cache_full_blocks("a", tokens, 12)
    assert alloc._blocks[2].block_hash == hash_prompt_blocks(tokens, 4)[2]
    alloc.free("a")
    assert alloc.num_cached_free_blocks == 3
    assert alloc.get_computed_blocks([*tokens, 1]) == (ids(0, 1, 2), 12)
    alloc.check_integrity()


def test_shared_prefix_ref_counts() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt = toks(12, start=3)
    assert admit(alloc, "a", prompt) == ids(0, 1, 2)
    assert admit(alloc, "b", prompt) == ids(0, 1, 3)
    assert ref_counts(alloc)[:4] == [2, 2, 1, 1]
    assert alloc.num_used_blocks == 4
    alloc.free("a")
    assert ref_counts(alloc)[:4] == [1, 1, 0, 1]
    assert alloc.num_used_blocks == 3
    assert alloc.num_cached_free_blocks == 1  # block 2; 0 and 1 still used by b
    alloc.free("b")
    assert alloc.num_used_blocks == 0
    # b recomputed block 2's contents into block 3: a duplicate hash, so block 3 is freed uncached.
    assert alloc.num_cached_free_blocks == 3
    assert alloc._blocks[3].block_hash is None
    alloc.check_integrity()


def test_eviction_only_when_free_runs_out_in_lru_order() -> None:
    alloc = make_alloc(num_blocks=6, block_size=2)
    prompt = toks(8, start=20)
    assert admit(alloc, "a", prompt) == ids(0, 1, 2, 3)
    alloc.free("a")  # free queue [4, 5], evictable [3, 2, 1, 0]
    lookup = [*prompt, 99]
    assert alloc.allocate_slots("c", 4)
    assert alloc.get_block_ids("c") == ids(4, 5)
    assert alloc.num_cached_free_blocks == 4
    assert alloc.get_computed_blocks(lookup) == (ids(0, 1, 2, 3), 8)
    assert alloc.allocate_slots("d", 2)  # free queue empty: evict the prefix's tail
    assert alloc.get_block_ids("d") == ids(3)
    assert alloc._blocks[3].block_hash is None
    assert alloc.get_computed_blocks(lookup) == (ids(0, 1, 2), 6)
    assert alloc.allocate_slots("e", 4)
    assert alloc.get_block_ids("e") == ids(2, 1)
    assert alloc.get_computed_blocks(lookup) == (ids(0), 2)
    assert (alloc.num_cached_free_blocks, alloc.num_free_blocks) == (1, 1)
    alloc.check_integrity()


def test_eviction_of_parent_block_breaks_the_rest_of_the_chain() -> None:
    alloc = make_alloc(num_blocks=6, block_size=4)
    prompt = toks(10, start=40)
    # a and b compute the same prefix at once; b's blocks 3, 4 stay unhashed (duplicates of 0, 1).
    assert admit(alloc, "a", prompt, compute=False) == ids(0, 1, 2)
    assert admit(alloc, "b", prompt, compute=False) == ids(3, 4, 5)
    alloc.cache_full_blocks("a", prompt, 10)
    alloc.cache_full_blocks("b", prompt, 10)
    tokens_b = [*prompt, 1, 2]
    assert alloc.allocate_slots("b", len(tokens_b))
    alloc.cache_full_blocks("b", tokens_b, 12)  # block 5: child of block 1's hash
    alloc.free("a")  # free queue [2], evictable [1, 0]
    alloc.free("b")  # free queue [2, 4, 3], evictable [1, 0, 5]: the child is behind its parent
    assert list(alloc._evictable_queue) == ids(1, 0, 5)
    assert alloc.allocate_slots("d", 16)  # the 3 uncached blocks, then evict block 1
    assert alloc.get_block_ids("d") == ids(2, 4, 3, 1)
    # Block 5 keeps its hash but is unreachable: the lookup misses block 1 and all after it.
    assert alloc._blocks[5].block_hash is not None
    assert alloc.get_computed_blocks([*tokens_b, 0]) == (ids(0), 4)
    alloc.check_integrity()


def test_duplicate_hash_keeps_existing_block() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt = toks(10, start=60)
    # Both miss the cache (neither computed yet), so both compute the same prefix.
    assert admit(alloc, "a", prompt, compute=False) == ids(0, 1, 2)
    assert admit(alloc, "b", prompt, compute=False) == ids(3, 4, 5)
    alloc.cache_full_blocks("a", prompt, 10)
    alloc.cache_full_blocks("b", prompt, 10)
    assert alloc._blocks[3].block_hash is None and alloc._blocks[4].block_hash is None
    assert alloc.get_computed_blocks(prompt) == (ids(0, 1), 8)
    # b's chain continues from the duplicate hashes: its next full block is cached under it.
    tokens_b = [*prompt, 5, 6]
    assert alloc.allocate_slots("b", len(tokens_b))
    alloc.cache_full_blocks("b", tokens_b, 12)
    assert alloc.get_computed_blocks([*tokens_b, 0]) == (ids(0, 1, 5), 12)
    alloc.free("b")  # 3, 4 uncached -> free queue; 5 -> evictable
    assert alloc.num_cached_free_blocks == 1
    assert list(alloc._free_queue)[-2:] == ids(4, 3)
    alloc.check_integrity()


def test_prefix_caching_disabled() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4, caching=False)
    prompt = toks(10)
    assert admit(alloc, "a", prompt) == ids(0, 1, 2)
    alloc.free("a")
    assert alloc.num_cached_free_blocks == 0
    assert alloc.get_computed_blocks(prompt) == ([], 0)
    assert (alloc.prefix_cache_queries, alloc.prefix_cache_hits) == (0, 0)
    assert all(b.block_hash is None for b in alloc._blocks)
    with pytest.raises(ValueError, match="not cached"):
        alloc.allocate_slots("b", 10, ids(0))
    assert admit(alloc, "b", prompt) == ids(3, 4, 5)
    alloc.check_integrity()


def test_reset_prefix_cache_drops_only_unreferenced_hashes() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt_a, prompt_b = toks(9, start=0), toks(9, start=500)
    admit(alloc, "a", prompt_a)
    admit(alloc, "b", prompt_b)  # blocks 3, 4, 5
    alloc.free("a")
    assert alloc.num_cached_free_blocks == 2
    free_before = alloc.num_free_blocks
    alloc.reset_prefix_cache()
    assert (alloc.num_cached_free_blocks, alloc.num_free_blocks) == (0, free_before)
    assert list(alloc._free_queue) == ids(6, 7, 2, 1, 0)  # a's cached blocks join the tail, LRU kept
    assert alloc.get_computed_blocks(prompt_a) == ([], 0)
    assert alloc.get_computed_blocks(prompt_b) == (ids(3, 4), 8)  # b is live: its KV is still valid
    alloc.check_integrity()


# ---- validation and integrity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "field"),
    [(0, 4, "num_blocks"), (True, 4, "num_blocks"), (8, -1, "block_size"), (8, 2.0, "block_size")],
)
def test_constructor_rejects_bad_args(num_blocks: Any, block_size: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BlockAllocator(num_blocks, block_size)


def test_bad_calls_raise_value_error_and_change_nothing() -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt = toks(9)
    admit(alloc, "a", prompt)
    alloc.free("a")
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="num_tokens"):
        alloc.allocate_slots("b", -1)
    with pytest.raises(ValueError, match="repeat"):
        alloc.allocate_slots("b", 12, ids(0, 0))
    with pytest.raises(ValueError, match="exceed"):
        alloc.allocate_slots("b", 4, ids(0, 1))
    with pytest.raises(ValueError, match="out of range"):
        alloc.allocate_slots("b", 8, ids(99))
    with pytest.raises(ValueError, match="holds no blocks"):
        alloc.cache_full_blocks("b", prompt, 9)
    assert snapshot(alloc) == before
    assert alloc.allocate_slots("b", 9, ids(0, 1))
    with pytest.raises(ValueError, match="already holds"):
        alloc.allocate_slots("b", 9, ids(0, 1))
    with pytest.raises(ValueError, match="num_computed_tokens"):
        alloc.cache_full_blocks("b", prompt, 10)
    with pytest.raises(ValueError, match="holds 3"):
        alloc.cache_full_blocks("b", toks(16), 16)
    alloc.check_integrity()


def test_calls_that_change_nothing_return_early_and_bad_input_still_raises() -> None:
    """allocate_slots with enough blocks held and cache_full_blocks with nothing new to hash return
    before the rest of their work (a decode step's usual calls): no state changes, and bad input
    reaching them raises the same errors as before."""
    alloc = make_alloc(num_blocks=8, block_size=4)
    prompt = toks(8)
    assert admit(alloc, "a", prompt) == ids(0, 1)
    before = snapshot(alloc)
    for num_tokens in (0, 1, 5, 8):  # ceil(n / 4) <= 2 blocks held, 8 exactly fills them
        assert alloc.allocate_slots("a", num_tokens)
    for num_computed in (0, 3, 7, 8):  # at most 2 full blocks: both already hashed
        alloc.cache_full_blocks("a", prompt, num_computed)
    assert snapshot(alloc) == before
    with pytest.raises(ValueError, match="num_tokens must be >= 0, got -1"):
        alloc.allocate_slots("a", -1)
    with pytest.raises(ValueError, match="already holds blocks"):
        alloc.allocate_slots("a", 4, ids(0))
    with pytest.raises(ValueError, match=r"in \[0, len\(token_ids\)=8\], got 9"):
        alloc.cache_full_blocks("a", prompt, 9)
    with pytest.raises(ValueError, match=r"got -1"):
        alloc.cache_full_blocks("a", prompt, -1)
    assert snapshot(alloc) == before
    # One token past the held blocks: the full path, which takes block 2.
    assert alloc.allocate_slots("a", 9)
    assert alloc.get_block_ids("a") == ids(0, 1, 2)
    alloc.check_integrity()


def _tamper_ref(a: BlockAllocator) -> None:
    a._blocks[0].ref_cnt += 1


def _tamper_hash_map(a: BlockAllocator) -> None:
    a._hash_to_block.pop(next(iter(a._hash_to_block)))


def _tamper_both_queues(a: BlockAllocator) -> None:
    a._free_queue[BlockId(2)] = None


def _tamper_free_hash(a: BlockAllocator) -> None:
    a._blocks[7].block_hash = BlockHash(b"x" * 16)


def _tamper_double_hold(a: BlockAllocator) -> None:
    a._req_blocks["a"].append(BlockId(0))
    a._blocks[0].ref_cnt += 1


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_tamper_ref, "block 0 has ref_cnt 2 but 1 holders"),
        (_tamper_hash_map, "is not mapped to it"),
        (_tamper_both_queues, "block 2 must be in exactly one state"),
        (_tamper_free_hash, "free-queue block 7 still has a hash"),
        (_tamper_double_hold, "holds a block twice"),
    ],
)
def test_check_integrity_catches_corruption(tamper: Callable[[BlockAllocator], None], message: str) -> None:
    alloc = make_alloc(num_blocks=8, block_size=4)
    admit(alloc, "a", toks(9))  # blocks 0, 1 hashed and held; 2 held
    admit(alloc, "b", toks(9, start=100))
    alloc.free("b")  # blocks 5, 4, 3 -> 3, 4 evictable, 5 free
    alloc.check_integrity()
    tamper(alloc)
    with pytest.raises(RuntimeError, match=message):
        alloc.check_integrity()


# ---- randomized stress against a simple model -------------------------------------------------------


class _Model:
    """Independent bookkeeping: live block tables, and what KV each block really holds."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.bs = block_size
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[BlockId]] = {}
        # Block -> the full token prefix whose KV it holds (only for full, computed blocks).
        self.content: dict[BlockId, tuple[int, ...]] = {}

    def used(self) -> set[BlockId]:
        return {b for held in self.blocks.values() for b in held}

    def need(self, num_tokens: int, held: int) -> int:
        return max(-(-num_tokens // self.bs) - held, 0)


def _stress_admit(
    alloc: BlockAllocator, m: _Model, rng: random.Random, req: str, prefixes: list[list[int]]
) -> bool:
    tokens = rng.choice(prefixes)[: rng.randint(0, 20)] + [
        rng.randrange(50) for _ in range(rng.randint(1, 10))
    ]
    hit, num_cached = alloc.get_computed_blocks(tokens)
    assert num_cached == len(hit) * m.bs <= len(tokens) - 1
    for i, block_id in enumerate(hit):  # a hit must hold exactly this prompt's prefix
        assert m.content.get(block_id) == tuple(tokens[: (i + 1) * m.bs])
    used = m.used()
    supply_needed = m.need(len(tokens), len(hit)) + sum(b not in used for b in hit)
    before = snapshot(alloc)
    ok = alloc.allocate_slots(req, len(tokens), hit)
    assert ok == (supply_needed <= m.num_blocks - len(used))
    if not ok:
        assert snapshot(alloc) == before
        return False
    held = alloc.get_block_ids(req)
    assert held[: len(hit)] == hit and len(held) == -(-len(tokens) // m.bs)
    for block_id in held[len(hit) :]:
        assert block_id not in used
        m.content.pop(block_id, None)  # fresh or evicted: its old KV is gone
    m.tokens[req], m.computed[req], m.blocks[req] = tokens, num_cached, held
    return True


def _stress_compute(alloc: BlockAllocator, m: _Model, rng: random.Random, req: str) -> None:
    tokens = m.tokens[req]
    m.computed[req] = rng.randint(m.computed[req], len(tokens))
    alloc.cache_full_blocks(req, tokens, m.computed[req])
    for i in range(m.computed[req] // m.bs):
        prefix = tuple(tokens[: (i + 1) * m.bs])
        assert m.content.setdefault(m.blocks[req][i], prefix) == prefix


def _stress_grow(alloc: BlockAllocator, m: _Model, rng: random.Random, req: str) -> bool:
    new_len = len(m.tokens[req]) + rng.randint(1, 6)
    supply_needed = m.need(new_len, len(m.blocks[req]))
    before = snapshot(alloc)
    ok = alloc.allocate_slots(req, new_len)
    assert ok == (supply_needed <= m.num_blocks - len(m.used()))
    if not ok:
        assert snapshot(alloc) == before
        return False
    held = alloc.get_block_ids(req)
    assert held[: len(m.blocks[req])] == m.blocks[req]
    for block_id in held[len(m.blocks[req]) :]:
        m.content.pop(block_id, None)
    m.tokens[req] += [rng.randrange(50) for _ in range(new_len - len(m.tokens[req]))]
    m.blocks[req] = held
    return True


def test_randomized_stress_against_model() -> None:
    rng = random.Random(1234)
    alloc = make_alloc(num_blocks=24, block_size=4)
    m = _Model(24, 4)
    prefixes = [[rng.randrange(50) for _ in range(20)] for _ in range(3)]
    failures = next_id = max_holders = 0
    for step in range(4000):
        op = rng.random()
        live = sorted(m.blocks)
        if op < 0.3 and len(live) < 8:
            next_id += 1
            failures += not _stress_admit(alloc, m, rng, f"r{next_id}", prefixes)
        elif op < 0.55 and live:
            _stress_compute(alloc, m, rng, rng.choice(live))
        elif op < 0.75 and live:
            failures += not _stress_grow(alloc, m, rng, rng.choice(live))
        elif op < 0.995 and live:
            req = rng.choice(live)
            alloc.free(req)
            del m.blocks[req], m.tokens[req], m.computed[req]
        elif op >= 0.995:
            alloc.reset_prefix_cache()
        alloc.check_integrity()
        used = m.used()
        assert alloc.num_used_blocks == len(used), step
        assert alloc.num_free_blocks == 24 - len(used)
        holders = [sum(b in held for held in m.blocks.values()) for b in range(24)]
        assert ref_counts(alloc) == holders
        max_holders = max(max_holders, *holders)
        assert all(alloc.get_block_ids(r) == held for r, held in m.blocks.items())
    # The run must have exercised hits, failures and shared blocks, else it proves little.
    assert alloc.prefix_cache_hits > 200
    assert failures > 20
    assert max_holders >= 3
    assert alloc.prefix_cache_queries > alloc.prefix_cache_hits
