"""The fused elementwise ops (Triton) against their PyTorch reference path and float64 math.

Without a GPU the kernels run in Triton's interpreter at small, odd sizes. The interpreter
rounds float32 -> bfloat16 by truncation where the GPU rounds to nearest even; a fixture
swaps in round-to-nearest-even, after which bfloat16 results must match the PyTorch path
bit for bit nearly everywhere, on the CPU as on a GPU (the kernels round where transformers
rounds). The ``gpu`` tests sweep real model sizes and count the kernels of a decode step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is first launched
pytest.importorskip("triton")

from checkpoints import make_metadata, make_positions

from kvrelay.worker.attention.torch_backend import TorchPagedAttention
from kvrelay.worker.model import fused_ops
from kvrelay.worker.model.config import ModelConfig
from kvrelay.worker.model.llama import LlamaForCausalLM
from kvrelay.worker.model.presets import PRESETS
from kvrelay.worker.model.rope import RotaryEmbedding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
EPS = 1e-6
MAX_LEN = 512
gpu = pytest.mark.gpu


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def norm_weight(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    # Away from 1 so that a dropped or misindexed weight shows.
    return 1.0 + randn(n, dtype=dtype, seed=seed, scale=0.3)


def rope_table(head_dim: int, max_len: int = MAX_LEN) -> torch.Tensor:
    return RotaryEmbedding(head_dim, max_len, 10000.0, None).cos_sin_cache.to(DEVICE)


def _rtne_convert(original: Callable[..., Any]) -> Callable[..., Any]:
    """The interpreter's float conversion, with float32 -> bfloat16 rounded to nearest even."""
    import triton.language as tl

    def convert(data: np.ndarray, src: Any, dst: Any, rounding_mode: Any) -> np.ndarray:
        if src == tl.float32 and dst == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16)
        return original(data, src, dst, rounding_mode)

    return convert


if ON_GPU:
    EXACT_BF16 = True
else:
    import triton.runtime.interpreter as _interpreter

    # A private function: without it (another Triton version) bf16 is checked loosely.
    EXACT_BF16 = hasattr(_interpreter, "_convert_float")


@pytest.fixture(autouse=True)
def rtne_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not ON_GPU and EXACT_BF16:
        monkeypatch.setattr(_interpreter, "_convert_float", _rtne_convert(_interpreter._convert_float))
    yield


