# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""System-scope flag accesses for Triton kernels, as PTX inline assembly.

Who uses what (the KV handoff contract of ``memory_model``):

* The producer publishes a 64-bit SIGNAL word with ``st.release.sys``: every write that
  happens-before the store in the issuing thread (its own, and those ordered before it by
  a CTA barrier or an acquiring atomic) is visible at system scope before the word is.
  The word may be peer GPU memory (opened by CUDA IPC) or mapped pinned host memory.
* The consumer spins with relaxed loads and then issues ``fence.acq_rel.sys`` (PTX has no
  standalone acquire-only fence at .sys in the forms Triton emits; acq_rel is a superset),
  or loads with ``ld.acquire.sys``; after either, it sees every write the release covered.
* ``.relaxed`` accesses are *strong* (morally strong with other .sys accesses) but order
  nothing else: a relaxed load alone never makes data visible.

All helpers take and return scalars (one 64-bit word). A Triton scalar is computed by every
thread of the CTA, so the load helpers run in every thread (the loads of a warp coalesce
into one request); the store helpers are predicated on ``%tid.x == 0`` so that the word is
written once per CTA, like ``tl.store`` of a scalar. The interpreter (TRITON_INTERPRET=1)
cannot run inline assembly: the ``*_portable`` helpers take ``INTERPRET`` and there fall
back to ``tl.atomic_*`` with the same ``sem``/``scope`` (the interpreter runs programs one
after another on the host, where x86 ordering makes those exact).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ld_acquire_sys_u64(ptr):
    return tl.inline_asm_elementwise(
        "ld.acquire.sys.global.u64 $0, [$1];", "=l,l", [ptr], dtype=tl.uint64, is_pure=False, pack=1
    )


@triton.jit
def ld_relaxed_sys_u64(ptr):
    return tl.inline_asm_elementwise(
        "ld.relaxed.sys.global.u64 $0, [$1];", "=l,l", [ptr], dtype=tl.uint64, is_pure=False, pack=1
    )


@triton.jit
def st_release_sys_u64(ptr, v):
    # Thread 0 of the CTA stores; the dummy output exists because inline asm must return one.
    return tl.inline_asm_elementwise(
        """{
        .reg .pred %p_st;
        .reg .b32 %t_st;
        mov.u32 %t_st, %tid.x;
        setp.eq.u32 %p_st, %t_st, 0;
        @%p_st st.release.sys.global.u64 [$1], $2;
        mov.u32 $0, 0;
        }""",
        "=r,l,l",
        [ptr, v.to(tl.uint64)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def st_relaxed_sys_u64(ptr, v):
    return tl.inline_asm_elementwise(
        """{
        .reg .pred %p_st;
        .reg .b32 %t_st;
        mov.u32 %t_st, %tid.x;
        setp.eq.u32 %p_st, %t_st, 0;
        @%p_st st.relaxed.sys.global.u64 [$1], $2;
        mov.u32 $0, 0;
        }""",
        "=r,l,l",
        [ptr, v.to(tl.uint64)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def fence_acq_rel_sys():
    return tl.inline_asm_elementwise(
        "fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def globaltimer():
    """Nanoseconds of the GPU's global timer (its resolution is 32 ns to 1 us by GPU)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.uint64, is_pure=False, pack=1
    )


# --------------------------------------------------------------------------- portable


@triton.jit
def ld_acquire_sys_portable(ptr, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.atomic_add(ptr, 0, sem="acquire", scope="sys").to(tl.uint64)
    else:
        return ld_acquire_sys_u64(ptr)


@triton.jit
def ld_relaxed_sys_portable(ptr, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.atomic_add(ptr, 0, sem="relaxed", scope="sys").to(tl.uint64)
    else:
        return ld_relaxed_sys_u64(ptr)


@triton.jit
def st_release_sys_portable(ptr, v, INTERPRET: tl.constexpr):
    if INTERPRET:
        tl.atomic_xchg(ptr, v.to(tl.uint64), sem="release", scope="sys")
    else:
        st_release_sys_u64(ptr, v)


@triton.jit
def fence_acq_rel_sys_portable(INTERPRET: tl.constexpr):
    if not INTERPRET:
        fence_acq_rel_sys()
