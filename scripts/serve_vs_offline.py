"""Pool throughput through gRPC against the offline engine, on the same requests, in one run.

    python scripts/serve_vs_offline.py --model random:llama-3.2-1b --workers 1 --json out.json

1. offline: a subprocess runs `Engine.generate` on every request at once (the ceiling);
2. served: `kvrelay serve` with N workers as a subprocess; this process streams the same
   requests through the asyncio client at a fixed concurrency;
3. the ratio of output tokens per second, and the serve process's CPU seconds per streamed
   token (router + Ray driver, from /proc), are printed and written as JSON;
4. issue 14 item 2: the engine's step time (mean/p50/p99 ms, from its own step-time histogram,
   worker/step_timer.py) offline and while served (the workers' histograms through
   GetServerStats, over the measured run only), and the workers' CPU per streamed token (engine
   loop thread, data-plane I/O thread, whole process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def requests(n: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]


def offline(args: argparse.Namespace) -> None:
    import torch

    from kvrelay.worker.config import EngineConfig
    from kvrelay.worker.engine import Engine
    from kvrelay.worker.sampling_params import SamplingParams

    if args.device == "cpu":
        # Ray starts a 1-CPU worker actor with OMP_NUM_THREADS=1: the same torch threads offline, or
        # the comparison is of thread counts, not of the serving path.
        torch.set_num_threads(1)
    engine = Engine(
        EngineConfig(
            model=args.model,
            device=args.device,
            max_num_seqs=args.concurrency,
            max_model_len=args.max_model_len,
        )
    )
    prompts = requests(args.requests, args.prompt_len, engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    engine.generate(prompts[:16], params)  # warm-up
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    before = engine.stats()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    after = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    steps = step_time(
        after.step_time_counts, before.step_time_counts, after.step_time_sum_s - before.step_time_sum_s
    )
    print(json.dumps({"seconds": dt, "output_tokens": tokens, "tok_s": tokens / dt, "step_ms": steps}))


def step_time(counts: Any, earlier: Any, sum_s: float) -> dict[str, float]:
    from kvrelay.worker.step_timer import diff, summarize

    s = summarize(diff(list(counts), list(earlier)), sum_s)
    return {"steps": s.steps, "mean": s.mean_ms, "p50": s.p50_ms, "p99": s.p99_ms}


def worker_figures(before: Any, after: Any, tokens: int) -> dict[str, object]:
    """Step time and CPU per token over the run, from two ServerStats (all workers summed)."""
    counts: list[int] = []
    earlier: list[int] = []
    sum_s = 0.0
    cpu = {"loop_cpu_s": 0.0, "io_cpu_s": 0.0, "process_cpu_s": 0.0}
    for b, a in zip(before.workers, after.workers, strict=True):
        ac, bc = list(a.step_time_counts), list(b.step_time_counts) or [0] * len(a.step_time_counts)
        counts = [x + y for x, y in zip(counts or [0] * len(ac), ac, strict=True)]
        earlier = [x + y for x, y in zip(earlier or [0] * len(bc), bc, strict=True)]
        sum_s += a.step_time_sum_s - b.step_time_sum_s
        for k in cpu:
            cpu[k] += getattr(a, k) - getattr(b, k)
    per_token = {k.replace("_cpu_s", "_cpu_us_per_token"): 1e6 * v / max(tokens, 1) for k, v in cpu.items()}
    return {"step_ms": step_time(counts, earlier, sum_s), **per_token}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def drive(address: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    from kvrelay.cluster.client import AsyncKvrelayClient

    prompts = requests(args.requests, args.prompt_len, vocab)
    async with AsyncKvrelayClient(address, timeout=600) as client:
        await asyncio.gather(
            *(client.generate(p, max_tokens=args.max_tokens, ignore_eos=True) for p in prompts[:16])
        )
        sem = asyncio.Semaphore(args.concurrency)
        counts: list[int] = []

        async def one(p: list[int]) -> None:
            async with sem:
                n = 0
                async for chunk in client.stream(p, max_tokens=args.max_tokens, ignore_eos=True):
                    n += len(chunk.token_ids)
                counts.append(n)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        dt = time.perf_counter() - t0
    return {"seconds": dt, "output_tokens": sum(counts), "tok_s": sum(counts) / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.offline:
        offline(args)
        return
    common = [
        "--model",
        args.model,
        "--device",
        args.device,
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        "--prompt-len",
        str(args.prompt_len),
        "--max-tokens",
        str(args.max_tokens),
        "--max-model-len",
        str(args.max_model_len),
    ]
    report: dict[str, object] = {
        "model": args.model,
        "workers": args.workers,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
    }
    if not args.skip_offline:
        out = subprocess.run(
            [sys.executable, __file__, "--offline", *common], capture_output=True, text=True, check=True
        )
        report["offline"] = json.loads(out.stdout.strip().splitlines()[-1])
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "serve",
            "--model",
            args.model,
            "--device",
            args.device,
            "--workers",
            str(args.workers),
            "--port",
            "0",
            "--max-num-seqs",
            str(args.concurrency),
            "--max-model-len",
            str(args.max_model_len),
            "--max-queued-requests",
            str(args.requests + 64),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline().strip()
        if not line.startswith("kvrelay serving on "):
            raise SystemExit(f"serve did not start: {line!r}")
        address = line.removeprefix("kvrelay serving on ")
        from kvrelay.cluster.client import KvrelayClient

        with KvrelayClient(address) as c:
            vocab = c.model_info().vocab_size
            stats0 = c.server_stats()  # after drive's warm-up would be better; the warm-up is 16 requests
            cpu0 = cpu_seconds(serve.pid)
            served: dict[str, Any] = dict(asyncio.run(drive(address, args, vocab)))
            served["serve_cpu_ms_per_token"] = 1e3 * (cpu_seconds(serve.pid) - cpu0) / served["output_tokens"]
            time.sleep(0.5)  # the workers' counters ride on their heartbeats (every 0.1 s)
            served.update(worker_figures(stats0, c.server_stats(), int(served["output_tokens"])))
        report["served"] = served
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    if "offline" in report:
        report["served_vs_offline"] = report["served"]["tok_s"] / report["offline"]["tok_s"]  # type: ignore[index]
        served_step = report["served"]["step_ms"]["mean"]  # type: ignore[index]
        offline_step = report["offline"]["step_ms"]["mean"]  # type: ignore[index]
        report["step_time_served_vs_offline"] = served_step / offline_step if offline_step else None
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
