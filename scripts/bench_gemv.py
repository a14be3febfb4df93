"""Narrow projections and the batch-256 profile (issue 16, items 5 and 6), in one run.

python scripts/bench_gemv.py --json out.json

1. Kernel sweep: every 1B / 8B projection shape at M = 1, 4, 8: cuBLAS (F.linear), the GEMV's
   shape heuristic, and the best of a small config sweep; microseconds and TB/s (weight bytes
   over time). Each point is a CUDA graph over enough weight copies to exceed the L2 (as in a
   decode step, where every layer's weights are new), replayed many times, CUDA events.
2. Decode ms/token of the 1B preset at batch 1 and 32, context 512, CUDA graphs, with the
   GEMV on and off (two engines), plus the graph replay alone.
3. One 1B decode step at batch 256, context 512: the top kernels by GPU time and their share,
   kernel groups, and the achieved MBU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kvrelay.worker.bench.engine import (
    _admit_decoding,
    _kv_bytes_per_token,
    _weight_bytes,
    copy_bandwidth,
    measure_decode,
)
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine
from kvrelay.worker.model.gemv import GemvConfig, heuristic_config, triton_gemv
from kvrelay.worker.model.presets import PRESETS
from kvrelay.worker.sampling_params import SamplingParams

log = logging.getLogger("kvrelay")
ROWS = (1, 4, 8)
L2_FLUSH_BYTES = 256 << 20  # weight copies per graph: well past the H200's 50 MB L2


def preset_shapes() -> list[tuple[str, int, int]]:
    out = []
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        c = PRESETS[name]
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        short = "1B" if "1b" in name else "8B"
        out += [
            (f"{short} qkv", q + 2 * kv, c.hidden_size),
            (f"{short} o_proj", c.hidden_size, q),
            (f"{short} gate_up", 2 * c.intermediate_size, c.hidden_size),
            (f"{short} down_proj", c.hidden_size, c.intermediate_size),
            (f"{short} lm_head", c.vocab_size, c.hidden_size),
        ]
    return out


def graph_time_us(
    fn: Callable[[torch.Tensor], torch.Tensor], weights: list[torch.Tensor], reps: int
) -> float:
    """Microseconds per call of fn over each weight copy in turn, from a CUDA graph replayed `reps` times."""
    for w in weights[:2]:
        fn(w)  # compile / pick cuBLAS kernels outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (reps * len(weights))


def candidates(n: int, k: int, num_sms: int) -> list[GemvConfig]:
    """(block_n, split_k) over programs from ~1x to ~8x the SMs, each split >= 2 tiles of 256."""
    out = []
    for block_n in (16, 32, 64):
        for split in (1, 2, 4, 8):
            programs = math.ceil(n / block_n) * split
            if split > 1 and (programs > 8 * num_sms or k // split < 512):
                continue
            out.append(GemvConfig(block_n=block_n, block_k=256, split_k=split))
    return out


def sweep_shape(name: str, n: int, k: int, num_sms: int, deadline: float, reps: int) -> dict[str, Any]:
    dtype, dev = torch.bfloat16, torch.device("cuda")
    nbytes = n * k * 2
    copies = max(1, min(32, math.ceil(L2_FLUSH_BYTES / nbytes)))
    gen = torch.Generator(dev).manual_seed(0)
    weights = [(torch.randn(n, k, device=dev, generator=gen) * 0.02).to(dtype) for _ in range(copies)]
    xs = {m: torch.randn(m, k, device=dev, generator=gen).to(dtype) for m in ROWS}
    row: dict[str, Any] = {"shape": name, "n": n, "k": k, "weight_bytes": nbytes, "copies": copies}

    def times(make: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]) -> dict[int, float]:
        return {m: graph_time_us(make(xs[m]), weights, reps) for m in ROWS}

    def check(cfg: GemvConfig) -> float:
        """Max |kernel - cuBLAS| over M = 8 relative to the output scale (bf16 ulps ~ 4e-3)."""
        want = F.linear(xs[8], weights[0])
        got = triton_gemv(xs[8], weights[0], None, cfg)
        return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

    row["cublas_us"] = times(lambda x: lambda w: F.linear(x, w))
    heur = heuristic_config(n, k, num_sms)
    row["heuristic"] = {
        "config": heur.__dict__,
        "us": times(lambda x: lambda w: triton_gemv(x, w, None, heur)),
    }
    best_cfg, best = heur, row["heuristic"]["us"]
    swept = 0
    for cfg in candidates(n, k, num_sms):
        if time.perf_counter() > deadline:
            row["sweep_truncated"] = True
            break
        if cfg == heur:
            continue
        t = times(lambda x, c=cfg: lambda w: triton_gemv(x, w, None, c))
        swept += 1
        if sum(t.values()) < sum(best.values()):
            best_cfg, best = cfg, t
    for warps, stages in ((2, 4), (8, 4), (4, 3), (4, 6)):  # around the best tile
        if time.perf_counter() > deadline:
            break
        cfg = GemvConfig(best_cfg.block_n, best_cfg.block_k, best_cfg.split_k, warps, stages)
        t = times(lambda x, c=cfg: lambda w: triton_gemv(x, w, None, c))
        swept += 1
        if sum(t.values()) < sum(best.values()):
            best_cfg, best = cfg, t
    row["best"] = {"config": best_cfg.__dict__, "us": best, "rel_err_vs_cublas": check(best_cfg)}
    row["configs_swept"] = swept
    return row  # the weight copies go with this frame


def print_sweep(rows: list[dict[str, Any]], header: bool) -> None:
    if header:
        print("\n## kernel sweep (bf16, us per call; TB/s = weight bytes / time)")
        print(
            f"{'shape':<13} {'M':>2} {'cuBLAS us':>9} {'TB/s':>5} {'heur us':>8} {'TB/s':>5} {'best us':>8} {'TB/s':>5} {'speedup':>11}  best config"
        )
    for r in rows:
        b = r["best"]
        c = b["config"]
        desc = f"bn{c['block_n']} bk{c['block_k']} split{c['split_k']} w{c['num_warps']} s{c['num_stages']}"
        for m in ROWS:
            cu, he, be = r["cublas_us"][m], r["heuristic"]["us"][m], b["us"][m]
            tb = [r["weight_bytes"] / us / 1e6 for us in (cu, he, be)]  # bytes/us -> TB/s
            print(
                f"{r['shape']:<13} {m:>2} {cu:>9.2f} {tb[0]:>5.2f} {he:>8.2f} {tb[1]:>5.2f} "
                f"{be:>8.2f} {tb[2]:>5.2f} {cu / be:>10.2f}x  {desc if m == 1 else ''}"
            )
        print(
            f"{'':<13}    (rel. err vs cuBLAS {b['rel_err_vs_cublas']:.1e}, {r['configs_swept']} configs swept)"
        )


def decode_on_off(
    model: str, batches: list[int], context: int, steps: int, copy_bw: float
) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {b: {"batch": b} for b in batches}
    for on in (False, True):
        engine = Engine(
            EngineConfig(
                model=model,
                max_model_len=context + steps + 16,
                max_num_seqs=max(batches),
                max_num_batched_tokens=max(2048, max(batches)),
                enable_prefix_caching=False,
                kv_cache_memory=4 << 30,
                narrow_gemv=on,
            )
        )
        kv_tok, weights = _kv_bytes_per_token(engine), _weight_bytes(engine)
        key = "on" if on else "off"
        for b in batches:
            t = min(measure_decode(engine, b, context, steps) for _ in range(2))
            graphs = engine.runner.graphs
            assert graphs is not None
            graph = graphs.graphs[graphs.bucket_for(b) or 0]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            rows[b][f"{key}_ms"] = 1e3 * t
            rows[b][f"{key}_replay_ms"] = start.elapsed_time(end) / steps
            rows[b][f"{key}_mbu"] = (weights + b * context * kv_tok) / t / copy_bw
        engine.check_integrity()
        del engine
        torch.cuda.empty_cache()
    print(f"\n## {model} decode, context {context}, CUDA graphs, async scheduling (default), GEMV off vs on")
    print(
        f"{'batch':>5} {'off ms':>7} {'on ms':>7} {'speedup':>7} {'MBU off':>7} {'MBU on':>7} {'replay off':>10} {'replay on':>9}"
    )
    for r in rows.values():
        print(
            f"{r['batch']:>5} {r['off_ms']:>7.3f} {r['on_ms']:>7.3f} {r['off_ms'] / r['on_ms']:>6.2f}x "
            f"{r['off_mbu']:>7.1%} {r['on_mbu']:>7.1%} {r['off_replay_ms']:>10.3f} {r['on_replay_ms']:>9.3f}"
        )
    return list(rows.values())


def kernel_table(prof: Any, top: int) -> tuple[float, list[tuple[str, int, float]]]:
    """-> (total kernel us, [(name, calls, us)] by GPU time) of a profile's device events."""
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0 and e.device_type.name == "CUDA":
            rows.append((e.key, e.count, float(us)))
    rows.sort(key=lambda r: -r[2])
    return sum(r[2] for r in rows), rows[:top] if top else rows


