# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""Fused elementwise ops of the decoder layer: one kernel launch each instead of 5 to 10.

* ``rms_norm``: RMSNorm of each row.
* ``fused_add_rms_norm``: ``residual += x`` then RMSNorm of the new residual (vLLM's residual
  pattern: the residual add of one sublayer is folded into the norm of the next).
* ``apply_rotary_``: Neox-style RoPE on q and k in place, reading the float32 cos/sin table
  by position; with Qwen3's per-head q/k RMSNorm folded in when its weights are given.
* ``silu_and_mul``: ``silu(gate) * up`` of the fused gate_up projection.

Each op has a Triton kernel and the PyTorch code it replaces, which is both the reference
and the CPU path. ``impl`` picks one: ``"auto"`` (Triton on CUDA tensors, PyTorch otherwise),
``"triton"`` (forced; on CPU tensors this needs ``TRITON_INTERPRET=1``), ``"torch"``.

Rounding follows transformers step by step: half-precision models round to the model dtype
wherever transformers' PyTorch ops would (after normalising, after each RoPE product, after
SiLU), with float32 in between, so that bf16 results match it to within an ulp rather than
drifting. All launches have static grids and allocate only shape-determined outputs, so
they can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .rope import apply_rotary

# Triton is imported at the first Triton launch, not with this module (which every model
# import pulls in): torch's CPU wheels ship no Triton, and importing triton.language before
# a test sets TRITON_INTERPRET=1 leaves its builtins compiled-only, which breaks every
# interpreted kernel of the session. The kernels below name `tl` as a module global, which
# is therefore bound once, by `_import_triton`, before any of them is decorated.
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton: Any = None
tl: Any = None

FusedImpl = Literal["auto", "triton", "torch"]
FUSED_IMPLS: tuple[FusedImpl, ...] = ("auto", "triton", "torch")
# Elements of one RoPE program's [heads, D/2] tile: enough work per program for large
# batches, few enough registers that a [32 heads, 64] tile does not spill.
_ROPE_TILE = 2048
_SILU_BLOCK = 1024


def use_triton(x: torch.Tensor, impl: FusedImpl) -> bool:
    """Whether ``impl`` runs the Triton kernel on ``x``'s device."""
    if impl == "auto":
        return x.is_cuda and HAS_TRITON
    if impl == "torch":
        return False
    if impl != "triton":
        raise ValueError(f"impl must be one of {FUSED_IMPLS}, got {impl!r}")
    if not HAS_TRITON:
        raise ValueError("impl 'triton' needs the triton package, which is not installed")
    return True


def _import_triton() -> None:
    global triton, tl
    if tl is None:
        triton = importlib.import_module("triton")
        tl = importlib.import_module("triton.language")


class _LazyKernel:
    """A kernel decorated with ``triton.jit`` at its first launch, not at import (see the
    note on `tl` above; ``triton.jit`` also reads TRITON_INTERPRET as it decorates). Kernels
    therefore call no other ``@triton.jit`` helpers: those would have to exist, decorated,
    when the kernel compiles."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._kernel: Any = None

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        if self._kernel is None:
            _import_triton()
            self._kernel = triton.jit(self.fn)
        return self._kernel[grid]


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- RMSNorm


def _rms_norm_kernel(
    x_ptr,
    res_ptr,  # read and written only when HAS_RESIDUAL
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row; the whole row sits in registers (BLOCK >= n_cols)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the model dtype before normalising, as transformers' `residual + h` is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


_rms_norm = _LazyKernel(_rms_norm_kernel)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: normalise in float32, round back to x's dtype, then scale (transformers'
    order, so half-precision results match it bit for bit)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.is_contiguous(), (weight.shape, n)
    x2 = x.reshape(-1, n)  # a view for the [T, hidden] activations the model passes
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    res2 = x2
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
        res2 = residual.view(-1, n)
        assert res2.stride(-1) == 1, residual.stride()
    block = _next_power_of_2(n)
    assert block <= 32768, f"rows of {n} do not fit one program's registers"
    num_warps = min(16, max(1, block // 256))
    _rms_norm[(x2.shape[0],)](
        x2,
        res2,
        weight,
        out,
        x2.stride(0),
        res2.stride(0),
        out.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: FusedImpl = "auto") -> torch.Tensor:
    """x [..., N], weight [N] -> RMSNorm(x) * weight, [..., N] in promote(x.dtype, weight.dtype)."""
    if not use_triton(x, impl):
        return rms_norm_torch(x, weight, eps)
    return _launch_rms_norm(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: FusedImpl = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] -> (RMSNorm(residual + x) * weight, residual + x).

    ``residual`` is updated in place and returned as the second element; x is left alone.
    """
    if not use_triton(x, impl):
        residual.add_(x)
        return rms_norm_torch(residual, weight, eps), residual
    return _launch_rms_norm(x, residual, weight, eps), residual


# --------------------------------------------------------------------------- RoPE


