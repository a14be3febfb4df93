"""The model runner's packed step inputs: block-table row updates (the pure-Python append path and
the batched numpy diff, against the per-row numpy diff they replace) and a mixed step's token
rows (against positions and slots computed entry by entry from the block tables)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from engine_helpers import make_engine

from kvrelay.worker.request import Request
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.scheduler import ScheduledRequest, SchedulerOutput
from kvrelay.worker.step_inputs import InputBuffers

ROWS, COLS = 6, 8


def make_buffers() -> InputBuffers:
    return InputBuffers(64, ROWS, COLS, torch.device("cpu"))


class ReferenceTable:
    """The per-row numpy diff of the code before the fast paths: what set_block_rows must match."""

    def __init__(self) -> None:
        self.mirror = np.zeros((ROWS, COLS), dtype=np.int32)
        self.width = [0] * ROWS

    def set_row(self, row: int, blocks: list[int]) -> list[tuple[int, int]]:
        width = max(len(blocks), self.width[row])
        new = np.zeros(width, dtype=np.int32)
        new[: len(blocks)] = blocks
        changed = np.flatnonzero(self.mirror[row, :width] != new)
        self.mirror[row, :width] = new
        self.width[row] = len(blocks)
        return [(row * COLS + int(c), int(new[c])) for c in changed]


def queued(buf: InputBuffers) -> list[tuple[int, int]]:
    return [(int(i), int(b)) for i, b in buf._np_updates[: buf.num_updates]]


def dense(rows: dict[int, list[int]]) -> np.ndarray:
    """The block table the rows describe, entry by entry (zeros past each row's blocks)."""
    table = np.zeros((ROWS, COLS), dtype=np.int32)
    for row, blocks in rows.items():
        for col, block in enumerate(blocks):
            table[row, col] = block
    return table


def step(
    buf: InputBuffers, ref: ReferenceTable, changes: list[tuple[int, list[int]]]
) -> list[tuple[int, int]]:
    """One step's row changes through set_block_rows and the reference; checks they agree."""
    buf.begin_step()
    buf.set_block_rows(changes)
    expected = [u for row, blocks in changes for u in ref.set_row(row, blocks)]
    got = queued(buf)
    assert sorted(got) == sorted(expected)
    assert len(got) == len(expected)  # no entry queued twice
    np.testing.assert_array_equal(buf.np_block_tables, ref.mirror)
    buf.upload()
    np.testing.assert_array_equal(buf.block_tables.numpy(), ref.mirror)
    return got


def test_appended_entries_queue_only_the_new_blocks_in_order() -> None:
    buf, ref = make_buffers(), ReferenceTable()
    assert step(buf, ref, [(2, [7, 3])]) == [(2 * COLS, 7), (2 * COLS + 1, 3)]
    assert step(buf, ref, [(2, [7, 3, 9])]) == [(2 * COLS + 2, 9)]
    assert step(buf, ref, [(2, [7, 3, 9, 4, 5])]) == [(2 * COLS + 3, 4), (2 * COLS + 4, 5)]
    np.testing.assert_array_equal(buf.block_tables.numpy(), dense({2: [7, 3, 9, 4, 5]}))


def test_appended_block_zero_matches_the_mirror_and_is_not_queued() -> None:
    buf, ref = make_buffers(), ReferenceTable()
    step(buf, ref, [(0, [5])])
    assert step(buf, ref, [(0, [5, 0, 6])]) == [(2, 6)]
    # The row's width still counts the 0 entry: a later append goes after it.
    assert step(buf, ref, [(0, [5, 0, 6, 1])]) == [(3, 1)]
    np.testing.assert_array_equal(buf.block_tables.numpy(), dense({0: [5, 0, 6, 1]}))


def test_changed_middle_entry_is_diffed() -> None:
    buf, ref = make_buffers(), ReferenceTable()
    step(buf, ref, [(1, [4, 5, 6])])
    assert step(buf, ref, [(1, [4, 8, 6, 2])]) == [(COLS + 1, 8), (COLS + 3, 2)]
    np.testing.assert_array_equal(buf.block_tables.numpy(), dense({1: [4, 8, 6, 2]}))


def test_shrunk_row_zeroes_the_dropped_entries() -> None:
    buf, ref = make_buffers(), ReferenceTable()
    step(buf, ref, [(3, [4, 5, 6, 7])])
    assert sorted(step(buf, ref, [(3, [4, 5])])) == [(3 * COLS + 2, 0), (3 * COLS + 3, 0)]
    # A row that shrank to the same prefix and grows again takes the append path: width is 2.
    assert step(buf, ref, [(3, [4, 5, 9])]) == [(3 * COLS + 2, 9)]
    np.testing.assert_array_equal(buf.block_tables.numpy(), dense({3: [4, 5, 9]}))


def test_rows_shifted_after_a_finished_request_mix_both_paths() -> None:
    """Row 0's request finished: rows 1..3 move up (numpy diff), row 4 only gains a block."""
    buf, ref = make_buffers(), ReferenceTable()
    tables = {0: [1, 2], 1: [3, 4, 5], 2: [6], 3: [7, 8], 4: [9, 10]}
    step(buf, ref, list(tables.items()))
    shifted = {0: tables[1], 1: tables[2], 2: tables[3], 3: [], 4: [9, 10, 11]}
    step(buf, ref, list(shifted.items()))
    np.testing.assert_array_equal(buf.block_tables.numpy(), dense(shifted))


def test_a_row_given_twice_in_one_call_is_refused() -> None:
    buf = make_buffers()
    buf.set_block_rows([(0, [1, 2])])
    with pytest.raises(AssertionError, match="given twice"):
        buf.set_block_rows([(0, [5]), (0, [6])])


def test_random_row_changes_match_the_per_row_diff() -> None:
    rng = random.Random(7)
    buf, ref = make_buffers(), ReferenceTable()
    rows: dict[int, list[int]] = {}
    for _ in range(300):
        changes = []
        for row in rng.sample(range(ROWS), rng.randint(1, ROWS)):
            old = rows.get(row, [])
            kind = rng.choice(("append", "append", "replace", "shrink", "edit"))
            if kind == "append" and len(old) < COLS:
                new = old + [rng.randrange(0, 20) for _ in range(rng.randint(1, COLS - len(old)))]
            elif kind == "shrink":
                new = old[: rng.randint(0, len(old))]
            elif kind == "edit" and old:
                new = list(old)
                new[rng.randrange(len(old))] = rng.randrange(0, 20)
            else:
                new = [rng.randrange(0, 20) for _ in range(rng.randint(0, COLS))]
            rows[row] = new
            changes.append((row, new))
        step(buf, ref, changes)
    np.testing.assert_array_equal(buf.block_tables.numpy(), dense(rows))


def test_mixed_step_token_rows_match_the_block_tables() -> None:
    """A step of decodes and prefill chunks (the vectorized _fill_tokens): every token row's id,
    position and slot against the request's tokens and block table, entry by entry."""
    engine = make_engine(block_size=8)
    alloc, bs = engine.allocator, 8
    params = SamplingParams(max_tokens=4)
    # (prompt length, tokens already computed, tokens this step): two decodes, a first chunk,
    # a middle chunk that does not sample, and a last chunk that does.
    shapes = [(20, 19, 1), (9, 8, 1), (30, 0, 12), (40, 16, 13), (25, 17, 8)]
    scheduled = []
    for i, (length, computed, n) in enumerate(shapes):
        req = Request(f"r{i}", [(7 * i + k) % 250 + 3 for k in range(length)], params)
        assert alloc.allocate_slots(req.request_id, computed + n)
        req.num_computed_tokens = computed
        scheduled.append(ScheduledRequest(req, computed, n))
    inp = engine.runner.prepare(SchedulerOutput(scheduled=scheduled), alloc)
    buf = engine.runner.buffers
    ids, positions, slots, sample_rows, seq_lens = [], [], [], [], []
    for s in scheduled:
        table = alloc.get_block_ids(s.request.request_id)
        for p in range(s.start, s.start + s.num_new_tokens):
            ids.append(s.request.all_token_ids[p])
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        seq_lens.append(s.start + s.num_new_tokens)
        if s.samples:
            sample_rows.append(len(ids) - 1)
    t = len(ids)
    assert inp.input_ids.tolist() == ids
    assert inp.positions.tolist() == positions
    assert inp.meta.slot_mapping.tolist() == slots
    assert inp.meta.seq_lens.tolist() == seq_lens == inp.meta.seq_lens_cpu
    assert inp.meta.query_start_loc.tolist() == [0, 1, 2, 14, 27, 35]
    assert inp.sample_rows.tolist() == sample_rows == [0, 1, 34]
    assert buf.np_input_ids[:t].tolist() == ids
    for s in scheduled:
        alloc.free(s.request.request_id)
    alloc.check_integrity()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_requests_keep_their_rows_as_others_finish_and_tokens_match(async_scheduling: bool) -> None:
    """Rows are stable (ModelRunner._stable_rows): a request keeps last step's row while it is in
    range, so a finish moves one request (the last row's) instead of shifting every later one, and
    only moved or grown rows are rewritten. Tokens match a run with the scheduler's order."""
    from engine_helpers import random_prompts

    from kvrelay.worker.model_runner import ModelRunner

    engine = make_engine(max_num_seqs=8, async_scheduling=async_scheduling)
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(12, [5, 9, 14], vocab, seed=7)
    params = [SamplingParams(max_tokens=4 + 3 * (i % 5), ignore_eos=True) for i in range(12)]
    runner = engine.runner
    rows_seen: list[dict[str, int]] = []
    rewritten: list[int] = []
    stable = runner._stable_rows

    def record(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
        out = stable(scheduled)
        rows_seen.append({s.request.request_id: i for i, s in enumerate(out)})
        return out

    set_rows = runner.buffers.set_block_rows

    def count(changed: list[tuple[int, list[int]]]) -> None:
        rewritten.append(len(changed))
        set_rows(changed)

    runner._stable_rows = record  # type: ignore[method-assign]
    runner.buffers.set_block_rows = count  # type: ignore[method-assign]
    got = [o.token_ids for o in engine.generate(prompts, params)]

    # Against the scheduler's own order (the identity permutation), token for token.
    reference = make_engine(max_num_seqs=8, async_scheduling=async_scheduling)
    reference.runner._stable_rows = lambda scheduled: scheduled  # type: ignore[method-assign]
    assert got == [o.token_ids for o in reference.generate(prompts, params)]
    moves = 0
    for before, after in itertools.pairwise(rows_seen):
        n = len(after)
        for rid, row in after.items():
            old = before.get(rid)
            if old is not None and old < n:
                assert row == old, (rid, old, row)  # kept while in range
            elif old is not None:
                moves += 1
    assert moves > 0  # finishes did move requests from the tail into holes
    assert isinstance(runner, ModelRunner) and sum(rewritten) < sum(len(r) for r in rows_seen)
