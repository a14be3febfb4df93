"""The narrow-projection GEMV (worker/model/gemv.py) against F.linear and float64 math.

Without a GPU the kernel runs in Triton's interpreter, in float32, at small odd shapes that
exercise every mask (M < 16 rows padded, N not a multiple of BLOCK_N, K not a multiple of
BLOCK_K, a split whose tail is short). The ``gpu`` tests run bf16 over the 1B and 8B preset
shapes, inside a CUDA graph, and compare greedy decoding with the kernel on and off.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is first launched
pytest.importorskip("triton")

from engine_helpers import make_engine, random_prompts

from kvrelay.worker.model import gemv
from kvrelay.worker.model.gemv import GemvConfig, Linear, set_gemv_impl, triton_gemv
from kvrelay.worker.model.presets import PRESETS
from kvrelay.worker.sampling_params import SamplingParams

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def ref64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# (N, K, config): one pass; split-K with a short last split (K = 300 -> 128 + 128 + 44);
# split-K where K/split is not a tile multiple; wide tiles over a narrow N.
CPU_CASES = [
    (33, 70, GemvConfig(block_n=16, block_k=16, split_k=1)),
    (50, 300, GemvConfig(block_n=16, block_k=32, split_k=4)),
    (17, 129, GemvConfig(block_n=32, block_k=16, split_k=2)),
    (7, 48, GemvConfig(block_n=16, block_k=64, split_k=8)),  # K fits one tile: a single split
]


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(("n", "k", "config"), CPU_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear_float32(rows: int, n: int, k: int, config: GemvConfig, bias: bool) -> None:
    x = randn(rows, k, dtype=torch.float32, seed=1)
    w = randn(n, k, dtype=torch.float32, seed=2, scale=0.1)
    b = randn(n, dtype=torch.float32, seed=3) if bias else None
    got = triton_gemv(x, w, b, config)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), ref64(x, w, b), rtol=1e-5, atol=1e-5)


def test_gemv_strided_rows_leading_dims_and_empty() -> None:
    # The model passes views: rows of a wider buffer (stride > K), and [.., K] with leading dims.
    base = randn(4, 96, dtype=torch.float32, seed=4)
    x = base[:, 8:72]  # [4, 64], row stride 96
    w = randn(40, 64, dtype=torch.float32, seed=5)
    config = GemvConfig(block_n=16, block_k=32, split_k=2)
    torch.testing.assert_close(triton_gemv(x, w, None, config), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x3 = randn(2, 3, 64, dtype=torch.float32, seed=6)
    got = triton_gemv(x3, w, None, config)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, F.linear(x3, w), rtol=1e-5, atol=1e-5)
    assert triton_gemv(x[:0], w, None, config).shape == (0, 40)


def test_split_k_is_deterministic() -> None:
    x = randn(3, 300, dtype=torch.float32, seed=7)
    w = randn(50, 300, dtype=torch.float32, seed=8)
    config = GemvConfig(block_n=16, block_k=32, split_k=4)
    first = triton_gemv(x, w, None, config)
    assert torch.equal(first, triton_gemv(x, w, None, config))


def test_linear_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True).to(DEVICE)
    assert layer.impl == "torch"  # the default: nn.Linear's behaviour until the engine opts in
    layer.impl = "auto"
    # Same parameters and state-dict keys as nn.Linear: loaders and checkpoints are untouched.
    assert list(layer.state_dict()) == list(torch.nn.Linear(64, 40).state_dict()) == ["weight", "bias"]
    calls: list[GemvConfig] = []

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
        calls.append(config)
        return triton_gemv(x, w, b, config)

    monkeypatch.setattr(gemv, "triton_gemv", spy)
    small, wide = randn(8, 64, dtype=torch.float32, seed=9), randn(9, 64, dtype=torch.float32, seed=10)
    with torch.no_grad():
        want_small, want_wide = (
            F.linear(small, layer.weight, layer.bias),
            F.linear(wide, layer.weight, layer.bias),
        )
        torch.testing.assert_close(layer(small), want_small, rtol=1e-5, atol=1e-5)
        if DEVICE.type == "cpu":
            assert calls == []  # auto: F.linear on the CPU
        layer.impl = "triton"
        calls.clear()
        torch.testing.assert_close(layer(small), want_small, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1  # forced, 8 rows: the kernel
        assert torch.equal(layer(wide), want_wide)  # 9 rows: F.linear even when forced
        assert len(calls) == 1
        layer.impl = "torch"
        assert torch.equal(layer(small), want_small)
        assert len(calls) == 1


def test_set_gemv_impl_and_config_validation() -> None:
    model = torch.nn.Sequential(Linear(8, 8), torch.nn.ReLU(), Linear(8, 4), torch.nn.Linear(4, 4))
    assert set_gemv_impl(model, "torch") == 2
    assert [m.impl for m in model if isinstance(m, Linear)] == ["torch", "torch"]
    with pytest.raises(ValueError, match=r"gemv impl must be one of .* got 'cublas'"):
        set_gemv_impl(model, "cublas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split_k must be a power of two >= 1, got 3"):
        GemvConfig(split_k=3)
    with pytest.raises(ValueError, match=r"block_n and block_k must be >= 16 \(tl.dot\), got 8, 256"):
        GemvConfig(block_n=8)


def test_heuristic_splits_narrow_long_shapes() -> None:
    # 1B on 132 SMs: qkv (192 programs of 16 rows), o_proj and down_proj (128) are split until
    # there are >= 264 programs; gate_up and the vocabulary projection have programs enough.
    assert gemv.heuristic_config(3072, 2048, 132).split_k == 2
    assert gemv.heuristic_config(2048, 2048, 132).split_k == 4
    assert gemv.heuristic_config(2048, 8192, 132).split_k == 4
    assert gemv.heuristic_config(16384, 2048, 132).split_k == 1
    assert gemv.heuristic_config(128256, 2048, 132) == GemvConfig(block_n=64, split_k=1)
    assert gemv.heuristic_config(64, 300, 132).block_k == 256
    # Without a measured table, only weights up to 48 MiB take the kernel (cuBLAS is already
    # near bandwidth on large ones): 1B qkv / o_proj / down_proj yes, gate_up and lm_head no.
    cpu = torch.device("cpu")
    assert gemv.gemv_config(3072, 2048, cpu) == gemv.heuristic_config(3072, 2048, 4)
    assert gemv.gemv_config(2048, 8192, cpu) == gemv.heuristic_config(2048, 8192, 4)
    assert gemv.gemv_config(16384, 2048, cpu) is None
    assert gemv.gemv_config(128256, 2048, cpu) is None


def test_engine_tokens_with_forced_kernel_match_torch_path() -> None:
    # The tiny model end to end (prefill through F.linear, decode steps of <= 8 rows through the
    # kernel, interpreted on the CPU): float32 greedy tokens equal the F.linear path's.
    prompts = random_prompts(2, [5, 12], vocab=300, seed=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)  # the prefill step, then a decode step
    ref = make_engine()  # narrow_gemv off by default: every projection on F.linear
    assert {m.impl for m in ref.model.modules() if isinstance(m, Linear)} == {"torch"}
    assert {m.impl for m in make_engine(narrow_gemv=True).model.modules() if isinstance(m, Linear)} == {
        "auto"
    }
    want = [o.token_ids for o in ref.generate(prompts, params)]
    engine = make_engine()
    assert set_gemv_impl(engine.model, "triton") == 4 * 4 + 1
    got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == want
    engine.check_integrity()


def test_kernels_compile_for_sm90_at_preset_shapes() -> None:
    # The interpreter checks semantics; this checks the GPU compiler accepts the kernels
    # (tl.dot layouts, constexpr loops) at every preset shape's config, with no GPU present.
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("gemv_compile_check.py"))],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "bf16 reduce ok", proc.stdout
    assert len(lines) >= 6 and all(line.endswith(" ok") for line in lines), proc.stdout


# ---- GPU: bf16 at the preset shapes, in a CUDA graph; the engine with the kernel on and off ----


def preset_shapes() -> list[tuple[str, int, int]]:
    shapes = []
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        c = PRESETS[name]
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes += [
            (f"{name}/qkv", q + 2 * kv, c.hidden_size),
            (f"{name}/o_proj", c.hidden_size, q),
            (f"{name}/gate_up", 2 * c.intermediate_size, c.hidden_size),
            (f"{name}/down_proj", c.hidden_size, c.intermediate_size),
            (f"{name}/lm_head", c.vocab_size, c.hidden_size),
        ]
    return shapes


def check_bf16(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within half a bf16 ulp (2^-8 relative) of the float64 result, plus a float32
    accumulation slack (~sqrt(K) * 2^-24 of an O(1) output, far below 1e-4); and close to
    cuBLAS, which may itself reduce split-K partials in bf16
    (torch's allow_bf16_reduced_precision_reduction), so it is not the exact reference."""
    want64 = ref64(x, w, None)
    err = (got.double() - want64).abs()
    bound = want64.abs() * 2.0**-8 + 1e-4
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, beyond one bf16 rounding"
    torch.testing.assert_close(got, F.linear(x, w), rtol=1.6e-2, atol=1e-2)