def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    q_w_ptr,  # per-head norm weights [D], read only when QK_NORM
    k_w_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_q_heads,
    num_kv_heads,
    eps,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    """Program (t, b) rotates heads [b * BLOCK_H, (b + 1) * BLOCK_H) of token t, counting q's
    heads then k's as one range, so a block may hold both. A row is loaded through q's
    pointers and k's with disjoint masks and the two summed (a masked load reads 0): one
    code path, no pointer select, no branch."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, HALF_PAD)  # [HALF_PAD]
    d_mask = d < HALF
    is_q = h < num_q_heads
    is_k = (h >= num_q_heads) & (h < num_q_heads + num_kv_heads)
    q_mask = is_q[:, None] & d_mask[None, :]
    k_mask = is_k[:, None] & d_mask[None, :]
    q_lo = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]  # [BLOCK_H, HALF_PAD]
    k_lo = k_ptr + t * stride_kt + (h - num_q_heads)[:, None] * stride_kh + d[None, :]
    dtype = q_ptr.dtype.element_ty
    x1 = tl.load(q_lo, mask=q_mask, other=0.0).to(tl.float32)
    x1 += tl.load(k_lo, mask=k_mask, other=0.0).to(tl.float32)
    x2 = tl.load(q_lo + HALF, mask=q_mask, other=0.0).to(tl.float32)
    x2 += tl.load(k_lo + HALF, mask=k_mask, other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.where(
            is_q[:, None],
            tl.load(q_w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :],
            tl.load(k_w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :],
        )
        w2 = tl.where(
            is_q[:, None],
            tl.load(q_w_ptr + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :],
            tl.load(k_w_ptr + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :],
        )
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d_mask, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + d, mask=d_mask, other=0.0)
    # cos/sin rounded to the model dtype first, and every product on its own: transformers' order.
    cos = cos.to(dtype).to(tl.float32)[None, :]
    sin = sin.to(dtype).to(tl.float32)[None, :]
    o1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(q_lo, o1.to(dtype), mask=q_mask)
    tl.store(q_lo + HALF, o2.to(dtype), mask=q_mask)
    tl.store(k_lo, o1.to(dtype), mask=k_mask)
    tl.store(k_lo + HALF, o2.to(dtype), mask=k_mask)


_rotary = _LazyKernel(_rotary_kernel)


def apply_rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    impl: FusedImpl = "auto",
) -> None:
    """Rotates q [T, H, D] and k [T, Hkv, D] in place, Neox style (pairs (i, i + D/2)).

    q and k may be strided views (the slices of a fused qkv output); only the last dim must
    be contiguous. positions [T] int64, each < len(cos_sin_cache); cos_sin_cache
    [max_len, D] float32 holds cos in columns [0, D/2) and sin in [D/2, D). With both norm
    weights ([D] each), every head is first RMS-normalised over D and scaled (Qwen3).
    """
    assert (q_norm_weight is None) == (k_norm_weight is None), "q and k norms come together"
    if use_triton(q, impl):
        _launch_rotary(q, k, positions, cos_sin_cache, q_norm_weight, k_norm_weight, norm_eps)
        return
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    q_in, k_in = q, k
    if q_norm_weight is not None and k_norm_weight is not None:
        q_in = rms_norm_torch(q, q_norm_weight, norm_eps)
        k_in = rms_norm_torch(k, k_norm_weight, norm_eps)
    q.copy_(apply_rotary(q_in, cos, sin))
    k.copy_(apply_rotary(k_in, cos, sin))


def _launch_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    norm_eps: float,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and k.dtype == q.dtype, (k.shape, q.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, (q.stride(), k.stride())
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(-1) == 1, cos_sin_cache.shape
    assert positions.shape == (num_tokens,), (positions.shape, num_tokens)
    if q_norm_weight is not None and k_norm_weight is not None:
        assert q_norm_weight.shape == k_norm_weight.shape == (head_dim,), (q_norm_weight.shape, head_dim)
        assert q_norm_weight.dtype == k_norm_weight.dtype == q.dtype, (q_norm_weight.dtype, q.dtype)
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = _next_power_of_2(half)
    total_heads = num_heads + num_kv_heads
    block_h = min(_next_power_of_2(total_heads), max(1, _ROPE_TILE // half_pad))
    q_w = q if q_norm_weight is None else q_norm_weight  # an unread stand-in pointer without norms
    k_w = q if k_norm_weight is None else k_norm_weight
    _rotary[(num_tokens, _cdiv(total_heads, block_h))](
        q,
        k,
        positions,
        cos_sin_cache,
        q_w,
        k_w,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        num_kv_heads,
        norm_eps,
        HALF=half,
        HALF_PAD=half_pad,
        BLOCK_H=block_h,
        QK_NORM=q_norm_weight is not None,
        num_warps=4,
    )


# --------------------------------------------------------------------------- SiLU and mul


def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    """Program (t, b) writes columns [b * BLOCK, (b + 1) * BLOCK) of row t."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # silu rounded to the model dtype before the product, as F.silu(gate) * up rounds.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, (act * up).to(dtype), mask=mask)


_silu_and_mul = _LazyKernel(_silu_and_mul_kernel)


def silu_and_mul(gate_up: torch.Tensor, *, impl: FusedImpl = "auto") -> torch.Tensor:
    """gate_up [T, 2I] (columns [gate | up]) -> silu(gate) * up, [T, I] in gate_up's dtype."""
    if not use_triton(gate_up, impl):
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return F.silu(gate) * up
    num_tokens, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(-1) == 1, (gate_up.shape, gate_up.stride())
    n = width // 2
    out = torch.empty(num_tokens, n, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    _silu_and_mul[(num_tokens, _cdiv(n, _SILU_BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=_SILU_BLOCK, num_warps=4
    )
    return out
