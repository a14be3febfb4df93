"""Where a decode step's time goes: host phases, graph replay alone, and the kernels of one step.

python scripts/profile_decode.py --model random:llama-3.2-1b --batch 1 --context 512
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from kvrelay.worker.bench.engine import _admit_decoding
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine
from kvrelay.worker.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    engine = Engine(
        EngineConfig(
            model=args.model,
            max_model_len=args.context + 400,
            max_num_seqs=max(8, args.batch),
            enable_prefix_caching=False,
            kv_cache_memory=8 << 30,
            # The phases below are the synchronous step's, timed one by one; scripts/bench_overlap.py
            # compares whole steps with overlapped scheduling on and off.
            async_scheduling=False,
        )
    )
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    for i in range(args.batch):
        _admit_decoding(engine, f"r{i}", [1] * args.context, params)
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()

    # 1. Whole steps, as the bench times them.
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = 1e3 * (time.perf_counter() - t0) / args.steps

    # 2. The same phases, each synchronized (adds syncs, shows where host time goes).
    phases: dict[str, float] = defaultdict(float)
    runner, sched_ = engine.runner, engine.scheduler
    for _ in range(args.steps):
        t = time.perf_counter()
        sched = sched_.schedule()
        phases["schedule"] += time.perf_counter() - t
        t = time.perf_counter()
        inp = runner.prepare(sched, engine.allocator)
        torch.cuda.synchronize()
        phases["prepare+upload"] += time.perf_counter() - t
        t = time.perf_counter()
        logits = runner.execute(inp)
        torch.cuda.synchronize()
        phases["replay+lm_head"] += time.perf_counter() - t
        t = time.perf_counter()
        out = engine.sampler(
            logits,
            [s.request.params for s in sched.scheduled],
            seeds=[s.request.sampling_seed for s in sched.scheduled],
            counters=[s.request.num_output_tokens for s in sched.scheduled],
        )
        toks = out.token_ids.tolist()
        phases["sample+tolist"] += time.perf_counter() - t
        t = time.perf_counter()
        for s, tok in zip(sched.scheduled, toks, strict=True):
            s.request.num_computed_tokens += s.num_new_tokens
            engine.append_token(s.request, tok, None)
        phases["update"] += time.perf_counter() - t

    # 3. Graph replay alone, back to back, CUDA events.
    graphs = runner.graphs
    bucket = graphs.bucket_for(args.batch) if graphs else None
    replay_ms = float("nan")
    if graphs and bucket:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            graphs.graphs[bucket].replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / args.steps
    weights = sum(
        p.numel() * p.element_size() for p in {p.data_ptr(): p for p in engine.model.parameters()}.values()
    )
    print(f"{args.model} batch {args.batch} context {args.context} on {torch.cuda.get_device_name()}")
    print(f"  whole step            {step_ms:8.3f} ms")
    for k, v in phases.items():
        print(f"  {k:<20} {1e3 * v / args.steps:8.3f} ms")
    print(
        f"  graph replay alone    {replay_ms:8.3f} ms  (weights {weights / 1e9:.2f} GB -> {weights / replay_ms / 1e6:.0f} GB/s body+lm_head excl.)"
    )

    # 4. Kernels of one eager decode step (same kernels a replay runs).
    runner.graphs = None
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.step()
        torch.cuda.synchronize()
    runner.graphs = graphs
    events = [
        e
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0
    ]
    total = sum(getattr(e, "self_device_time_total", 0) for e in events)
    n = sum(e.count for e in events if getattr(e, "self_device_time_total", 0) > 0)
    print(f"  eager step: {n} kernel launches, {total / 1e3:.3f} ms of kernel time")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