def group_of(name: str) -> str:
    n = name.lower()
    for group, keys in (
        ("attention", ("attn", "attention", "paged", "decode_kernel", "reduce_segments", "merge")),
        ("gemm/gemv", ("gemm", "gemv", "xmma", "cutlass", "splitk", "sm90", "ampere")),
        ("norm", ("rms_norm",)),
        ("rope", ("rotary",)),
        ("silu", ("silu",)),
        ("kv write", ("reshape_and_cache", "store_kv", "cache")),
    ):
        if any(k in n for k in keys):
            return group
    return "other"


def profile_batch(model: str, batch: int, context: int, copy_bw: float, top: int) -> dict[str, Any]:
    engine = Engine(
        EngineConfig(
            model=model,
            max_model_len=context + 64,
            max_num_seqs=batch,
            max_num_batched_tokens=max(2048, batch),
            enable_prefix_caching=False,
            kv_cache_memory=8 << 30,
            async_scheduling=False,  # one whole step inside the profile
        )
    )
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    for i in range(batch):
        _admit_decoding(engine, f"p{i}", [1 + (i * 7 + j) % 1000 for j in range(context)], params)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / 10
    out: dict[str, Any] = {"batch": batch, "context": context, "step_ms": 1e3 * step_s}
    step_bytes = _weight_bytes(engine) + batch * (context + 13) * _kv_bytes_per_token(engine)
    out["mbu"] = step_bytes / step_s / copy_bw
    out["step_gb"] = step_bytes / 1e9
    for label, graphs in (("graphed", engine.runner.graphs), ("eager", None)):
        saved = engine.runner.graphs
        engine.runner.graphs = graphs
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            engine.step()
            torch.cuda.synchronize()
        engine.runner.graphs = saved
        total, rows = kernel_table(prof, 0)
        groups: dict[str, float] = defaultdict(float)
        for name, _, us in rows:
            groups[group_of(name)] += us
        out[label] = {
            "kernel_us": total,
            "top": rows[:top],
            "groups": dict(groups),
            "launches": sum(r[1] for r in rows),
        }
    engine.check_integrity()
    print(f"\n## {model} decode step, batch {batch}, context {context} (sync step, CUDA graphs)")
    print(
        f"whole step {out['step_ms']:.3f} ms; bytes a step reads {out['step_gb']:.2f} GB "
        f"(weights + KV) -> MBU {out['mbu']:.1%} of {copy_bw / 1e12:.2f} TB/s"
    )
    for label in ("graphed", "eager"):
        p = out[label]
        print(f"\n{label} step: {p['launches']} kernels, {p['kernel_us'] / 1e3:.3f} ms of kernel time")
        if not p["kernel_us"]:
            print("  (the profiler saw no kernels: graph replays are not traced on this setup)")
            continue
        for g, us in sorted(p["groups"].items(), key=lambda kv: -kv[1]):
            print(f"  group {g:<11} {us / 1e3:8.3f} ms {us / p['kernel_us']:6.1%}")
        print(f"  {'kernel':<90} {'calls':>5} {'ms':>8} {'share':>6}")
        for name, calls, us in p["top"]:
            print(f"  {name[:90]:<90} {calls:>5} {us / 1e3:>8.3f} {us / p['kernel_us']:>6.1%}")
    del engine
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep-budget-s", type=float, default=55.0, help="stop sweeping configs after this")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: sweep,decode,profile")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    skip = set(args.skip.split(","))
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    copy_bw = copy_bandwidth(dev)
    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, copy {copy_bw / 1e12:.2f} TB/s"
    )
    result: dict[str, Any] = {"device": props.name, "copy_bw": copy_bw}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    def section(name: str, fn: Callable[[], Any]) -> None:
        """One failing section (printed) leaves the others to run: the device time is scarce."""
        if name in skip:
            return
        try:
            result[name] = fn()
        except Exception:
            traceback.print_exc()
            result[name] = "failed"
        save()

    def sweep() -> list[dict[str, Any]]:
        deadline = time.perf_counter() + args.sweep_budget_s
        rows = []
        for name, n, k in preset_shapes():
            rows.append(sweep_shape(name, n, k, props.multi_processor_count, deadline, args.reps))
            print_sweep(rows[-1:], header=len(rows) == 1)
            torch.cuda.empty_cache()
        return rows

    section("sweep", sweep)
    section("profile", lambda: profile_batch("random:llama-3.2-1b", 256, 512, copy_bw, 15))
    section("decode", lambda: decode_on_off("random:llama-3.2-1b", [1, 32], 512, args.steps, copy_bw))


if __name__ == "__main__":
    main()
