# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""The last step of sampling: one token per row from its (temperature-scaled, filtered) logits,
with counter-based noise, as one batch of device ops and no host sync.

The draw is the Gumbel-max race: token = argmax_v(x_v / T + G_v), G_v = -log(-log(U_v)), which
picks v with probability softmax(x / T)_v (the exponential race argmax(p_v / E_v) of the previous
sampler, E_v = -log(U_v), in log space: no softmax pass is needed). Greedy rows (T = 0) take
argmax_v(x_v), the first index on ties, as torch.argmax does.

Noise. U_v of a row is a pure function of (seed, counter, v), as in vLLM v1's FlashInfer path and
SGLang's sampling_seed: no generator state anywhere, so a row's token depends only on its own
logits, params, seed and counter (the number of tokens the request has generated before this
one), never on the batch, and a recompute after preemption or a KV handoff draws the same
noise again. The hash is splitmix64 (Steele et al. 2014):

    mix64(z)  = the splitmix64 finalizer: xor-shift 30, * C1, xor-shift 27, * C2, xor-shift 31
    key       = mix64(mix64(seed) + counter * GAMMA)                    one per row and step
    h_v       = mix64(key + (v + 1) * GAMMA)                            v in [0, V)
    U_v       = (h_v's top 23 bits + 0.5) * 2^-23                       in (0, 1), exact in float32

written with int64 ops that mean the same in torch and in Triton (multiplication wraps mod 2^64;
right shifts are arithmetic, so each one is masked to its logical result). The float mapping is
exact in float32, so U is bit-identical on both paths, and so is 1 / T (IEEE on both); only log,
and the fused multiply-add a GPU compiler may make of x * (1 / T) + G, may round differently (by
an ulp), so the CPU and the GPU give the same tokens up to float near-ties. 23 bits bound the
noise: E = -log U lies in [6e-8, 16.6], which moves a token's probability by < 1e-7.

`argmax_rows` is the greedy batch's argmax by the same split-and-reduce scheme, on the logits'
own dtype: torch.argmax reduces a row in one thread block, 28 us for one 128256-entry row on an
H200 (2.3% of a 1B batch-1 step), and the float32 copy of a batch-256 bf16 logits tensor that it
read cost another 96 us a step.

`race` runs the Triton kernel on CUDA tensors (two launches: per (row, vocab split) partial
maxima, then one reduction per row; the grid depends only on N and V, and nothing of shape
[N, V] is allocated, so it can be captured in a CUDA graph); `race_torch` is the reference and the
CPU path. Triton is imported lazily, as worker/model/fused_ops.py explains.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .model import fused_ops
from .model.fused_ops import FusedImpl, _cdiv, _LazyKernel, _next_power_of_2, use_triton

# Bound at the first launch, as in fused_ops (see the note there): the kernels below resolve
# `tl` in this module's globals when they compile.
tl: Any = None

# splitmix64's constants as signed int64 (the same bits): torch has no uint64 arithmetic.
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)  # -7046029254386353131
_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # -4658895280553007687
_C2 = 0x94D049BB133111EB - (1 << 64)  # -7723592293110705685
_U_BITS = 23
_SENTINEL = 2**31 - 1  # "no index yet" in the kernel's running argmax
_BLOCK = 1024  # vocab entries one kernel program handles per loop iteration


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping) tensors; `(z >> s) & mask` is the logical shift."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _C1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _C2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def row_keys(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """[N] int64 key of each row's noise at this step, from its seed and counter ([N] int64 each)."""
    return _mix64(_mix64(seed) + counter * _GAMMA)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] float32 U in (0, 1): the kernel's noise, materialized (reference and CPU path)."""
    v = torch.arange(1, vocab + 1, dtype=torch.int64, device=seed.device)  # [V]
    h = _mix64(row_keys(seed, counter).unsqueeze(1) + v * _GAMMA)  # [N, V] int64
    top = (h >> (64 - _U_BITS)) & ((1 << _U_BITS) - 1)
    return (top.to(torch.float32) + 0.5) * 2.0**-_U_BITS


def race_torch(
    x: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, *, scaled: bool
) -> torch.Tensor:
    """[N] int64 tokens. x: [N, V] logits (already scaled, x * (1 / T), when `scaled`;
    -inf marks a filtered token); temperature: [N] float32, 0 = greedy; seed, counter: [N] int64."""
    x = x.float()
    sampled = temperature > 0  # [N]
    if not scaled:
        x = x * (1.0 / torch.where(sampled, temperature, 1.0)).unsqueeze(1)  # as the kernel scales
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, x.shape[1])))  # [N, V]
    return torch.where(sampled, (x + gumbel).argmax(dim=-1), x.argmax(dim=-1))


