# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""Narrow projections at bandwidth: a Triton GEMV / split-K kernel for y = x @ W^T (+ b), x [M, K]
with M <= 8, and the ``Linear`` layer that picks it by shape.

At batch 1 to 8 a decode step's projections are matrix-vector products: each weight byte is
read once and used M times, so their floor is the weight bytes over the memory bandwidth.
cuBLAS picks tiles made for large M and, for the narrow shapes of a small model (qkv and o_proj
of a 2048-wide layer: 8 to 12 MB), launches too few CTAs to keep every SM's loads in flight;
issue 16 measured it at 1.4-2.2 TB/s on an H200 (4.0 TB/s copy).

The kernel: program (n, s) computes outputs [n * BLOCK_N, (n + 1) * BLOCK_N) of every row of x
over the K range of split s, streaming [BLOCK_N, BLOCK_K] tiles of W (contiguous along K, so
coalesced) through a ``num_stages``-deep pipeline; x's rows are padded to 16 for ``tl.dot``
(the tensor cores are idle in a memory-bound kernel; the padding costs registers, not bytes).
Accumulation is float32. With one split the program adds the bias and stores the output in
the model dtype. With ``split_k`` > 1 (K large next to N: o_proj, down_proj, so that there are
enough programs to fill the GPU) each split writes its float32 partial sums to a
[split_k, M, N] buffer, and a second kernel sums the splits in a fixed order, adds the bias
and rounds once: deterministic, unlike float atomics, so greedy tokens do not change from run
to run. That buffer is the only allocation besides the output: shape-determined, taken from the
caching allocator (from the graph's private pool under CUDA-graph capture), with no host sync,
so the layer is capturable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops
from .fused_ops import FUSED_IMPLS, FusedImpl, _cdiv, _LazyKernel, use_triton

# Bound at the first launch, as in fused_ops (see the note there): the kernels below resolve
# `tl` in this module's globals when they compile.
tl: Any = None

MAX_GEMV_ROWS = 8  # rows of x (tokens) up to which the GEMV path is considered
_ROWS_PAD = 16  # tl.dot's smallest M: x's rows are padded (masked) to it
_REDUCE_BLOCK = 1024
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of one shape. ``split_k`` splits K into that many slices of a multiple
    of ``block_k`` each; 1 means one pass with the bias in the epilogue."""

    block_n: int = 16
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "split_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        if self.block_n < 16 or self.block_k < 16:
            raise ValueError(
                f"block_n and block_k must be >= 16 (tl.dot), got {self.block_n}, {self.block_k}"
            )


# (N, K) -> the best config of an H200 sweep (scripts/bench_gemv.py), or None where cuBLAS is as
# fast at M = 1..8. Empty: the 2026-12-03 sweep found no shape where the kernel wins by more than
# 10% (1B qkv 0.86x, o_proj 0.98x, down_proj 1.09x, lm_head 1.10x; docs/BENCHMARKS.md), and
# end-to-end decode was 0.95x at batch 1, so `narrow_gemv` stays off.
H200_TABLE: dict[tuple[int, int], GemvConfig | None] = {}
# The prior for shapes not in the table: cuBLAS is latency-bound on small weights
# (issue 16's 1B profile: qkv 12.6 MB and o_proj 8.4 MB at 1.4-2.2 TB/s), and near the copy
# bandwidth on large ones (gate_up 67 MB at 3.7 TB/s, lm_head 525 MB at 4.4 TB/s), so the
# kernel is only picked for weights up to this size.
HEURISTIC_MAX_WEIGHT_BYTES = 48 << 20


def heuristic_config(n: int, k: int, num_sms: int) -> GemvConfig:
    """Enough programs to give every SM two or more (splitting K when N alone is too narrow),
    while keeping each split at least two K tiles long."""
    block_k = 256 if k >= 256 else max(16, fused_ops._next_power_of_2(k))
    block_n = 16 if n <= 16384 else 64
    programs = _cdiv(n, block_n)
    split = 1
    while split < 16 and programs * split < 2 * num_sms and k // (2 * split) >= 2 * block_k:
        split *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=4)


def gemv_config(n: int, k: int, device: torch.device) -> GemvConfig | None:
    """The config for W [n, k] (16-bit) on ``device``, or None where F.linear is the better choice."""
    if (n, k) in H200_TABLE and "H200" in _device_name(device):
        return H200_TABLE[(n, k)]
    if 2 * n * k > HEURISTIC_MAX_WEIGHT_BYTES:
        return None
    return heuristic_config(n, k, _num_sms(device))


@functools.cache
def _cuda_info(index: int) -> tuple[str, int]:
    """(name, SMs) of a CUDA device: read once per process, off the per-step path."""
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


def _device_info(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda":
        return ("cpu", 4)  # the interpreter: any small program count
    return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())


def _device_name(device: torch.device) -> str:
    return _device_info(device)[0]


def _num_sms(device: torch.device) -> int:
    return _device_info(device)[1]


# --------------------------------------------------------------------------- kernels


class _Kernel(_LazyKernel):
    """fused_ops' lazily decorated kernel, binding this module's `tl` first."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        global tl
        if tl is None:
            fused_ops._import_triton()
            tl = fused_ops.tl
        return super().__getitem__(grid)


def _gemv_kernel(
    x_ptr,  # [M, K], rows stride_xm apart, K contiguous
    w_ptr,  # [N, K], rows stride_wn apart, K contiguous
    b_ptr,  # [N], read only when HAS_BIAS (and SPLIT_K == 1)
    out_ptr,  # [M, N] contiguous, model dtype: written when SPLIT_K == 1
    part_ptr,  # [SPLIT_K, M, N] float32 contiguous: written when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K; constexpr: a static trip count
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (n, s): outputs [n * BLOCK_N, (n + 1) * BLOCK_N) of all M rows, K in
    [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):  # the split's K tiles; the last split's tail is masked
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_ptrs = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=out_mask)


_gemv = _Kernel(_gemv_kernel)


def _splitk_reduce_kernel(
    part_ptr,  # [SPLIT_K, M * N] float32
    b_ptr,  # [N], read only when HAS_BIAS
    out_ptr,  # [M * N], model dtype
    MN,
    N,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sums the splits in order 0..SPLIT_K-1 (a fixed order: the same bits every run)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_splitk_reduce = _Kernel(_splitk_reduce_kernel)


def split_plan(k: int, config: GemvConfig) -> tuple[int, int]:
    """-> (K per split, a multiple of block_k; splits actually launched, <= config.split_k:
    none is left empty when K is short)."""
    k_per_split = _cdiv(_cdiv(k, config.split_k), config.block_k) * config.block_k
    return k_per_split, _cdiv(k, k_per_split)


def triton_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig
) -> torch.Tensor:
    """x [..., K] (at most MAX_GEMV_ROWS rows), weight [N, K], bias [N] or None -> [..., N] in
    x's dtype, float32 accumulation. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    k = x.shape[-1]
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(-1) == 1, (weight.shape, weight.stride(), k)
    assert weight.dtype == x.dtype and x.dtype in _KERNEL_DTYPES, (weight.dtype, x.dtype)
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), None if bias is None else bias.shape
    x2 = x.reshape(-1, k)  # [M, K]; a view for the model's activations
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    assert m <= MAX_GEMV_ROWS, f"the GEMV kernel takes at most {MAX_GEMV_ROWS} rows, got {m}"
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    k_per_split, split = split_plan(k, config)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else weight  # an unread stand-in pointer without a bias
    _gemv[(_cdiv(n, config.block_n), split)](
        x2,
        weight,
        b,
        out,
        part,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        K_PER_SPLIT=k_per_split,
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_M=_ROWS_PAD,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        _splitk_reduce[(_cdiv(m * n, _REDUCE_BLOCK),)](
            part,
            b,
            out,
            m * n,
            n,
            HAS_BIAS=bias is not None,
            SPLIT_K=split,
            BLOCK=_REDUCE_BLOCK,
            num_warps=4,
        )
    return out.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------- the layer


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and loaders) whose forward runs the Triton
    GEMV for 1..MAX_GEMV_ROWS rows where that wins, and ``F.linear`` otherwise.

    ``impl``: "auto" (the GEMV on CUDA half-precision inputs of at most MAX_GEMV_ROWS rows on
    shapes where it beats cuBLAS, F.linear elsewhere and on the CPU), "triton" (the GEMV for
    every input of at most MAX_GEMV_ROWS rows; on CPU tensors it needs TRITON_INTERPRET=1),
    "torch" (always F.linear; the default, so a model built outside the engine behaves as
    nn.Linear). The engine sets "auto" when ``EngineConfig.narrow_gemv`` is on, with
    `set_gemv_impl`, before CUDA graphs are captured.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.impl: FusedImpl = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self._gemv_config(x)
        if config is None:
            return F.linear(x, self.weight, self.bias)
        return triton_gemv(x, self.weight, self.bias, config)

    def _gemv_config(self, x: torch.Tensor) -> GemvConfig | None:
        if self.impl == "torch" or not use_triton(x, self.impl):
            return None
        rows = x.numel() // max(1, x.shape[-1])
        if rows > MAX_GEMV_ROWS or x.dtype != self.weight.dtype or x.dtype not in _KERNEL_DTYPES:
            return None
        if self.weight.stride(-1) != 1:
            return None
        if not x.is_cuda:  # forced, interpreted: few large programs (its cost is per program)
            return GemvConfig(block_n=128, block_k=256, split_k=2)
        if self.impl == "triton":
            return heuristic_config(self.out_features, self.in_features, _num_sms(x.device))
        if x.dtype == torch.float32:  # auto: float32 models keep cuBLAS (the kernel is for bf16/fp16)
            return None
        return gemv_config(self.out_features, self.in_features, x.device)


def set_gemv_impl(model: nn.Module, impl: FusedImpl) -> int:
    """Sets ``impl`` on every `Linear` of ``model``; returns how many there are."""
    if impl not in FUSED_IMPLS:
        raise ValueError(f"gemv impl must be one of {FUSED_IMPLS}, got {impl!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.impl = impl
            count += 1
    return count
