"""Decode-attention bandwidth next to a device-to-device copy measured in the same run.

Decode attention is memory bound: each step reads every cached K/V byte of the batch
once. The figure of merit is achieved bytes/s over what ``dst.copy_(src)`` reaches on the
same GPU (counted as bytes read + written). Run: ``python -m kvrelay.worker.bench.attention``;
``--mixed --batch 64 --context 512 --chunk 256`` times a mixed step's attention both ways.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

from kvrelay.memory_model.verify.cuda_timing import median_cuda_ms

from ..attention import triton_kernels as tk
from ..attention import triton_prefill as tp
from ..attention.triton_backend import TritonPagedAttention


@functools.cache
def copy_bandwidth_gbps(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy of ``nbytes``, counted as bytes read + written; once per process."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_cuda_ms(lambda: dst.copy_(src), iters, warmup=3)
    return 2 * nbytes / ms / 1e6


def _graph_step_ms(steps: list[Callable[[], object]], iters: int) -> float:
    """Median GPU time of one step: all steps captured back to back in one CUDA graph (as
    the engine runs decode), so host launch overhead is out of the figure."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for step in steps:  # compile outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for step in steps:
            step()
    return median_cuda_ms(graph.replay, iters, warmup=3) / len(steps)


def bench_decode_attention(
    batch: int = 64,
    context: int = 2048,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 50,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_n: int | None = None,
) -> dict[str, float]:
    """Times one layer's decode attention (split kernel + reduce; no KV write) over
    ``batch`` sequences of ``context`` cached tokens on shuffled blocks."""
    device = torch.device("cuda")
    blocks_per_seq = -(-context // block_size)
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * elem
    # Successive steps read disjoint blocks, >= 512 MiB in all: a small batch's K/V must not
    # stay in L2 between steps, as it would not across a model's layers.
    copies = max(1, min(16, -(-(512 << 20) // kv_bytes)))
    num_blocks = copies * batch * blocks_per_seq
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(copies, batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    backend = TritonPagedAttention()
    splits = num_splits or backend.num_splits(
        device, batch, num_kv_heads, blocks_per_seq, block_size, head_dim
    )
    scratch = torch.empty(tk.decode_scratch_numel(batch, num_heads, splits, head_dim), device=device)
    tuning = {k: v for k, v in dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages).items() if v}

    def step(i: int) -> Callable[[], object]:
        return lambda: tk.decode_attention(
            q, cache, tables[i], seq_lens, head_dim**-0.5, splits, scratch, out, **tuning
        )

    ms = _graph_step_ms([step(i) for i in range(copies)], iters)
    nbytes = kv_bytes + 2 * q.numel() * elem
    attn_gbps = nbytes / ms / 1e6
    copy_gbps = copy_bandwidth_gbps()
    result = {
        "attn_ms": ms,
        "attn_gbps": attn_gbps,
        "copy_gbps": copy_gbps,
        "ratio": attn_gbps / copy_gbps,
        "num_splits": float(splits),
    }
    print(
        f"decode attention B={batch} ctx={context} H={num_heads}/{num_kv_heads} D={head_dim} "
        f"bs={block_size} {dtype}: {ms * 1e3:.1f} us, {attn_gbps:.0f} GB/s = "
        f"{100 * result['ratio']:.0f}% of copy ({copy_gbps:.0f} GB/s), splits={splits} {tuning}"
    )
    return result


def bench_prefill_attention(
    num_seqs: int = 4,
    prompt: int = 4096,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 10,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> dict[str, float]:
    """Fresh causal prompts through the Triton varlen kernel: achieved TFLOP/s (causal
    half of 4 * L^2 * H * D per sequence), next to a dense ``is_causal`` SDPA on the same
    shapes (no paging) as the bar."""
    device = torch.device("cuda")
    blocks = -(-prompt // block_size)
    num_blocks = num_seqs * blocks
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(num_seqs, blocks)
    seq_lens = torch.full((num_seqs,), prompt, dtype=torch.int32, device=device)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * prompt
    q = torch.randn(num_seqs * prompt, num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    cfg = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)

    def run() -> None:
        tp.prefill_attention(
            q,
            cache,
            tables,
            seq_lens,
            qsl,
            scale,
            block_m=block_m,
            block_n=block_n,
            num_warps=num_warps,
            num_stages=num_stages,
        )

    triton_ms = median_cuda_ms(run, iters, 2)
    qd = q.view(num_seqs, prompt, num_heads, head_dim).transpose(1, 2)
    kd = torch.randn(num_seqs, num_kv_heads, prompt, head_dim, dtype=dtype, device=device)
    sdpa_ms = median_cuda_ms(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kd, kd, is_causal=True, scale=scale, enable_gqa=True
        ),
        iters,
        2,
    )
    flops = 2 * num_seqs * prompt * prompt * num_heads * head_dim  # causal: half of 4 L^2 H D
    result = {"triton_tflops": flops / triton_ms / 1e9, "sdpa_tflops": flops / sdpa_ms / 1e9}
    print(
        f"prefill {num_seqs}x{prompt} H={num_heads}/{num_kv_heads} D={head_dim}: triton "
        f"{triton_ms:.2f} ms ({result['triton_tflops']:.0f} TFLOP/s), dense SDPA {sdpa_ms:.2f} ms "
        f"({result['sdpa_tflops']:.0f} TFLOP/s) {cfg}"
    )
    return result


def bench_mixed_attention(
    chunk: int = 256,
    decodes: int = 64,
    context: int = 512,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 50,
) -> dict[str, float]:
    """One layer's attention of a mixed step (no KV write): a fresh ``chunk``-token prompt beside
    ``decodes`` sequences decoding at ``context``, in a CUDA graph, both ways: the decode rows
    through the decode kernel plus the chunk through the prefill kernel (the backend's
    ``mixed_decode_kernel=True``), and everything through the prefill kernel (False). GB/s counts
    the decode rows' KV, which dominates the bytes."""
    device = torch.device("cuda")
    blocks_per_seq = -(-max(chunk, context) // block_size)
    elem = torch.finfo(dtype).bits // 8
    decode_kv_bytes = 2 * decodes * context * num_kv_heads * head_dim * elem
    # As in bench_decode_attention: successive steps read disjoint blocks, so the decodes' K/V
    # does not stay in L2 between steps as it would not across a model's layers.
    copies = max(1, min(16, -(-(512 << 20) // max(decode_kv_bytes, 1))))
    num_seqs = decodes + 1
    num_blocks = copies * num_seqs * blocks_per_seq
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(
        copies, num_seqs, blocks_per_seq
    )
    # Sequence 0 is the chunk (query rows 0..chunk-1), then one row per decode.
    seq_lens = torch.tensor([chunk] + [context] * decodes, dtype=torch.int32, device=device)
    qsl = torch.tensor([0, *range(chunk, chunk + decodes + 1)], dtype=torch.int32, device=device)
    q = torch.randn(chunk + decodes, num_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    scale = head_dim**-0.5

    def step(i: int, decode: bool, prefill: bool) -> Callable[[], object]:
        """Step i's launches (disjoint blocks per i): the decode rows' launch and/or the prefill
        launch, which leaves the decode rows alone exactly when the decode launch runs."""

        def run() -> None:
            if decode:
                tk.decode_rows_attention(q, cache, tables[i], seq_lens, qsl, scale, out)
            if prefill:
                tp.prefill_attention(q, cache, tables[i], seq_lens, qsl, scale, out, skip_decode_rows=decode)

        return run

    mixed_ms = _graph_step_ms([step(i, True, True) for i in range(copies)], iters)
    prefill_ms = _graph_step_ms([step(i, False, True) for i in range(copies)], iters)
    decode_rows_ms = _graph_step_ms([step(i, True, False) for i in range(copies)], iters)
    result = {
        "mixed_ms": mixed_ms,
        "prefill_kernel_ms": prefill_ms,
        "speedup": prefill_ms / mixed_ms,
        "decode_rows_ms": decode_rows_ms,
        "decode_kv_gbps": decode_kv_bytes / mixed_ms / 1e6,
        "prefill_kernel_decode_kv_gbps": decode_kv_bytes / prefill_ms / 1e6,
        "decode_rows_gbps": decode_kv_bytes / decode_rows_ms / 1e6,
    }
    print(
        f"mixed attention chunk={chunk} + {decodes} decodes at ctx={context} H={num_heads}/{num_kv_heads} "
        f"D={head_dim} bs={block_size} {dtype}: decode+prefill kernels {mixed_ms * 1e3:.1f} us "
        f"({result['decode_kv_gbps']:.0f} GB/s of decode KV; decode launch alone {decode_rows_ms * 1e3:.1f} us, "
        f"{result['decode_rows_gbps']:.0f} GB/s), prefill kernel only {prefill_ms * 1e3:.1f} us "
        f"({result['prefill_kernel_decode_kv_gbps']:.0f} GB/s): {result['speedup']:.2f}x"
    )
    return result


TUNE_SHAPES = [(1, 2048), (8, 2048), (8, 8192), (64, 2048), (64, 8192), (256, 2048)]


def tune_decode(
    shapes: list[tuple[int, int]] = TUNE_SHAPES, block_size: int = 16, top: int = 6
) -> dict[tuple[int, int], list[tuple[float, dict[str, int]]]]:
    """Times (splits, block_n, num_warps, num_stages) at each (batch, context); prints the
    default's figure and the fastest configs as (GB/s, config)."""
    results = {}
    for batch, context in shapes:
        default = bench_decode_attention(batch=batch, context=context, block_size=block_size, iters=20)
        rows = []
        for splits in (1, 2, 4, 8, 16, 32):
            for block_n in (32, 64, 128):
                for num_warps in (2, 4):
                    for num_stages in (2, 3):
                        if block_n < block_size:
                            continue
                        cfg = dict(
                            num_splits=splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages
                        )
                        try:
                            r = bench_decode_attention(
                                batch=batch,
                                context=context,
                                block_size=block_size,
                                iters=20,
                                num_splits=splits,
                                block_n=block_n,
                                num_warps=num_warps,
                                num_stages=num_stages,
                            )
                        except Exception as e:  # out of shared memory or registers: skip the config
                            print(f"{cfg}: {type(e).__name__}")
                            continue
                        rows.append((r["attn_gbps"], cfg))
        rows.sort(key=lambda x: -x[0])
        results[(batch, context)] = rows
        print(f"== B={batch} ctx={context}: default {default['attn_gbps']:.0f} GB/s, best:")
        for gbps, cfg in rows[:top]:
            print(f"   {gbps:8.0f} GB/s  {cfg}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tune", action="store_true", help="sweep launch configs at each shape")
    parser.add_argument("--prefill", action="store_true", help="time the prefill kernel instead")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="time a mixed step's attention (--chunk beside --batch decodes at --context) both ways",
    )
    parser.add_argument("--chunk", type=int, nargs="+", default=[256])
    args = parser.parse_args()
    shapes = [(batch, context) for batch in args.batch for context in args.context]
    if args.mixed:
        for chunk in args.chunk:
            for batch, context in shapes:
                bench_mixed_attention(chunk=chunk, decodes=batch, context=context, block_size=args.block_size)
        return
    if args.prefill:
        bench_prefill_attention(block_size=args.block_size)
        return
    if args.tune:
        tune_decode(shapes, args.block_size)
        return
    for batch, context in shapes:
        bench_decode_attention(batch=batch, context=context, block_size=args.block_size)


if __name__ == "__main__":
    main()