def race(
    x: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    *,
    scaled: bool,
    impl: FusedImpl = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """`race_torch`, by the Triton kernel where `impl` picks it. num_splits: vocab splits per row
    (None: enough programs to fill the GPU; tests force several on the CPU interpreter)."""
    if not use_triton(x, impl):
        return race_torch(x, temperature, seed, counter, scaled=scaled)
    global tl
    if tl is None:
        fused_ops._import_triton()
        tl = fused_ops.tl
    n, vocab = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    block = min(_BLOCK, _next_power_of_2(vocab))
    splits = num_splits if num_splits is not None else _default_splits(n, x.device)
    # Each split covers a whole number of blocks; every split holds at least one vocab entry.
    chunk = _cdiv(_cdiv(vocab, max(1, splits)), block) * block
    splits = _cdiv(vocab, chunk)
    part_val = torch.empty((n, splits), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((n, splits), dtype=torch.int32, device=x.device)
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    _race_partial[(n, splits)](
        x, x.stride(0), temperature, seed, counter, part_val, part_idx, vocab, chunk, splits,
        SCALE=not scaled, BLOCK=block,
    )  # fmt: skip
    _race_reduce[(n,)](part_val, part_idx, out, splits, BLOCK_S=_next_power_of_2(splits))
    return out


def argmax_rows(x: torch.Tensor, *, impl: FusedImpl = "auto", num_splits: int | None = None) -> torch.Tensor:
    """[N] int64: each row's argmax of x [N, V] (any float dtype; the first index on ties, as
    torch.argmax; a row with NaN gives an unspecified index), by vocab splits and a reduction.
    The CPU path (and impl="torch") is torch.argmax itself."""
    if not use_triton(x, impl):
        return x.argmax(dim=-1)
    global tl
    if tl is None:
        fused_ops._import_triton()
        tl = fused_ops.tl
    n, vocab = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    block = min(_BLOCK, _next_power_of_2(vocab))
    splits = num_splits if num_splits is not None else _default_splits(n, x.device)
    chunk = _cdiv(_cdiv(vocab, max(1, splits)), block) * block
    splits = _cdiv(vocab, chunk)
    part_val = torch.empty((n, splits), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((n, splits), dtype=torch.int32, device=x.device)
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    _argmax_partial[(n, splits)](x, x.stride(0), part_val, part_idx, vocab, chunk, splits, BLOCK=block)
    _race_reduce[(n,)](part_val, part_idx, out, splits, BLOCK_S=_next_power_of_2(splits))
    return out


def _default_splits(n: int, device: torch.device) -> int:
    """Vocab splits per row so that the grid holds ~4 programs per SM (one SM reading a whole
    128k-entry row would take tens of microseconds at batch 1)."""
    if device.type != "cuda":
        return 1
    return max(1, _cdiv(4 * _num_sms(device.index or 0), n))


@functools.cache
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _race_partial_kernel(
    x_ptr,
    stride_x,
    temp_ptr,
    seed_ptr,
    counter_ptr,
    val_ptr,  # [N, S] float32: the split's best score
    idx_ptr,  # [N, S] int32: its first index
    vocab,
    chunk,
    num_splits,
    SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, split) races vocab entries [split * chunk, min(vocab, (split + 1) * chunk)).
    Each lane keeps its best (score, index), taking a later index only on a strictly higher score,
    so the final min-index-among-maxima is torch.argmax's first index. The integer constants are
    the module's _C1, _C2, _GAMMA and masks, written out (a kernel can read no Python globals)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    t = tl.load(temp_ptr + row)
    sampled = t > 0.0
    # x * (1 / T), the reciprocal rounded as IEEE division rounds it (torch's): x / T per entry
    # would cost an IEEE division each, ~14% of the loop.
    inv_t = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.where(sampled, t, 1.0))
    # key = mix64(mix64(seed) + counter * GAMMA), as row_keys
    z = tl.load(seed_ptr + row)
    z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
    z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    z = z ^ ((z >> 31) & 0x1FFFFFFFF)
    z = z + tl.load(counter_ptr + row) * -7046029254386353131
    z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
    z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    key = z ^ ((z >> 31) & 0x1FFFFFFFF)
    start = split * chunk
    end = tl.minimum(start + chunk, vocab)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    off = start
    while off < end:  # (a `for` over runtime bounds does not run in Triton's interpreter)
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if sampled:
            if SCALE:
                s = s * inv_t
            # h_v = mix64(key + (v + 1) * GAMMA); U = (top 23 bits + 0.5) * 2^-23, as uniform_noise
            h = key + (cols + 1).to(tl.int64) * -7046029254386353131
            h = (h ^ ((h >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
            h = (h ^ ((h >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
            h = h ^ ((h >> 31) & 0x1FFFFFFFF)
            u = (((h >> 41) & 0x7FFFFF).to(tl.float32) + 0.5) * 1.1920928955078125e-07
            s = s + -tl.log(-tl.log(u))
        better = mask & ((s > best_val) | (best_idx == 2147483647))
        best_val = tl.where(better, s, best_val)
        best_idx = tl.where(better, cols, best_idx)
        off += BLOCK
    top = tl.max(best_val, axis=0)
    first = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)
    tl.store(val_ptr + row * num_splits + split, top)
    tl.store(idx_ptr + row * num_splits + split, first)


def _argmax_partial_kernel(x_ptr, stride_x, val_ptr, idx_ptr, vocab, chunk, num_splits, BLOCK: tl.constexpr):
    """Program (row, split): the best value of vocab entries [split * chunk, ...) and its first
    index, as _race_partial_kernel without the noise (the values are exact in float32)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk
    end = tl.minimum(start + chunk, vocab)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    off = start
    while off < end:
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
        better = mask & ((s > best_val) | (best_idx == 2147483647))
        best_val = tl.where(better, s, best_val)
        best_idx = tl.where(better, cols, best_idx)
        off += BLOCK
    top = tl.max(best_val, axis=0)
    first = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)
    tl.store(val_ptr + row * num_splits + split, top)
    tl.store(idx_ptr + row * num_splits + split, first)


def _race_reduce_kernel(val_ptr, idx_ptr, out_ptr, num_splits, BLOCK_S: tl.constexpr):
    """One program per row: the first index among the splits' maxima (splits are in vocab order)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_S)
    mask = j < num_splits
    val = tl.load(val_ptr + row * num_splits + j, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_splits + j, mask=mask, other=2147483647)
    top = tl.max(val, axis=0)
    first = tl.min(tl.where(val == top, idx, 2147483647), axis=0)
    tl.store(out_ptr + row, first.to(tl.int64))


_race_partial = _LazyKernel(_race_partial_kernel)
_race_reduce = _LazyKernel(_race_reduce_kernel)
_argmax_partial = _LazyKernel(_argmax_partial_kernel)
