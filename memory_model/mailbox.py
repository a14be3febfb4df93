"""The consumer's mailbox: slots of flag and payload words in shared host memory.

Slot layout (64-bit words; a slot is 512 bytes, so slots never share a cache line):

    word 0        SIGNAL   written once per use by the producer: release store (CPU: libatomic;
                           GPU: the copy kernel's last CTA, st.release.sys), value (epoch << 32) | seq
    word 8        ABORT    written by the consumer (release) when it gives up on a use
    words 16..    payload  written by the producer with plain stores BEFORE its SIGNAL release;
                           read by the consumer only AFTER its SIGNAL acquire: status, first token,
                           its logprob and top logprobs

SIGNAL and ABORT sit in different cache lines, so the consumer's abort store never contends
with the producer's publication. Seq numbers start at 1 and a fresh region is zero, so no
valid expected value is ever 0.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from . import atomics
from .atomics import Order
from .shm import SharedRegion

SLOT_WORDS = 64
SLOT_BYTES = SLOT_WORDS * 8
W_SIGNAL, W_ABORT = 0, 8
W_STATUS, W_TOKEN, W_NTOP, W_LOGPROB, W_TOP_IDS = 16, 17, 18, 19, 20
MAX_TOP = 20
W_TOP_LPS = W_TOP_IDS + MAX_TOP
assert W_TOP_LPS + MAX_TOP <= SLOT_WORDS


def pack(epoch: int, seq: int) -> int:
    """A signal value: epoch in the high 32 bits, seq in the low 32."""
    if not 0 <= epoch < 1 << 32 or not 0 < seq < 1 << 32:
        raise ValueError(f"signal epoch {epoch} / seq {seq} out of range")
    return (epoch << 32) | seq


def unpack(value: int) -> tuple[int, int]:
    return value >> 32, value & 0xFFFF_FFFF


class Status(enum.IntEnum):
    OK = 1  # the KV blocks and the first token are in place
    ABORTED = 2  # the producer saw the abort word and copied nothing (an acknowledgement)
    FAILED = 3  # the producer could not compute the prompt; nothing was copied


@dataclass(frozen=True)
class Payload:
    status: Status
    token_id: int = -1
    logprob: float | None = None  # None when the request asked for no logprobs
    top: tuple[tuple[int, float], ...] = ()


def _f2i(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _i2f(x: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", x))[0])


def _write_payload(w: np.ndarray, payload: Payload) -> None:
    w[W_STATUS] = int(payload.status)
    w[W_TOKEN] = payload.token_id
    if payload.logprob is None:
        w[W_NTOP] = -1
        return
    top = payload.top[:MAX_TOP]
    w[W_NTOP] = len(top)
    w[W_LOGPROB] = _f2i(payload.logprob)
    for i, (tid, lp) in enumerate(top):
        w[W_TOP_IDS + i] = tid
        w[W_TOP_LPS + i] = _f2i(lp)


class _Slots:
    def __init__(self, region: SharedRegion, num_slots: int) -> None:
        self.region = region
        self.num_slots = num_slots
        self.words = region.view(np.int64, 0, num_slots * SLOT_WORDS).reshape(num_slots, SLOT_WORDS)

    def close(self) -> None:
        del self.words  # the one view of the region this object made
        self.region.close()

    def word_address(self, slot: int, word: int) -> int:
        self._check(slot)
        return self.region.address + slot * SLOT_BYTES + word * 8

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"mailbox slot {slot} out of range [0, {self.num_slots})")


class Mailbox(_Slots):
    """Consumer side: owns the region, hands out slots, waits for equality, aborts."""

    def __init__(self, num_slots: int, epoch: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"mailbox num_slots must be > 0, got {num_slots}")
        if not 0 < epoch < 1 << 32:
            raise ValueError(f"mailbox epoch must be in [1, 2**32), got {epoch}")
        super().__init__(SharedRegion.create("kvrelay-mailbox", num_slots * SLOT_BYTES), num_slots)
        self.epoch = epoch
        self._seq = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> tuple[int, int]:
        """A free slot and the value its producer must publish: (slot, expected)."""
        if not self._free:
            raise RuntimeError("mailbox: no free slot")
        slot = self._free.pop()
        self._seq[slot] += 1
        return slot, pack(self.epoch, self._seq[slot])

    def give_back(self, slot: int) -> None:
        """The slot's use is resolved (completed, acknowledged, or its producer is dead)."""
        self._check(slot)
        assert slot not in self._free, f"mailbox slot {slot} given back twice"
        self._free.append(slot)

    def arrived(self, slot: int, expected: int) -> bool:
        """True once SIGNAL == expected; then (and only then) the payload and the blocks may be
        read. Relaxed load while waiting, one acquire fence when the value matches."""
        if atomics.load(self.word_address(slot, W_SIGNAL), Order.RELAXED) != expected:
            return False
        atomics.fence(Order.ACQUIRE)
        return True

    def payload(self, slot: int) -> Payload:
        """Only after `arrived` returned True for this use of the slot."""
        w = self.words[slot]
        ntop = int(w[W_NTOP])
        status = Status(int(w[W_STATUS]))
        if ntop < 0:
            return Payload(status, int(w[W_TOKEN]))
        top = tuple((int(w[W_TOP_IDS + i]), _i2f(int(w[W_TOP_LPS + i]))) for i in range(min(ntop, MAX_TOP)))
        return Payload(status, int(w[W_TOKEN]), _i2f(int(w[W_LOGPROB])), top)

    def abort(self, slot: int, expected: int) -> None:
        atomics.store(self.word_address(slot, W_ABORT), expected, Order.RELEASE)

    def aborted(self, slot: int, expected: int) -> bool:
        return atomics.load(self.word_address(slot, W_ABORT), Order.ACQUIRE) == expected

    def publish_local(self, slot: int, value: int, payload: Payload) -> None:
        """The relay transport: the consumer itself wrote the blocks it received (through Ray)
        and publishes them in its own mailbox, so the waiting side is the same for every
        transport."""
        _write_payload(self.words[slot], payload)
        atomics.store(self.word_address(slot, W_SIGNAL), value, Order.RELEASE)


class MailboxWriter(_Slots):
    """Producer side: a peer's mailbox opened by name."""

    def __init__(self, name: str, num_slots: int) -> None:
        super().__init__(SharedRegion(name, num_slots * SLOT_BYTES, create=False), num_slots)

    def abort_requested(self, slot: int, expected: int) -> bool:
        return atomics.load(self.word_address(slot, W_ABORT), Order.ACQUIRE) == expected

    def write_payload(self, slot: int, payload: Payload) -> None:
        """Plain stores: published by the SIGNAL release that follows (CPU or GPU)."""
        _write_payload(self.words[slot], payload)

    def publish(self, slot: int, value: int) -> None:
        """The host's release store (CPU producers, and GPU producers' host-side acknowledgements
        once their stream is synchronized)."""
        atomics.store(self.word_address(slot, W_SIGNAL), value, Order.RELEASE)

    def signal_address(self, slot: int) -> int:
        """Host address of the SIGNAL word (a GPU producer registers the region and stores here)."""
        return self.word_address(slot, W_SIGNAL)
