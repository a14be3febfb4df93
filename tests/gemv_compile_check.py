"""Compiles the GEMV kernels for an H100/H200 (sm_90) without a GPU: Triton's bundled ptxas.

Run in its own process (tests/test_gemv.py does): the interpreter that the CPU tests use
patches triton.language for the whole process, after which nothing compiles. Prints one line
per compiled kernel: ``<dtype> <n> <k> <config> ok``, then ``<dtype> reduce ok``.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvrelay.worker.model import gemv
from kvrelay.worker.model.presets import PRESETS

SM90 = GPUTarget("cuda", 90, 32)


def preset_shapes() -> list[tuple[int, int]]:
    shapes = []
    for c in PRESETS.values():
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes += [
            (q + 2 * kv, c.hidden_size),
            (c.hidden_size, q),
            (2 * c.intermediate_size, c.hidden_size),
            (c.hidden_size, c.intermediate_size),
            (c.vocab_size, c.hidden_size),
        ]
    return shapes


def compile_gemv(kernel: triton.JITFunction, dtype: str, k: int, config: gemv.GemvConfig) -> None:
    k_per_split, split = gemv.split_plan(k, config)
    constexprs = {
        "K_PER_SPLIT": k_per_split,
        "HAS_BIAS": True,
        "SPLIT_K": split,
        "BLOCK_M": 16,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "DOT_PRECISION": "tf32",
    }
    signature = {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn")}
    signature |= {name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
    signature |= {"part_ptr": "*fp32"} | {name: "constexpr" for name in constexprs}
    src = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()},
    )
    triton.compile(src, target=SM90, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def main() -> None:
    gemv.tl = tl  # the kernels resolve `tl` in gemv's globals
    kernel = triton.jit(gemv._gemv_kernel)
    reduce = triton.jit(gemv._splitk_reduce_kernel)
    # bf16 only: fp16 takes the same code path. Shapes with the same compiled variant once.
    for dtype in ("bf16",):
        seen = set()
        for n, k in preset_shapes():
            config = gemv.heuristic_config(n, k, 132)  # an H200's SMs
            if (k, config) in seen:
                continue
            seen.add((k, config))
            compile_gemv(kernel, dtype, k, config)
            print(dtype, n, k, config, "ok", flush=True)
        src = ASTSource(
            fn=reduce,
            signature={
                "part_ptr": "*fp32",
                "b_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}",
                "MN": "i32",
                "N": "i32",
            }
            | {"HAS_BIAS": "constexpr", "SPLIT_K": "constexpr", "BLOCK": "constexpr"},
            constexprs={
                (reduce.arg_names.index(n),): v
                for n, v in {"HAS_BIAS": True, "SPLIT_K": 4, "BLOCK": 1024}.items()
            },
        )
        triton.compile(src, target=SM90, options={"num_warps": 4})
        print(dtype, "reduce ok", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
