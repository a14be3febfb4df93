"""Operational model of the KV handoff protocol, explored exhaustively by `checker.py`.

Memory model (an approximation of PTX release/acquire at .gpu and .sys scope):
- Shared memory is one multi-copy-atomic store: once a write reaches it, every thread
  sees it. PTX is not multi-copy atomic in general, but every location here has one
  reader that matters (C), so two observers disagreeing on write order (IRIW) cannot
  change what the protocol does.
- A producer CTA's plain (weak) and relaxed stores enter its pending buffer and reach
  memory at any later step, in any order, except that two pending writes to one
  location keep program order (per-location coherence).
- `atom.add.acq_rel.gpu` on the done-counter is a release at .gpu scope: it moves the
  CTA's pending stores into the producer GPU's buffer (visible at .gpu scope, still
  possibly late at .sys scope, where the consumer reads). Its acquire half is what
  makes the last CTA's `st.release.sys` cumulative: that store waits until its own
  buffer and the GPU buffer are empty, i.e. it covers every write the counter chain
  made it observe. A relaxed counter atomic moves nothing, so it covers nothing.
- A relaxed SIGNAL store (the broken variant) is buffered like a data store.
- The consumer's loads read memory. With an acquire (ld.acquire.sys or fence.acquire
  after the relaxed poll) its payload/block loads happen after the flag load; without
  it each of those loads may be performed at any earlier point while it waits
  (modeled as "prefetch" steps whose values the later reads use).
- Host threads (P's host, C, the other request) have no pending stores when they
  publish, so their stores are applied directly. The kernel launch orders P's host
  payload stores before the kernel (launch is a release for the host thread), so the
  payload write and the launch are one step. Loads are never delayed except the
  consumer's data loads above, and no thread reads a location it has a pending store
  to, so store-to-load forwarding never arises.

State is a tuple of immutable tuples so that the search can hash it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

# Shared locations: the slot's words, then blocks (epoch e, block b) at BLOCK0 + e*blocks + b.
SIG, ABT, PAY, BLOCK0 = 0, 1, 2, 3
OK, ABORTED = 1, 2  # payload status
OTHER_VALUE = -1  # what the other request writes into a block it took

T = TypeVar("T")
Value = int | tuple[int, int]  # int words; payload = (round tag, status)
Buffer = tuple[tuple[int, Value], ...]  # pending (location, value) stores in program order

# Consumer phases for the slot's current round.
IDLE, WAITING, ABANDONED, ADMITTED = 0, 1, 2, 3
# Block allocator states (blocks of the consumer's current epoch).
FREE, RESERVED, QUARANTINED, IN_USE, TAKEN = 0, 1, 2, 3, 4
# Producer host states.
HOST_IDLE, HOST_LAUNCHED, HOST_ACKED = 0, 1, 2
# Other request: holds block index >= 0, or one of these.
OTHER_IDLE, OTHER_DONE = -1, -2


class Variant(enum.Enum):
    CORRECT = "correct"
    RELAXED_RELEASE = "relaxed-release"  # last CTA's SIGNAL store relaxed, not release
    NO_ACQUIRE = "no-acquire"  # consumer reads data after a relaxed poll, no acquire
    NONZERO_WAIT = "nonzero-wait"  # consumer waits for SIGNAL != 0, not == expected
    FREE_ON_TIMEOUT = "free-on-timeout"  # blocks freed at timeout instead of quarantined
    RELAXED_COUNTER = "relaxed-counter"  # done-counter atomic relaxed, not acq_rel
    RESTART_NO_FENCE = "restart-no-fence"  # new epoch reuses the slot before old producers are fenced
    APPLY_LATE = "apply-late"  # a completion seen after timeout is applied to the request


class Invariant(enum.Enum):
    I1 = "consumer read a block or the payload before it held the round's final value"
    I2 = "consumer accepted a stale signal (old seq or old epoch)"
    I3 = "block freed or reused while a producer may still write it"
    I4 = "completion applied after abort/timeout"
    I5 = "pending entry, reserved block or unfinished round left at a terminal state"


@dataclass(frozen=True)
class Violation:
    invariant: Invariant
    detail: str


@dataclass(frozen=True)
class ModelParams:
    """Size of the model; the defaults are what CI checks (see docs/MEMORY_MODEL.md)."""

    ctas: int = 2
    blocks: int = 2
    rounds: int = 2
    restart: bool = True
    producer_death: bool = True
    timeout: bool = True
    other_request: bool = True
    # False: I3 is only seen through its effect (a late store overwriting a reused block), not at the free.
    check_free: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.ctas <= 4:
            raise ValueError(f"ctas must be in [1, 4], got {self.ctas}")
        if self.blocks < 1 or self.blocks % self.ctas:
            raise ValueError(f"blocks must be a positive multiple of ctas={self.ctas}, got {self.blocks}")
        if not 1 <= self.rounds <= 3:
            raise ValueError(f"rounds must be in [1, 3], got {self.rounds}")

    @property
    def blocks_per_cta(self) -> int:
        return self.blocks // self.ctas

    @property
    def epochs(self) -> int:
        return 2 if self.restart else 1


class Producer(NamedTuple):
    expected: int  # the value this producer publishes: pack(epoch, seq) of its round
    epoch: int  # consumer epoch whose blocks it writes
    host: int
    ctas: tuple[
        int, ...
    ]  # per-CTA pc: 0 not launched, 1..m write block pc-1, m+1 atomic, m+2 publish, m+3 done
    bufs: tuple[Buffer, ...]  # per-CTA pending stores
    gpu_buf: Buffer  # released at .gpu scope by the counter atomic, not yet visible at .sys scope
    counter: int
    stopped: bool  # died, or dropped its mappings after the pool said C restarted


class Consumer(NamedTuple):
    epoch: int
    seq: int  # the slot's use counter in this epoch
    phase: int
    expected: int
    prefetched: tuple[tuple[int, Value], ...]  # data loads performed early (no-acquire variant)
    restarted: bool


class State(NamedTuple):
    mem: tuple[Value, ...]
    cons: Consumer
    prods: tuple[Producer, ...]  # one per round started, in order; the last is the current round's
    alloc: tuple[int, ...]  # per block of the consumer's current epoch
    other: int


Step = tuple[str, "State | Violation"]


def pack(epoch: int, seq: int) -> int:
    return (epoch << 32) | seq


def fmt_signal(value: Value) -> str:
    if isinstance(value, tuple):
        return f"(tag={fmt_signal(value[0])}, status={value[1]})"
    return "0" if value == 0 else f"e{value >> 32}s{value & 0xFFFFFFFF}"


def block_loc(params: ModelParams, epoch: int, block: int) -> int:
    return BLOCK0 + epoch * params.blocks + block


def loc_name(params: ModelParams, loc: int) -> str:
    if loc < BLOCK0:
        return ("SIGNAL", "ABORT", "payload")[loc]
    epoch, block = divmod(loc - BLOCK0, params.blocks)
    return f"block {block} (epoch {epoch})"


def initial_state(params: ModelParams) -> State:
    mem: tuple[Value, ...] = (0, 0, (0, 0)) + (0,) * (params.epochs * params.blocks)
    cons = Consumer(epoch=0, seq=0, phase=IDLE, expected=0, prefetched=(), restarted=False)
    other = OTHER_IDLE if params.other_request else OTHER_DONE
    return State(mem, cons, (), (FREE,) * params.blocks, other)


def store_at(mem: tuple[Value, ...], loc: int, value: Value) -> tuple[Value, ...]:
    return (*mem[:loc], value, *mem[loc + 1 :])


def set_at(items: tuple[T, ...], index: int, value: T) -> tuple[T, ...]:
    return (*items[:index], value, *items[index + 1 :])


def work_left(p: Producer, params: ModelParams) -> bool:
    return p.host == HOST_IDLE or any(1 <= pc <= params.blocks_per_cta + 2 for pc in p.ctas)


def drained(p: Producer) -> bool:
    return not p.gpu_buf and not any(p.bufs)


def may_write(s: State, params: ModelParams, loc: int) -> bool:
    """Whether some producer can still make a store to `loc` reach memory (the I3 ghost check)."""
    m = params.blocks_per_cta
    for p in s.prods:
        if any(entry[0] == loc for buf in (*p.bufs, p.gpu_buf) for entry in buf):
            return True
        if p.stopped or p.host == HOST_ACKED:
            continue
        for i, pc in enumerate(p.ctas):
            for j in range(m):
                if pc <= j + 1 and block_loc(params, p.epoch, i * m + j) == loc:
                    return True
    return False


def with_producer(s: State, r: int, p: Producer, loc: int | None = None, value: Value = 0) -> State:
    mem = s.mem if loc is None else store_at(s.mem, loc, value)
    return s._replace(mem=mem, prods=set_at(s.prods, r, p))


def drain_steps(s: State, params: ModelParams, r: int) -> Iterator[Step]:
    """A pending store reaches memory; an older pending store to the same location goes first."""
    p = s.prods[r]
    seen: set[int] = set()
    for k, (loc, value) in enumerate(p.gpu_buf):
        if loc not in seen:
            q = p._replace(gpu_buf=p.gpu_buf[:k] + p.gpu_buf[k + 1 :])
            yield (
                f"P{r} GPU: store to {loc_name(params, loc)} becomes visible at .sys scope",
                with_producer(s, r, q, loc, value),
            )
        seen.add(loc)
    for i, buf in enumerate(p.bufs):
        cta_seen = set(seen)
        for k, (loc, value) in enumerate(buf):
            if loc not in cta_seen:
                q = p._replace(bufs=set_at(p.bufs, i, buf[:k] + buf[k + 1 :]))
                yield (
                    f"P{r} CTA{i}: store to {loc_name(params, loc)} becomes visible",
                    with_producer(s, r, q, loc, value),
                )
            cta_seen.add(loc)