@gpu
@pytest.mark.parametrize(("name", "n", "k"), preset_shapes(), ids=[s[0] for s in preset_shapes()])
def test_gpu_preset_shapes_bf16_in_cuda_graph(name: str, n: int, k: int) -> None:
    w = randn(n, k, dtype=torch.bfloat16, seed=11, scale=0.02)
    layer = Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.impl = "triton"
    static_x = torch.zeros(8, k, dtype=torch.bfloat16, device=DEVICE)
    for rows in (1, 4, 8):
        x = randn(rows, k, dtype=torch.bfloat16, seed=12 + rows)
        with torch.no_grad():
            eager = layer(x)
            check_bf16(eager, x, w)
            # Capture with other data in the static input, replay with x: the graph reads its input.
            view = static_x[:rows]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(view)
            view.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
        assert torch.equal(out, eager), f"{name}: replay differs from eager at {rows} rows"


@gpu
def test_gpu_engine_greedy_kernel_on_vs_off() -> None:
    # Random 1B preset weights, CUDA graphs, batches of 1 and 4 (graph buckets 1 and 4): greedy
    # tokens with the GEMV equal those of F.linear. Where bf16 accumulation order could flip
    # a near tie, the first differing step must be one: the reference's top two logprobs
    # there within 0.02 (stated, not hidden).
    common = {
        "model": "random:llama-3.2-1b",
        "device": "cuda",
        "dtype": "bfloat16",
        "num_kv_blocks": 256,
        "max_num_seqs": 8,
        "max_graph_batch_size": 8,
        "max_model_len": 256,
    }
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for on in (False, True):
        engine = make_engine(narrow_gemv=on, **common)
        picked = [
            m._gemv_config(torch.zeros(1, m.in_features, dtype=torch.bfloat16, device=DEVICE))
            for m in engine.model.modules()
            if isinstance(m, Linear)
        ]
        assert any(picked) == on, picked  # on: some projection runs the kernel; off: none
        runs[on] = [
            engine.generate(p, params)
            for p in (
                random_prompts(1, [17], 128000, seed=3),
                random_prompts(4, [9, 33, 20, 64], 128000, seed=4),
            )
        ]
        engine.check_integrity()
        del engine
        torch.cuda.empty_cache()
    for ref_outs, outs in zip(runs[False], runs[True], strict=True):
        for ref, out in zip(ref_outs, outs, strict=True):
            if out.token_ids == ref.token_ids:
                continue
            i = next(j for j, (a, b) in enumerate(zip(ref.token_ids, out.token_ids, strict=True)) if a != b)
            top = ref.logprobs[i].top
            # A near tie: within two bf16 ulps of the logprob (random weights give near-uniform
            # logprobs around -ln(vocab) ~ -11.8, where one bf16 ulp is 0.0625).
            ulp = 2.0 ** (math.floor(math.log2(abs(top[0][1]))) - 7)
            assert top[0][1] - top[1][1] <= 2 * ulp, f"tokens differ at step {i} without a near tie: {top}"
