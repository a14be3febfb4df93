# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""The producer's KV block copy, and the GPU-side publish and wait of a signal word.

``copy_blocks_and_signal`` is step 2 of the handoff protocol in one launch: the CTAs of the
grid share the (layer, K/V, block, chunk) work items round-robin and write the consumer's
blocks with plain (weak) vectorized stores; then every CTA does a CTA barrier (so its
threads' stores happen-before its thread 0) and ``atom.add.acq_rel.gpu`` on a done-counter
in the producer's memory. The CTA that takes the counter from ``num_ctas - 1`` has acquired
every other CTA's release, resets the counter for the next launch, and publishes the signal
word with ``st.release.sys``: release is cumulative, so a consumer that observes the word
(with acquire) sees every block write of the launch (invariant I1).

Nothing here synchronizes the host: each call only enqueues on the current stream. A
counter serves one stream: two launches in flight on one counter would mix their counts.
Raw addresses (peer memory, mapped host memory) travel as int64 kernel arguments cast to
pointers in the kernel, which works compiled and under TRITON_INTERPRET=1 alike.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import ptx

# One CTA moves at most this many bytes per work item: 128 B (8 x 16 B vectors) per
# thread of 4 warps, enough bytes in flight per SM to saturate HBM and NVLink.
MAX_CHUNK_BYTES = 16384
# Smaller chunks only to give every CTA work on small copies; below this the loop
# overhead per item dominates.
MIN_CHUNK_BYTES = 2048
CTAS_PER_SM = 4
_UINT64_MAX = (1 << 64) - 1
_INT_FOR_WIDTH = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}
_INTERPRETED_POLL_NS = 1000


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class CopyPlan:
    """How one launch splits the copy. A work item is CHUNK elements of one
    (layer, kv, block) region of ``block_elems`` contiguous elements."""

    num_layers: int
    num_blocks: int  # block ids copied
    block_elems: int  # block_size * num_kv_heads * head_dim
    elem_bytes: int
    chunk_elems: int
    grid: int
    num_warps: int

    @property
    def chunks_per_block(self) -> int:
        return self.block_elems // self.chunk_elems

    @property
    def num_items(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.chunks_per_block

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_elems * self.elem_bytes


def plan_copy(
    num_layers: int, num_blocks: int, block_elems: int, elem_bytes: int, *, max_ctas: int
) -> CopyPlan:
    """Chunk size and grid: the largest power-of-two chunk that divides a block (so no
    masks and 16-byte vectors), shrunk towards MIN_CHUNK_BYTES until there is an item for
    every CTA; grid = min(items, max_ctas), at least 1 so that an empty copy still signals."""
    for name, v in (("num_layers", num_layers), ("block_elems", block_elems), ("max_ctas", max_ctas)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if elem_bytes not in _INT_FOR_WIDTH:
        raise ValueError(f"elem_bytes must be one of {sorted(_INT_FOR_WIDTH)}, got {elem_bytes}")
    chunk = block_elems & -block_elems  # largest power of two dividing it
    while chunk * elem_bytes > MAX_CHUNK_BYTES:
        chunk //= 2
    regions = num_layers * 2 * num_blocks
    while chunk * elem_bytes > MIN_CHUNK_BYTES and regions * (block_elems // chunk) < max_ctas:
        chunk //= 2
    items = regions * (block_elems // chunk)
    num_warps = max(1, min(4, chunk * elem_bytes // 512))
    return CopyPlan(
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_elems=block_elems,
        elem_bytes=elem_bytes,
        chunk_elems=chunk,
        grid=max(1, min(items, max_ctas)),
        num_warps=num_warps,
    )


def max_ctas_for(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * CTAS_PER_SM
    return 4  # the interpreter runs CTAs one after another: a few exercise the counter


# --------------------------------------------------------------------------- tables

_TABLE_CACHE: collections.OrderedDict[tuple[str, tuple[int, ...]], torch.Tensor] = collections.OrderedDict()
_TABLE_CACHE_SIZE = 16


def build_layer_table(layers: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 [num_layers] of the layers' base addresses on ``device``. Cached by the
    addresses themselves (the table's content is its key, so a stale entry cannot be wrong);
    the first build per pool copies host to device, later calls copy nothing."""
    addrs = tuple(t.data_ptr() for t in layers)
    for i, a in enumerate(addrs):
        if a % 16:
            raise ValueError(f"layers[{i}] address {a:#x} is not 16-byte aligned")
    key = (str(device), addrs)
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = torch.tensor(addrs, dtype=torch.int64, device=device)
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table


def _check_source(src_layers: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(src_layers) == 0:
        raise ValueError("src_layers is empty")
    first = src_layers[0]
    for i, t in enumerate(src_layers):
        if t.dim() != 5 or t.shape[0] != 2:
            raise ValueError(
                f"src_layers[{i}] shape {tuple(t.shape)} is not [2, blocks, block_size, heads, dim]"
            )
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"src_layers[{i}] is {tuple(t.shape)} {t.dtype} {t.device}, "
                f"layer 0 is {tuple(first.shape)} {first.dtype} {first.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"src_layers[{i}] is not contiguous")
    return first


def _check_ids(name: str, ids: torch.Tensor, device: torch.device) -> None:
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    if ids.device != device or not ids.is_contiguous():
        raise ValueError(f"{name} must be contiguous on {device}, got {ids.device}")


def _check_word_addr(name: str, addr: int) -> None:
    if addr <= 0 or addr % 8:
        raise ValueError(f"{name} must be a non-null 8-byte aligned address, got {addr:#x}")


def _check_value(name: str, value: int) -> None:
    if not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"{name} must fit in 64 unsigned bits, got {value}")


def enable_peer_access(src: torch.device, dst: torch.device) -> None:
    """Let kernels on ``src`` write ``dst``'s memory allocated in this process (memory opened
    by CUDA IPC gets this from the open). torch enables peer access from the source to the
    destination device at its first copy between them; a 1-byte copy triggers that."""
    if src == dst or src.type != "cuda" or dst.type != "cuda":
        return
    assert src.index is not None and dst.index is not None, (src, dst)
    if not torch.cuda.can_device_access_peer(src.index, dst.index):
        raise RuntimeError(f"{src} has no peer access to {dst}")
    torch.empty(1, dtype=torch.uint8, device=dst).copy_(torch.zeros(1, dtype=torch.uint8, device=src))
    torch.cuda.synchronize(src)


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["signal_addr", "value", "num_blocks", "num_items"])
def _copy_blocks_kernel(
    src_table,  # int64 [L] source layer base addresses
    dst_table,  # int64 [L] destination layer base addresses
    src_ids,  # [n] source block ids
    dst_ids,  # [n] destination block ids
    counter,  # int32 [1] done-counter, 0 between launches
    signal_addr: tl.int64,
    value: tl.uint64,
    num_blocks,  # n
    src_pool_blocks,  # num_blocks dimension of a source layer
    dst_pool_blocks,
    num_items,
    BLOCK_ELEMS: tl.constexpr,
    CHUNK: tl.constexpr,
    ELEM: tl.constexpr,  # an integer type of the element width: the copy moves bits
    CHUNKS: tl.constexpr,  # BLOCK_ELEMS // CHUNK
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, CHUNK)
    # A while loop: the interpreter's scalars cannot bound range(); no pipelining is lost
    # (each item is one load and one store).
    w = pid
    while w < num_items:
        chunk = w % CHUNKS
        t = w // CHUNKS
        i = t % num_blocks
        t = t // num_blocks
        kv = (t % 2).to(tl.int64)
        layer = t // 2
        src_block = tl.load(src_ids + i).to(tl.int64)
        dst_block = tl.load(dst_ids + i).to(tl.int64)
        src = tl.multiple_of(tl.load(src_table + layer).to(tl.pointer_type(ELEM)), 16)
        dst = tl.multiple_of(tl.load(dst_table + layer).to(tl.pointer_type(ELEM)), 16)
        # int64 element offsets: block * BLOCK_ELEMS overflows int32 on large pools.
        src_off = (kv * src_pool_blocks + src_block) * BLOCK_ELEMS + chunk * CHUNK
        dst_off = (kv * dst_pool_blocks + dst_block) * BLOCK_ELEMS + chunk * CHUNK
        vals = tl.load(src + src_off + offs)  # [CHUNK]
        tl.store(dst + dst_off + offs, vals)
        w += nprog
    # Every thread's stores happen-before thread 0's release half of the atomic.
    tl.debug_barrier()
    old = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if old == nprog - 1:
        # The last CTA: its atomic acquired every other CTA's release. The barrier orders
        # that acquire before the publishing thread's store whichever thread did the atomic.
        tl.debug_barrier()
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        ptx.st_release_sys_portable(signal_addr.to(tl.pointer_type(tl.uint64)), value, INTERPRET)


@triton.jit(do_not_specialize=["signal_addr", "value"])
def _publish_kernel(signal_addr: tl.int64, value: tl.uint64, INTERPRET: tl.constexpr):
    ptx.st_release_sys_portable(signal_addr.to(tl.pointer_type(tl.uint64)), value, INTERPRET)


@triton.jit(do_not_specialize=["signal_addr", "abort_addr", "expected", "timeout_ns"])
def _wait_kernel(
    status_ptr,  # int32 [1]: 0 ok, 1 aborted, 2 timeout
    signal_addr: tl.int64,
    abort_addr: tl.int64,
    expected: tl.uint64,
    timeout_ns: tl.int64,
    HAS_ABORT: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    signal = signal_addr.to(tl.pointer_type(tl.uint64))
    abort = abort_addr.to(tl.pointer_type(tl.uint64))
    seen = ptx.ld_relaxed_sys_portable(signal, INTERPRET)
    aborted = tl.full((), 0, tl.int32)
    elapsed = timeout_ns * 0
    if INTERPRET:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        start = elapsed.to(tl.uint64)
    else:
        start = ptx.globaltimer()
    while (seen != expected) & (aborted == 0) & (elapsed < timeout_ns):
        seen = ptx.ld_relaxed_sys_portable(signal, INTERPRET)
        if HAS_ABORT:
            aborted = (ptx.ld_relaxed_sys_portable(abort, INTERPRET) == expected).to(tl.int32)
        if INTERPRET:
            elapsed += _INTERPRETED_POLL_NS  # no clock: each poll counts as 1 us
        else:
            elapsed = (ptx.globaltimer() - start).to(tl.int64)
    # Relaxed load then fence: the acquire pattern, paid once instead of every poll.
    ptx.fence_acq_rel_sys_portable(INTERPRET)
    status = tl.where(seen == expected, 0, tl.where(aborted != 0, 1, 2)).to(tl.int32)
    tl.store(status_ptr, status)


# --------------------------------------------------------------------------- launchers


class BlockCopier:
    """A prepared handoff copy from one source pool into one destination pool: the pools are
    checked and their address tables built once, so a call only checks its ids, picks a plan
    (cached per block count) and launches. One copier owns one done-counter, so its launches
    must stay on one stream (each call enqueues on the current stream of the source device).

    Destination layers have the source layers' shape except ``dst_num_blocks``. Block ids
    must be in range (the allocator's invariant; the kernel does not read them back).
    """

    def __init__(
        self,
        src_layers: Sequence[torch.Tensor],
        dst_table: torch.Tensor,
        *,
        dst_num_blocks: int,
        counter: torch.Tensor | None = None,
    ) -> None:
        first = _check_source(src_layers)
        self.device = first.device
        if (
            dst_table.dtype != torch.int64
            or dst_table.shape != (len(src_layers),)
            or dst_table.device != self.device
        ):
            raise ValueError(
                f"dst_table must be int64 [{len(src_layers)}] on {self.device}, "
                f"got {dst_table.dtype} {tuple(dst_table.shape)} on {dst_table.device}"
            )
        if counter is None:
            counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        if counter.dtype != torch.int32 or counter.numel() != 1 or counter.device != self.device:
            raise ValueError(
                f"counter must be one int32 on {self.device}, got {counter.dtype} {tuple(counter.shape)}"
            )
        if dst_num_blocks < 1:
            raise ValueError(f"dst_num_blocks must be >= 1, got {dst_num_blocks}")
        _, self.src_pool_blocks, block_size, heads, dim = first.shape
        self.num_layers = len(src_layers)
        self.block_elems = block_size * heads * dim
        self.elem_bytes = first.element_size()
        self.max_ctas = max_ctas_for(self.device)
        self.src_table = build_layer_table(src_layers, self.device)
        self.dst_table = dst_table
        self.dst_num_blocks = dst_num_blocks
        self.counter = counter
        self._plans: dict[int, CopyPlan] = {}
        self._interpret = _interpreting()

    def plan(self, num_blocks: int) -> CopyPlan:
        plan = self._plans.get(num_blocks)
        if plan is None:
            plan = plan_copy(
                self.num_layers, num_blocks, self.block_elems, self.elem_bytes, max_ctas=self.max_ctas
            )
            self._plans[num_blocks] = plan
        return plan

    def __call__(
        self, src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor, signal_addr: int, value: int
    ) -> CopyPlan:
        """Copy block ``src_block_ids[i]`` of every source layer (K and V) into block
        ``dst_block_ids[i]`` of every destination layer, then publish ``value`` at
        ``signal_addr`` with st.release.sys; returns the plan (no host synchronization)."""
        _check_ids("src_block_ids", src_block_ids, self.device)
        _check_ids("dst_block_ids", dst_block_ids, self.device)
        if src_block_ids.numel() != dst_block_ids.numel():
            raise ValueError(
                f"src_block_ids has {src_block_ids.numel()} ids, dst_block_ids {dst_block_ids.numel()}"
            )
        _check_word_addr("signal_addr", signal_addr)
        _check_value("value", value)
        plan = self.plan(src_block_ids.numel())
        with _on_device(self.device):
            _copy_blocks_kernel[(plan.grid,)](
                self.src_table,
                self.dst_table,
                src_block_ids,
                dst_block_ids,
                self.counter,
                signal_addr,
                value,
                plan.num_blocks,
                self.src_pool_blocks,
                self.dst_num_blocks,
                plan.num_items,
                BLOCK_ELEMS=plan.block_elems,
                CHUNK=plan.chunk_elems,
                CHUNKS=plan.chunks_per_block,
                ELEM=_INT_FOR_WIDTH[plan.elem_bytes],
                INTERPRET=self._interpret,
                num_warps=plan.num_warps,
            )
        return plan


def copy_blocks_and_signal(
    src_layers: Sequence[torch.Tensor],
    dst_table: torch.Tensor,
    src_block_ids: torch.Tensor,
    dst_block_ids: torch.Tensor,
    counter: torch.Tensor,
    signal_addr: int,
    value: int,
    *,
    dst_num_blocks: int,
) -> CopyPlan:
    """One copy through a fresh ``BlockCopier`` (which see); repeated copies between the same
    pools should keep a copier, which checks the pools once."""
    copier = BlockCopier(src_layers, dst_table, dst_num_blocks=dst_num_blocks, counter=counter)
    return copier(src_block_ids, dst_block_ids, signal_addr, value)


def publish_signal(signal_addr: int, value: int, device: torch.device | None = None) -> None:
    """st.release.sys of ``value`` at ``signal_addr`` from a 1-thread kernel on the current
    stream of ``device``: ordered after the work enqueued before it (the abort ack)."""
    _check_word_addr("signal_addr", signal_addr)
    _check_value("value", value)
    with _on_device(device):
        _publish_kernel[(1,)](signal_addr, value, INTERPRET=_interpreting(), num_warps=1)


def wait_signal(
    signal_addr: int,
    expected: int,
    abort_addr: int | None,
    timeout_ns: int,
    device: torch.device,
) -> torch.Tensor:
    """Enqueue a 1-warp kernel that spins (relaxed loads) until the word at ``signal_addr``
    equals ``expected`` (then fence.acq_rel.sys), the word at ``abort_addr`` equals it, or
    ``timeout_ns`` of GPU time pass. Returns int32 [1] on ``device``: 0 ok, 1 aborted, 2 timeout
    (valid once the stream reaches it). Under the interpreter a poll counts as 1 us."""
    _check_word_addr("signal_addr", signal_addr)
    if abort_addr is not None:
        _check_word_addr("abort_addr", abort_addr)
    _check_value("expected", expected)
    if timeout_ns < 0:
        raise ValueError(f"timeout_ns must be >= 0, got {timeout_ns}")
    status = torch.full((1,), -1, dtype=torch.int32, device=device)
    with _on_device(device):
        _wait_kernel[(1,)](
            status,
            signal_addr,
            abort_addr if abort_addr is not None else signal_addr,
            expected,
            timeout_ns,
            HAS_ABORT=abort_addr is not None,
            INTERPRET=_interpreting(),
            num_warps=1,
        )
    return status


def _on_device(device: torch.device | None) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current device's current stream: make it ``device``'s."""
    if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
