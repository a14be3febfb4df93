"""The host side of memory_model for real: atomics, mailbox words, and the handoff protocol
between two OS processes through shared memory (what CPU workers use in CI)."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from kvrelay.memory_model import atomics
from kvrelay.memory_model.atomics import Order
from kvrelay.memory_model.mailbox import Mailbox, MailboxWriter, Payload, Status, pack, unpack
from kvrelay.memory_model.shm import SharedRegion

BLOCK_WORDS = 512  # 4 KiB blocks
NUM_BLOCKS = 64


def test_atomics_on_shared_memory() -> None:
    with SharedRegion.create("kvrelay-test", 4096) as r:
        a = r.address + 64
        atomics.store(a, 7, Order.RELEASE)
        assert atomics.load(a, Order.ACQUIRE) == 7
        assert atomics.fetch_add(a, 5) == 7 and atomics.load(a, Order.RELAXED) == 12
        assert atomics.compare_exchange(a, 11, 1) == (False, 12)
        assert atomics.compare_exchange(a, 12, 1) == (True, 12)
        atomics.store(a, -1)
        assert atomics.load(a) == 2**64 - 1
        with pytest.raises(ValueError, match="aligned"):
            atomics.load(a + 4)


def test_signal_values() -> None:
    assert unpack(pack(3, 9)) == (3, 9)
    for bad in ((0, 0), (-1, 1), (1 << 32, 1), (1, 1 << 32)):
        with pytest.raises(ValueError, match="out of range"):
            pack(*bad)


def test_mailbox_slots_payload_and_abort() -> None:
    mb = Mailbox(num_slots=2, epoch=5)
    try:
        w = MailboxWriter(mb.name, 2)
        s0, v0 = mb.take()
        s1, v1 = mb.take()
        assert {s0, s1} == {0, 1} and unpack(v0) == (5, 1) and mb.num_free == 0
        with pytest.raises(RuntimeError, match="no free slot"):
            mb.take()
        w.write_payload(s0, Payload(Status.OK, 42, -0.25, ((42, -0.25), (3, -1.5))))
        assert not mb.arrived(s0, v0)
        w.publish(s0, v0)
        assert mb.arrived(s0, v0)
        assert mb.payload(s0) == Payload(Status.OK, 42, -0.25, ((42, -0.25), (3, -1.5)))
        assert not w.abort_requested(s1, v1)
        mb.abort(s1, v1)
        assert w.abort_requested(s1, v1)
        mb.give_back(s0)
        s2, v2 = mb.take()
        assert s2 == s0 and unpack(v2) == (5, 2)
        assert not mb.arrived(s2, v2)  # the slot's earlier value is stale now
        w.close()
    finally:
        mb.close()


def _producer(mailbox: str, pool: str, jobs: mp.Queue, done: mp.Queue) -> None:
    mb = MailboxWriter(mailbox, 4)
    region = SharedRegion(pool, NUM_BLOCKS * BLOCK_WORDS * 8, create=False)
    blocks = region.view(np.int64, 0, NUM_BLOCKS * BLOCK_WORDS).reshape(NUM_BLOCKS, BLOCK_WORDS)
    while (job := jobs.get()) is not None:
        slot, value, ids, stamp = job
        if mb.abort_requested(slot, value):
            mb.write_payload(slot, Payload(Status.ABORTED))
        else:
            for b in ids:  # plain stores, one block at a time (the checker models them arriving late)
                blocks[b, :] = stamp
            mb.write_payload(slot, Payload(Status.OK, stamp))
        mb.publish(slot, value)
    del blocks
    done.put("bye")


def test_handoff_between_processes_delivers_every_block() -> None:
    """200 handoffs through 4 reused slots: a consumer that sees its value must see every word
    of every block written, and never accepts a value meant for an earlier use."""
    ctx = mp.get_context("spawn")
    mb = Mailbox(num_slots=4, epoch=77)
    pool = SharedRegion.create("kvrelay-testpool", NUM_BLOCKS * BLOCK_WORDS * 8)
    blocks = pool.view(np.int64, 0, NUM_BLOCKS * BLOCK_WORDS).reshape(NUM_BLOCKS, BLOCK_WORDS)
    jobs: mp.Queue = ctx.Queue()
    done: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_producer, args=(mb.name, pool.name, jobs, done), daemon=True)
    proc.start()
    rng = np.random.default_rng(0)
    try:
        for stamp in range(1, 201):
            slot, value = mb.take()
            ids = [int(i) for i in rng.choice(NUM_BLOCKS, size=8, replace=False)]
            jobs.put((slot, value, ids, stamp))
            deadline = time.monotonic() + 30
            while not mb.arrived(slot, value):
                assert time.monotonic() < deadline, "the producer never published"
            payload = mb.payload(slot)
            assert payload == Payload(Status.OK, stamp)
            assert (blocks[ids] == stamp).all(), f"handoff {stamp}: a block was read before it was complete"
            mb.give_back(slot)
        # An aborted use is acknowledged, and nothing is written.
        slot, value = mb.take()
        mb.abort(slot, value)
        before = blocks.copy()
        jobs.put((slot, value, [0, 1], 999))
        while not mb.arrived(slot, value):
            pass
        assert mb.payload(slot).status is Status.ABORTED
        assert (blocks == before).all()
        jobs.put(None)
        assert done.get(timeout=30) == "bye"
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        del blocks
        pool.close()
        mb.close()
