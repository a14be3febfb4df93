"""Host-side 64-bit atomics with explicit memory order, on any address (shared memory included).

Python has no atomics, and a plain write through a memoryview or numpy is a compiler- and
hardware-reorderable store: fine on x86-64 (TSO), wrong on ARM. So the host side of the
protocol calls GCC's libatomic (`__atomic_load_8`, `__atomic_store_8`, ...) through ctypes:
the same instructions `std::atomic<uint64_t>` compiles to (a plain `mov` plus compiler
barrier on x86-64; `ldar`/`stlr` on AArch64). libatomic ships with every GCC runtime
(it is a dependency of libstdc++ on the distributions torch supports); no compiler is needed.

Orders follow the C11 numbering (`__ATOMIC_RELAXED` = 0 ... `__ATOMIC_SEQ_CST` = 5).
A call costs about 0.1-0.3 us: the mailbox is polled a few times per engine step, not per token.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import functools


class Order(enum.IntEnum):
    RELAXED = 0
    ACQUIRE = 2
    RELEASE = 3
    ACQ_REL = 4
    SEQ_CST = 5


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise RuntimeError(
            f"memory_model needs libatomic (GCC's atomic runtime, package libatomic1): {e}"
        ) from None
    u64, ptr, i32 = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
    lib.__atomic_load_8.argtypes = [ptr, i32]
    lib.__atomic_load_8.restype = u64
    lib.__atomic_store_8.argtypes = [ptr, u64, i32]
    lib.__atomic_store_8.restype = None
    lib.__atomic_fetch_add_8.argtypes = [ptr, u64, i32]
    lib.__atomic_fetch_add_8.restype = u64
    lib.__atomic_compare_exchange_8.argtypes = [ptr, ptr, u64, ctypes.c_bool, i32, i32]
    lib.__atomic_compare_exchange_8.restype = ctypes.c_bool
    lib.atomic_thread_fence.argtypes = [i32]
    lib.atomic_thread_fence.restype = None
    return lib


def _check(addr: int) -> None:
    if addr % 8:
        raise ValueError(f"atomic address {addr:#x} is not 8-byte aligned")


def load(addr: int, order: Order = Order.ACQUIRE) -> int:
    assert order in (Order.RELAXED, Order.ACQUIRE, Order.SEQ_CST), order
    _check(addr)
    return int(_lib().__atomic_load_8(addr, order))


def store(addr: int, value: int, order: Order = Order.RELEASE) -> None:
    assert order in (Order.RELAXED, Order.RELEASE, Order.SEQ_CST), order
    _check(addr)
    _lib().__atomic_store_8(addr, value & 0xFFFF_FFFF_FFFF_FFFF, order)


def fetch_add(addr: int, delta: int, order: Order = Order.ACQ_REL) -> int:
    _check(addr)
    return int(_lib().__atomic_fetch_add_8(addr, delta & 0xFFFF_FFFF_FFFF_FFFF, order))


def compare_exchange(
    addr: int, expected: int, desired: int, order: Order = Order.ACQ_REL
) -> tuple[bool, int]:
    """(swapped, the value seen): stores `desired` only when the word holds `expected`."""
    _check(addr)
    seen = ctypes.c_uint64(expected)
    failure = {Order.RELEASE: Order.RELAXED, Order.ACQ_REL: Order.ACQUIRE}.get(order, order)
    ok = _lib().__atomic_compare_exchange_8(addr, ctypes.addressof(seen), desired, False, order, failure)
    return bool(ok), int(seen.value)


def fence(order: Order = Order.ACQUIRE) -> None:
    """A thread fence: after relaxed loads that saw a flag, `fence(ACQUIRE)` completes the acquire."""
    _lib().atomic_thread_fence(order)