def check_close(got: torch.Tensor, want: torch.Tensor, min_exact: float = 0.99) -> None:
    """float32: tight. bfloat16: within bf16 rounding, and bit-exact nearly everywhere (an
    approximate rsqrt or exp may flip a rounding now and then)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape)
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    elif EXACT_BF16:
        # A flipped rounding before a cancellation (RoPE's a*cos - b*sin) leaves an error of
        # one ulp of the operands, not of the result: hence atol on the data's O(1) scale.
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=3e-2)
        exact = (got == want).float().mean().item()
        assert exact >= min_exact, f"bf16 rounding differs from the torch path on {1 - exact:.1%} of elements"
    else:  # truncating interpreter: a few ulps, compounding over 2-4 roundings
        torch.testing.assert_close(got, want, rtol=3e-2, atol=8e-2)


def rms_ref64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


DTYPES = [torch.float32, torch.bfloat16]
ROWS_COLS = [(1, 2048), (7, 96), (7, 2048), (300, 96)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), ROWS_COLS)
def test_rms_norm(dtype: torch.dtype, rows: int, cols: int) -> None:
    x, w = randn(rows, cols, dtype=dtype, seed=1, scale=3.0), norm_weight(cols, dtype, 2)
    got = fused_ops.rms_norm(x, w, EPS, impl="triton")
    check_close(got, fused_ops.rms_norm(x, w, EPS, impl="torch"))
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), rms_ref64(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), ROWS_COLS)
def test_fused_add_rms_norm(dtype: torch.dtype, rows: int, cols: int) -> None:
    x, w = randn(rows, cols, dtype=dtype, seed=3), norm_weight(cols, dtype, 4)
    residual = randn(rows, cols, dtype=dtype, seed=5, scale=2.0)
    x_before, ref_residual = x.clone(), residual.clone()
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, w, EPS, impl="triton")
    ref_out, ref_new = fused_ops.fused_add_rms_norm(x, ref_residual, w, EPS, impl="torch")
    assert new_residual is residual and torch.equal(x, x_before)  # in place on residual only
    if dtype == torch.float32 or EXACT_BF16:
        assert torch.equal(new_residual, ref_new)  # one float32 add, rounded once
    else:
        torch.testing.assert_close(new_residual, ref_new, rtol=1e-2, atol=1e-2)
    check_close(out, ref_out)
    if dtype == torch.float32:
        torch.testing.assert_close(ref_new, x_before + randn(rows, cols, dtype=dtype, seed=5, scale=2.0))
        torch.testing.assert_close(out.double(), rms_ref64(ref_new, w), rtol=1e-5, atol=1e-5)


def test_rms_norm_strided_rows_and_promoted_weight() -> None:
    base = randn(5, 200, dtype=torch.bfloat16, seed=6)
    x = base[:, 8:104]  # row stride 200
    w = norm_weight(96, torch.float32, 7)
    got = fused_ops.rms_norm(x, w, EPS, impl="triton")
    assert got.dtype == torch.float32  # bf16 normalised values times a float32 weight
    torch.testing.assert_close(got, fused_ops.rms_norm(x, w, EPS, impl="torch"), rtol=2e-2, atol=2e-2)


def qkv_views(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused [T, (H + 2 Hkv) D] tensor and its strided q [T, H, D], k, v [T, Hkv, D] views."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=seed)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (
        qkv,
        q.view(tokens, heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


def run_rope(
    impl: fused_ops.FusedImpl,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    positions: torch.Tensor,
    qk_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the fused qkv after RoPE on its q and k views, the same before)."""
    tokens, heads, kv_heads, head_dim = shape
    qkv, q, k, _ = qkv_views(tokens, heads, kv_heads, head_dim, dtype, seed=8)
    before = qkv.clone()
    weights = (norm_weight(head_dim, dtype, 9), norm_weight(head_dim, dtype, 10)) if qk_norm else (None, None)
    fused_ops.apply_rotary_(
        q,
        k,
        positions,
        rope_table(head_dim),
        q_norm_weight=weights[0],
        k_norm_weight=weights[1],
        norm_eps=EPS,
        impl=impl,
    )
    return qkv, before


def shuffled_positions(tokens: int, seed: int, max_len: int = MAX_LEN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(max_len, generator=gen)[:tokens].to(DEVICE)


# (T, H, Hkv, D): GQA, MQA with a wide head, a head_dim whose half is not a power of two.
ROPE_SHAPES = [(1, 4, 2, 64), (7, 8, 1, 128), (7, 6, 2, 96), (300, 4, 2, 64)]


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
def test_rotary_on_qkv_views(shape: tuple[int, int, int, int], dtype: torch.dtype, qk_norm: bool) -> None:
    tokens, heads, kv_heads, head_dim = shape
    positions = shuffled_positions(tokens, seed=tokens)
    got, before = run_rope("triton", shape, dtype, positions, qk_norm)
    want, _ = run_rope("torch", shape, dtype, positions, qk_norm)
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(got[:, v_start:], before[:, v_start:])  # v untouched
    check_close(got, want)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rotary_against_float64_rotation(impl: fused_ops.FusedImpl) -> None:
    # Pair (i, i + D/2) of every q and k head turns by the angle positions[t] * inv_freq[i].
    tokens, heads, kv_heads, head_dim = 5, 2, 1, 16
    positions = torch.tensor([9, 0, 4, 31, 2], device=DEVICE)
    got, before = run_rope(impl, (tokens, heads, kv_heads, head_dim), torch.float32, positions, False)
    half, rotated = head_dim // 2, (heads + kv_heads) * head_dim
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = positions.double()[:, None, None] * inv_freq.to(DEVICE)  # [T, 1, D/2]
    x = before[:, :rotated].double().view(tokens, heads + kv_heads, head_dim)
    x1, x2 = x[..., :half], x[..., half:]
    want = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    torch.testing.assert_close(got[:, :rotated].double(), want.view(tokens, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 96), (7, 2500), (300, 96)])
