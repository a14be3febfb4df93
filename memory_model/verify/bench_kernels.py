"""Triton kernels of `kvrelay bench handoff` (kept apart so the CLI can build its parser
without Triton)."""
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl

from .. import ptx


@triton.jit(do_not_specialize=["my_flag_addr", "peer_flag_addr", "base"])
def pingpong_kernel(
    out_ptr,  # int64 [2]: elapsed ns of the launch, rounds completed
    my_flag_addr: tl.int64,
    peer_flag_addr: tl.int64,
    base: tl.int64,  # round r exchanges base + r: values never repeat across launches
    rounds,
    timeout_ns: tl.int64,
    INITIATOR: tl.constexpr,
):
    mine = my_flag_addr.to(tl.pointer_type(tl.uint64))
    peer = peer_flag_addr.to(tl.pointer_type(tl.uint64))
    start = ptx.globaltimer()
    elapsed = timeout_ns * 0
    done = tl.full((), 0, tl.int32)
    r = tl.full((), 0, tl.int32)
    while (r < rounds) & (elapsed < timeout_ns):
        v = (base + r).to(tl.uint64)
        if INITIATOR:
            ptx.st_release_sys_u64(peer, v)
        seen = ptx.ld_acquire_sys_u64(mine)
        while (seen != v) & (elapsed < timeout_ns):
            seen = ptx.ld_acquire_sys_u64(mine)
            elapsed = (ptx.globaltimer() - start).to(tl.int64)
        if not INITIATOR:
            ptx.st_release_sys_u64(peer, v)
        done += (seen == v).to(tl.int32)
        r += 1
    tl.store(out_ptr, (ptx.globaltimer() - start).to(tl.int64))
    tl.store(out_ptr + 1, done.to(tl.int64))
