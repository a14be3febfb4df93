# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""Triton kernel and launcher of the GPU litmus tests (``kvrelay litmus``).

One launch runs ``n_iters`` iterations of one litmus test in each of ``n_pairs`` pairs of
test CTAs; the remaining CTAs of the launch run memory stress until every test CTA is done.

* Roles: test CTA ``(pair, role)`` runs the role's PTX body (``BODY0`` or ``BODY1``) on
  lane 0 only. On one GPU one launch holds both roles (program ``2 * pair + role``); across
  two GPUs each GPU runs one role (program ``pair``) and the locations and barrier counters
  live in the first GPU's memory, reached by the second over NVLink (peer access).
* Per iteration the two CTAs of a pair meet at a spin barrier on a monotonic counter
  (relaxed ``red.add`` and ``ld``; both have arrived at iteration ``i`` when it reads
  ``>= 2 * (i + 1)``), spin a random number of clock cycles, then run their bodies on a
  fresh ``x`` and ``y``: two lines drawn from a permutation of the launch's location lines,
  each used once per launch and zero when the launch starts, so a read returns 0 or 1.
* A barrier that waits past ``timeout_ns`` ends that CTA's loop; ``status`` records how many
  iterations it completed, so a partner that never runs (CTAs not co-resident, the other
  GPU's kernel late) shows as missing iterations instead of a hung GPU.

Every inline asm is one block that all 32 lanes of the (one-warp) CTA execute uniformly:
lane 0 alone does the memory operations (``@lt_p``), and the result is broadcast with
``shfl.sync`` so that the loop conditions Triton evaluates in every lane agree. All asm is
``is_pure=False`` (LLVM ``sideeffect``): it is neither hoisted, merged nor reordered with the
other side-effecting asm, so the PTX order is the order the bodies were written in.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LINE_WORDS = 32  # one 128-byte line per location, so x and y never share a line
_STRESS_BLOCK = 128  # int32 words each stress step loads and stores (4 lines)
_STRESS_WORDS = tl.constexpr(1 << 20)  # 4 MiB scratch per device
_STOP_NS = 30_000_000_000  # stress CTAs give up after this long (a guard against a hang)

_LANE0 = "mov.u32 lt_t, %tid.x;\nsetp.eq.u32 lt_p, lt_t, 0;\n"
_BCAST = "shfl.sync.idx.b32 {dst}, {src}, 0, 0x1f, 0xffffffff;\n"


def body_asm(instructions: Sequence[str]) -> str:
    """Wraps a role's litmus instructions into one inline-asm block.

    Operands of the block: ``$0``, ``$1`` (u32 out: the role's ``r0`` and ``r1``, 0 where it
    does not read them), ``$2`` and ``$3`` (u64 in: addresses of ``x`` and ``y``). The
    instructions name them through the placeholders ``{x}``, ``{y}`` (addresses), ``{r0}``,
    ``{r1}`` (destination registers) and ``{one}`` (a register holding 1)."""
    names = {"x": "$2", "y": "$3", "r0": "lt_r0", "r1": "lt_r1", "one": "lt_one"}
    lines = "".join(f"@lt_p {ins.format(**names)}\n" for ins in instructions)
    return (
        "{\n.reg .pred lt_p;\n.reg .b32 lt_t, lt_r0, lt_r1, lt_one;\n"
        + _LANE0
        + "mov.u32 lt_r0, 0;\nmov.u32 lt_r1, 0;\nmov.u32 lt_one, 1;\n"
        + lines
        + _BCAST.format(dst="$0", src="lt_r0")
        + _BCAST.format(dst="$1", src="lt_r1")
        + "}"
    )


def arrive_asm(scope: str) -> str:
    """Lane 0 adds 1 to the u32 at ``$1`` (relaxed, ``scope``); ``$0`` is a dummy output."""
    return (
        "{\n.reg .pred lt_p;\n.reg .b32 lt_t, lt_one;\n"
        + _LANE0
        + "mov.u32 lt_one, 1;\n"
        + f"@lt_p red.relaxed.{scope}.global.add.u32 [$1], lt_one;\n"
        + "mov.u32 $0, 0;\n}"
    )


def poll_asm(scope: str) -> str:
    """Lane 0 reads the u32 at ``$1`` (relaxed, ``scope``); every lane gets the value in ``$0``."""
    return (
        "{\n.reg .pred lt_p;\n.reg .b32 lt_t, lt_v;\n"
        + _LANE0
        + "mov.u32 lt_v, 0;\n"
        + f"@lt_p ld.relaxed.{scope}.global.u32 lt_v, [$1];\n"
        + _BCAST.format(dst="$0", src="lt_v")
        + "}"
    )


# Lane 0's %globaltimer (ns), broadcast so that every lane takes the same timeout decision.
_NOW_ASM = tl.constexpr(
    "{\n.reg .b64 lt_g;\n.reg .b32 lt_lo, lt_hi;\n"
    "mov.u64 lt_g, %globaltimer;\nmov.b64 {lt_lo, lt_hi}, lt_g;\n"
    + _BCAST.format(dst="lt_lo", src="lt_lo")
    + _BCAST.format(dst="lt_hi", src="lt_hi")
    + "mov.b64 $0, {lt_lo, lt_hi};\n}"
)

# Spins until $1 cycles of %clock have passed; the branch stays inside the block (labels in
# a { } block are local to it, as CUTLASS's barrier waits rely on).
_DELAY_ASM = tl.constexpr(
    "{\n.reg .pred lt_q;\n.reg .b32 lt_c0, lt_c1, lt_d;\n"
    "mov.u32 lt_c0, %clock;\n"
    "lt_wait:\n"
    "mov.u32 lt_c1, %clock;\nsub.u32 lt_d, lt_c1, lt_c0;\n"
    "setp.lt.u32 lt_q, lt_d, $1;\n@lt_q bra lt_wait;\n"
    "mov.u32 $0, lt_d;\n}"
)


@triton.jit
def _arrive(addr, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _poll(addr, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _now():
    return tl.inline_asm_elementwise(_NOW_ASM, "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _test_cta(
    role,
    pair,
    data_addr,
    counter_addr,
    perm_ptr,  # [2 * n_pairs * n_iters] int32: lines of x and y of iteration j at 2j, 2j + 1
    delay_ptr,  # [2, n_pairs * n_iters] int32: cycles each role waits after the barrier
    out_ptr,  # [2, n_pairs, n_iters, 2] int32: (r0, r1) of each role's body
    status_ptr,  # [2, n_pairs] int32: iterations completed
    n_iters,
    n_pairs,
    timeout_ns,
    BODY0: tl.constexpr,
    BODY1: tl.constexpr,
    ARRIVE: tl.constexpr,
    POLL: tl.constexpr,
):
    counter = counter_addr + pair.to(tl.int64) * 128
    i = 0
    ok = 1
    while (i < n_iters) & (ok != 0):
        _arrive(counter, ARRIVE)
        target = 2 * (i + 1)
        deadline = _now() + timeout_ns
        seen = _poll(counter, POLL)
        now = _now()
        while (seen < target) & (now < deadline):
            seen = _poll(counter, POLL)
            now = _now()
        if seen >= target:
            j = pair * n_iters + i
            x = data_addr + tl.load(perm_ptr + 2 * j).to(tl.int64) * 128
            y = data_addr + tl.load(perm_ptr + 2 * j + 1).to(tl.int64) * 128
            cycles = tl.load(delay_ptr + role * n_pairs * n_iters + j)
            tl.inline_asm_elementwise(_DELAY_ASM, "=r,r", [cycles], dtype=tl.int32, is_pure=False, pack=1)
            if role == 0:
                r0, r1 = tl.inline_asm_elementwise(
                    BODY0, "=r,=r,l,l", [x, y], dtype=(tl.int32, tl.int32), is_pure=False, pack=1
                )
            else:
                r0, r1 = tl.inline_asm_elementwise(
                    BODY1, "=r,=r,l,l", [x, y], dtype=(tl.int32, tl.int32), is_pure=False, pack=1
                )
            o = out_ptr + ((role * n_pairs + pair) * n_iters + i) * 2
            tl.store(o, r0)
            tl.store(o + 1, r1)
        else:
            ok = 0
        i += 1
    tl.store(status_ptr + role * n_pairs + pair, i - 1 + ok)


@triton.jit
def _stress_cta(pid, done_addr, n_test, scratch_ptr, stop_ns, POLL_GPU: tl.constexpr, BLOCK: tl.constexpr):
    # Loads and stores of 4 lines at a pseudo-random offset each step, until every test CTA of
    # this launch is done (or stop_ns passes: a guard, never the normal exit).
    offs = tl.arange(0, BLOCK)
    n_blocks = _STRESS_WORDS // BLOCK
    k = pid * 7919 + 1
    stop = _now() + stop_ns
    done = _poll(done_addr, POLL_GPU)
    now = _now()
    while (done < n_test) & (now < stop):
        k = (k * 1103515245 + 12345) & 0x7FFFFFFF
        base = (k % n_blocks) * BLOCK
        v = tl.load(scratch_ptr + base + offs)
        tl.store(scratch_ptr + base + offs, v + 1)
        done = _poll(done_addr, POLL_GPU)
        now = _now()


@triton.jit(do_not_specialize=["n_iters", "n_pairs", "timeout_ns", "stop_ns"])
def litmus_kernel(
    data_addr,  # int64 address of the [2 * n_pairs * n_iters, LINE_WORDS] u32 location lines
    counter_addr,  # int64 address of the [n_pairs, LINE_WORDS] u32 barrier counters
    done_addr,  # int64 address of this launch's u32 count of finished test CTAs (local GPU)
    perm_ptr,
    delay_ptr,
    out_ptr,
    status_ptr,
    scratch_ptr,  # [_STRESS_WORDS] int32, local GPU
    n_iters,
    n_pairs,
    timeout_ns,
    stop_ns,
    ROLE: tl.constexpr,  # -1: both roles in this launch; 0 or 1: this launch runs that role only
    BODY0: tl.constexpr,
    BODY1: tl.constexpr,
    ARRIVE: tl.constexpr,
    POLL: tl.constexpr,
    ARRIVE_GPU: tl.constexpr,
    POLL_GPU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if ROLE < 0:
        n_test = 2 * n_pairs
        if pid < n_test:
            _test_cta(
                pid % 2, pid // 2, data_addr, counter_addr, perm_ptr, delay_ptr, out_ptr, status_ptr,
                n_iters, n_pairs, timeout_ns, BODY0, BODY1, ARRIVE, POLL,
            )  # fmt: skip
            _arrive(done_addr, ARRIVE_GPU)
        else:
            _stress_cta(pid, done_addr, n_test, scratch_ptr, stop_ns, POLL_GPU, BLOCK)
    else:
        if pid < n_pairs:
            _test_cta(
                ROLE, pid, data_addr, counter_addr, perm_ptr, delay_ptr, out_ptr, status_ptr,
                n_iters, n_pairs, timeout_ns, BODY0, BODY1, ARRIVE, POLL,
            )  # fmt: skip
            _arrive(done_addr, ARRIVE_GPU)
        else:
            _stress_cta(pid, done_addr, n_pairs, scratch_ptr, stop_ns, POLL_GPU, BLOCK)


# --------------------------------------------------------------------------- host side


class LitmusTimeoutError(RuntimeError):
    """A test CTA waited past the timeout for its partner: the iterations are incomplete."""


def enable_peer_access(device: int, peer: int) -> None:
    """Lets kernels running on ``device`` load, store and do atomics on ``peer``'s memory.

    Through the driver API on the primary contexts that torch's runtime uses (the runtime
    holds them, so they are retained here and never released). Torch ordinals are driver
    ordinals: both count the devices left visible by CUDA_VISIBLE_DEVICES."""
    if not torch.cuda.can_device_access_peer(device, peer):
        raise RuntimeError(
            f"GPU {device} cannot access GPU {peer}'s memory (no peer access, e.g. no NVLink/P2P)"
        )
    # A copy each way also records the peering in torch's allocator (expandable segments map
    # their memory to known peers only).
    for a, b in ((device, peer), (peer, device)):
        torch.zeros(1, device=f"cuda:{a}").copy_(torch.ones(1, device=f"cuda:{b}"))
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx_dev, ctx_peer, dev = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int()
    for ordinal, ctx in ((device, ctx_dev), (peer, ctx_peer)):
        _check(cuda.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(cuda.cuCtxPushCurrent_v2(ctx_dev), "cuCtxPushCurrent")
    try:
        result = cuda.cuCtxEnablePeerAccess(ctx_peer, 0)
    finally:
        _check(cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")
    _CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
    if result not in (0, _CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED):
        _check(result, f"cuCtxEnablePeerAccess(GPU {device} -> GPU {peer})")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed: CUresult {result}")


@dataclass(frozen=True)
class LaunchShape:
    """What every launch of one launcher shares."""

    pairs: int  # concurrent test-CTA pairs
    max_iters: int  # iterations per pair per launch, the most any launch runs
    stress_ctas: int | None  # per launched kernel; None: one per SM left after the test CTAs
    jitter: int  # delays after the barrier are uniform in [0, jitter] clock cycles
    timeout_ns: int  # the longest a barrier waits for the partner CTA


class LitmusLauncher:
    """Buffers of one placement, reused across launches: ``devices == (d,)`` runs both roles
    on GPU d; ``devices == (d0, d1)`` runs role 0 on d0 and role 1 on d1, with the locations and
    barrier counters in d0's memory (peer access from d1 must be enabled)."""

    def __init__(self, devices: tuple[int, ...], shape: LaunchShape, generator: torch.Generator) -> None:
        assert len(devices) in (1, 2), devices
        self.devices, self.shape, self.gen = devices, shape, generator
        lines = 2 * shape.pairs * shape.max_iters
        home = torch.device("cuda", devices[0])
        self.data = torch.zeros(lines * LINE_WORDS, dtype=torch.int32, device=home)  # [lines, LINE]
        self.counters = torch.zeros(shape.pairs * LINE_WORDS, dtype=torch.int32, device=home)
        self.local: list[dict[str, torch.Tensor]] = []
        for d in devices:
            dev = torch.device("cuda", d)
            self.local.append(
                {
                    "done": torch.zeros(LINE_WORDS, dtype=torch.int32, device=dev),
                    "perm": torch.zeros(lines, dtype=torch.int32, device=dev),
                    "delay": torch.zeros(lines, dtype=torch.int32, device=dev),
                    "out": torch.zeros(2 * lines, dtype=torch.int32, device=dev),
                    "status": torch.zeros(2 * shape.pairs, dtype=torch.int32, device=dev),
                    "scratch": torch.zeros(int(_STRESS_WORDS), dtype=torch.int32, device=dev),
                }
            )
        self._warm: set[tuple[str, str, str]] = set()

    def launch(self, body0: str, body1: str, scope: str, n_iters: int) -> torch.Tensor:
        """Runs ``n_iters`` iterations in each pair; returns each role's (r0, r1) as an int32
        CPU tensor [2 (role), pairs, n_iters, 2]. Raises LitmusTimeoutError when a pair lost
        its partner."""
        assert scope in ("gpu", "sys"), scope
        assert 0 < n_iters <= self.shape.max_iters, n_iters
        if len(self.devices) == 2 and (body0, body1, scope) not in self._warm:
            # Compile (and load on both GPUs) before the first real launch: otherwise role 0
            # runs while role 1's GPU is still compiling and every barrier times out.
            self._launch(body0, body1, scope, 0)
            self._warm.add((body0, body1, scope))
        return self._launch(body0, body1, scope, n_iters)

    def _launch(self, body0: str, body1: str, scope: str, n_iters: int) -> torch.Tensor:
        s, pairs = self.shape, self.shape.pairs
        lines = 2 * pairs * n_iters
        perm = torch.randperm(lines, generator=self.gen).to(torch.int32)
        delay = torch.randint(0, s.jitter + 1, (lines,), generator=self.gen, dtype=torch.int32)
        self.data[: lines * LINE_WORDS].zero_()
        self.counters.zero_()
        for buf in self.local:
            buf["done"].zero_()
            buf["status"].fill_(-1)
            buf["perm"][:lines].copy_(perm)
            buf["delay"][:lines].copy_(delay)
        self._sync()
        consts = {
            "BODY0": body0, "BODY1": body1, "ARRIVE": arrive_asm(scope), "POLL": poll_asm(scope),
            "ARRIVE_GPU": arrive_asm("gpu"), "POLL_GPU": poll_asm("gpu"), "BLOCK": _STRESS_BLOCK,
        }  # fmt: skip
        roles = (-1,) if len(self.devices) == 1 else (0, 1)
        for d, role, buf in zip(self.devices, roles, self.local, strict=True):
            n_test = 2 * pairs if role < 0 else pairs
            props = torch.cuda.get_device_properties(d)
            stress = (
                s.stress_ctas if s.stress_ctas is not None else max(0, props.multi_processor_count - n_test)
            )
            with torch.cuda.device(d):
                litmus_kernel[(n_test + stress,)](
                    self.data.data_ptr(), self.counters.data_ptr(), buf["done"].data_ptr(),
                    buf["perm"], buf["delay"], buf["out"], buf["status"], buf["scratch"],
                    n_iters, pairs, s.timeout_ns, _STOP_NS, ROLE=role, num_warps=1, **consts,
                )  # fmt: skip
        self._sync()
        return self._collect(n_iters)

    def _collect(self, n_iters: int) -> torch.Tensor:
        pairs = self.shape.pairs
        status = torch.stack([b["status"].view(2, pairs).cpu() for b in self.local])  # [devices, 2, P]
        outs = [b["out"][: 4 * pairs * n_iters].view(2, pairs, n_iters, 2).cpu() for b in self.local]
        out = outs[0].clone()
        if len(self.devices) == 2:
            out[1] = outs[1][1]  # role 1 ran on the second GPU
            done = torch.stack([status[0, 0], status[1, 1]])
        else:
            done = status[0]
        if bool((done != n_iters).any()):
            lost = [(r, p, int(done[r, p])) for r in range(2) for p in range(pairs) if done[r, p] != n_iters]
            raise LitmusTimeoutError(
                f"{len(lost)} test CTA(s) waited past {self.shape.timeout_ns / 1e9:g} s for their partner "
                f"(role, pair, iterations done of {n_iters}): {lost[:4]}; are all CTAs co-resident, "
                "and is the GPU otherwise idle?"
            )
        return out

    def _sync(self) -> None:
        for d in self.devices:
            torch.cuda.synchronize(d)