def test_silu_and_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=11, scale=2.0)
    got = fused_ops.silu_and_mul(gate_up, impl="triton")
    check_close(got, fused_ops.silu_and_mul(gate_up, impl="torch"))
    if dtype == torch.float32:
        g, u = gate_up.double().chunk(2, dim=-1)
        torch.testing.assert_close(got.double(), g * torch.sigmoid(g) * u, rtol=1e-5, atol=1e-5)


def test_auto_runs_torch_on_cpu_and_rejects_unknown_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    def launched(grid: object) -> None:
        raise AssertionError("a Triton kernel was launched for CPU tensors under impl='auto'")

    monkeypatch.setattr(fused_ops._LazyKernel, "__getitem__", lambda self, grid: launched(grid))
    x, w = torch.randn(3, 96), torch.ones(96)
    assert torch.equal(fused_ops.rms_norm(x, w, EPS), fused_ops.rms_norm_torch(x, w, EPS))
    assert fused_ops.silu_and_mul(torch.randn(2, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"impl must be one of .* got 'cuda'"):
        fused_ops.rms_norm(x, w, EPS, impl="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fused_impl must be one of .* got 'fast'"):
        LlamaForCausalLM(small_config("LlamaForCausalLM"), TorchPagedAttention(), "fast")  # type: ignore[arg-type]


# ---- the model wired through the fused ops ----


def small_config(arch: str) -> ModelConfig:
    return ModelConfig(
        architecture=arch,
        vocab_size=64,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=EPS,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=MAX_LEN,
        qk_norm=arch == "Qwen3ForCausalLM",
    )


def build_model(
    config: ModelConfig, impl: fused_ops.FusedImpl, dtype: torch.dtype, backend: object
) -> LlamaForCausalLM:
    """Deterministic weights (same for every impl); norm weights away from 1 so they count."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config, backend, fused_impl=impl)  # type: ignore[arg-type]
    with torch.no_grad():
        norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
        for seed, p in enumerate(norms):
            p.copy_(norm_weight(p.shape[0], p.dtype, seed=100 + seed))
    model.to(dtype).reset_rope_cache()
    return model.eval()


def kv_caches(config: ModelConfig, num_blocks: int, dtype: torch.dtype) -> list[torch.Tensor]:
    shape = (2, num_blocks, 16, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(config.num_hidden_layers)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_model_triton_path_matches_torch_path(arch: str, dtype: torch.dtype) -> None:
    # A packed prefill of two sequences, then a decode step of both.
    config = small_config(arch)
    steps = [[(0, 5), (0, 3)], [(5, 1), (3, 1)]]
    hidden = {}
    for impl in ("triton", "torch"):
        model = build_model(config, impl, dtype, TorchPagedAttention())
        caches, outs = kv_caches(config, 4, dtype), []
        with torch.inference_mode():
            for i, step in enumerate(steps):
                meta = make_metadata(step, 16, [[2], [1]], device=DEVICE)
                ids = torch.arange(meta.num_tokens, device=DEVICE) * 7 + i
                outs.append(model(ids, make_positions(step, DEVICE), caches, meta))
        hidden[impl] = torch.cat(outs)
    assert hidden["triton"].shape == (10, config.hidden_size)
    if dtype == torch.float32:
        torch.testing.assert_close(hidden["triton"], hidden["torch"], rtol=1e-4, atol=1e-4)
    elif not ON_GPU and EXACT_BF16:  # the kernels round where the torch path does
        assert torch.equal(hidden["triton"], hidden["torch"])
    else:  # a GPU's reduction order flips a rounding now and then, and the GEMMs spread it
        torch.testing.assert_close(hidden["triton"], hidden["torch"], rtol=5e-2, atol=5e-2)


# ---- on a GPU (skipped without one): real sizes, and the kernel budget of a decode step ----


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 33, 4096])
@pytest.mark.parametrize("cols", [2048, 4096, 8192])
def test_gpu_norms_real_sizes(dtype: torch.dtype, rows: int, cols: int) -> None:
    x, w = randn(rows, cols, dtype=dtype, seed=1), norm_weight(cols, dtype, 2)
    check_close(fused_ops.rms_norm(x, w, EPS, impl="triton"), fused_ops.rms_norm(x, w, EPS, impl="torch"))
    residual = randn(rows, cols, dtype=dtype, seed=3)
    ref_residual = residual.clone()
    out, new = fused_ops.fused_add_rms_norm(x, residual, w, EPS, impl="triton")
    ref_out, ref_new = fused_ops.fused_add_rms_norm(x, ref_residual, w, EPS, impl="torch")
    assert torch.equal(new, ref_new)
    check_close(out, ref_out)


@gpu
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("tokens", [1, 257, 4096])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 8, 64), (32, 8, 128), (64, 8, 128)])
def test_gpu_rotary_real_sizes(tokens: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool) -> None:
    shape = (tokens, heads, kv_heads, head_dim)
    positions = torch.randint(0, MAX_LEN, (tokens,), device=DEVICE)
    got, _ = run_rope("triton", shape, torch.bfloat16, positions, qk_norm)
    want, _ = run_rope("torch", shape, torch.bfloat16, positions, qk_norm)
    # Open: with the Qwen3 q/k norm folded in, an H200 gave ~80% bit-exact elements (all within
    # bf16 tolerance above), where the interpreter on CPU is bit-exact; not yet root-caused.
    check_close(got, want, min_exact=0.75 if qk_norm else 0.99)


@gpu
@pytest.mark.parametrize("tokens", [1, 257, 4096])
@pytest.mark.parametrize("inter", [8192, 14336])
def test_gpu_silu_and_mul_real_sizes(tokens: int, inter: int) -> None:
    gate_up = randn(tokens, 2 * inter, dtype=torch.bfloat16, seed=11, scale=2.0)
    check_close(fused_ops.silu_and_mul(gate_up, impl="triton"), fused_ops.silu_and_mul(gate_up, impl="torch"))


def cuda_kernel_names(fn: object) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()
    return [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
    ]


@gpu
def test_gpu_decode_step_kernel_budget() -> None:
    # A Llama-3.2-1B-shaped 2-layer model, batch-1 decode: each layer must stay at its
    # norm, qkv GEMM, rope, KV write + attention (+ split merge), o GEMM, add+norm, gate_up
    # GEMM, silu_and_mul, down GEMM, with no stray elementwise kernels.
    from kvrelay.worker.attention.triton_backend import TritonPagedAttention

    layers = 2
    config = dataclasses.replace(PRESETS["llama-3.2-1b"], num_hidden_layers=layers, vocab_size=1024)
    model = build_model(config, "auto", torch.bfloat16, TritonPagedAttention())
    caches = kv_caches(config, 16, torch.bfloat16)
    step = [(100, 1)]
    meta = make_metadata(step, 16, [list(range(1, 8))], device=DEVICE)
    ids, positions = torch.tensor([5], device=DEVICE), make_positions(step, DEVICE)

    def run() -> None:
        with torch.inference_mode():
            model(ids, positions, caches, meta)

    run()  # compile the kernels and warm cuBLAS outside the profile
    names = cuda_kernel_names(run)
    listing = "\n".join(names)
    assert sum("_rms_norm_kernel" in n for n in names) == 2 * layers + 1, listing
    assert sum("_rotary_kernel" in n for n in names) == layers, listing
    assert sum("_silu_and_mul_kernel" in n for n in names) == layers, listing
    assert not [n for n in names if "elementwise" in n], listing
    assert len(names) <= 12 * layers + 4, f"{len(names)} kernels:\n{listing}"
