"""Pool throughput through gRPC against the offline engine, on the same requests, in one run.

    python scripts/serve_vs_offline.py --model random:llama-3.2-1b --workers 1 --json out.json

1. offline: a subprocess runs `Engine.generate` on every request at once (the ceiling);
2. served: `kvrelay serve` with N workers (and `--router-processes`) as a subprocess, driven by
   `kvrelay bench serve` with `--client-processes` load-generator processes (one connection
   each, so every router process gets streams) at the same concurrency, prompt and output
   lengths (random token-id prompts of the same length, not the same ids);
3. the ratio of output tokens per second, and the serve process's CPU seconds per streamed
   token (router + Ray driver, from /proc), are printed and written as JSON;
4. issue 14 item 2: the engine's step time (mean/p50/p99 ms, from its own step-time histogram,
   worker/step_timer.py) offline and while served (the workers' histograms through
   GetServerStats, over the measured run only), and the workers' CPU per streamed token (engine
   loop thread, data-plane I/O thread, whole process);
5. latency at concurrency 1 (`--latency-requests`, prompt and output `--latency-len` tokens):
   served TTFT and TPOT p50 against the offline TTFT of one prompt of that length
   (`Engine.generate`, max_tokens 1, median of 5) and the offline batch-1 decode ms/token.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_process import serving


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
    profile = cProfile.Profile() if args.profile_dir else None
    cpu0, t0 = time.thread_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    outs = engine.generate(prompts, params)
    if profile is not None:
        profile.disable()
    dt, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    after = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    if profile is not None:
        profile.dump_stats(str(args.profile_dir / "offline.prof"))
    steps = step_time(
        after.step_time_counts, before.step_time_counts, after.step_time_sum_s - before.step_time_sum_s
    )
    doc = {
        "seconds": dt,
        "output_tokens": tokens,
        "tok_s": tokens / dt,
        "step_ms": steps,
        # the stepping thread's CPU, as the served worker's loop_cpu_us_per_token
        "loop_cpu_us_per_token": 1e6 * cpu / max(tokens, 1),
    }
    if args.latency_requests > 0:
        doc["latency"] = offline_latency(engine, args.latency_len)
    print(json.dumps(doc))


def offline_latency(engine: Any, length: int) -> dict[str, float]:
    """TTFT of one `length`-token prompt (max_tokens 1, median of 5) and batch-1 decode ms/token
    (a `length`-token generation less its TTFT, per token after the first; median of 3)."""
    from kvrelay.worker.sampling_params import SamplingParams

    prompt = requests(1, length, engine.model_config.vocab_size, seed=1)

    def timed(max_tokens: int) -> float:
        t0 = time.perf_counter()
        engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        return time.perf_counter() - t0

    timed(1), timed(8)  # warm-up
    ttft = sorted(timed(1) for _ in range(5))[2]
    full = sorted(timed(length) for _ in range(3))[1]
    return {"ttft_ms": 1e3 * ttft, "decode_ms_per_token": 1e3 * (full - ttft) / max(length - 1, 1)}


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


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process and of its live descendants (the router processes; Ray's own
    processes are not its children: the workers' CPU is reported by the workers)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


def bench_serve(
    address: str,
    *,
    concurrency: int,
    requests_n: int,
    input_len: int,
    output_len: int,
    client_processes: int,
    out: Path,
    connections: int = 1,
) -> dict[str, Any]:
    """`kvrelay bench serve` against the server: its metrics of the one point it measures."""
    cmd = [
        sys.executable, "-m", "kvrelay.cli", "bench", "serve", "--server", address,
        "--num-requests", str(requests_n), "--max-concurrency", str(concurrency),
        "--input-len", str(input_len), "--output-len", str(output_len), "--warmup-requests", "16",
        "--client-processes", str(client_processes), "--json", str(out), "--no-progress",
        "--connections", str(connections),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    point = json.loads(out.read_text())["points"][0]
    m = point["metrics"]
    return {
        "seconds": m["duration_s"],
        "output_tokens": m["output_tokens"],
        "tok_s": m["output_throughput"],
        "completed": m["completed"],
        "failed": m["failed"],
        "ttft_ms_p50": 1e3 * m["ttft"]["p50"],
        "tpot_ms_p50": 1e3 * m["tpot"]["p50"],
        "client_cpu": point.get("client_cpu"),
        "client_cpu_warning": point.get("client_cpu_warning"),
    }


def print_profiles(folder: Path, report: dict[str, Any]) -> None:
    """The loop thread's hottest functions offline and served, in µs per output token (cProfile
    slows Python-heavy code, so read the split, not the totals)."""
    for name, key in (("offline", "offline"), ("served.*", "served")):
        for f in sorted(folder.glob(f"{name}.prof")):
            tokens = report.get(key, {}).get("output_tokens", 0) or 1
            stats = pstats.Stats(str(f))
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]  # type: ignore[attr-defined]
            print(f"\n== {f.name}: top functions by own time, µs per output token (cumulative)")
            for (file, line, fn), (_, calls, tt, ct, _) in rows:
                where = f"{Path(file).name}:{line}({fn})"
                print(f"{1e6 * tt / tokens:9.2f} {1e6 * ct / tokens:9.2f} {calls:>9}  {where}")


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
    ap.add_argument("--router-processes", default="auto", help="kvrelay serve --router-processes")
    ap.add_argument("--stream-interval", type=int, default=1, help="kvrelay serve --stream-interval")
    ap.add_argument("--client-processes", default="4", help="load-generator processes (N or auto)")
    ap.add_argument(
        "--connections",
        type=int,
        default=8,
        help="gRPC connections per client process, so the streams reach every router process",
    )
    ap.add_argument("--latency-requests", type=int, default=16, help="concurrency-1 requests (0: skip)")
    ap.add_argument("--latency-len", type=int, default=256, help="their prompt and output tokens")
    ap.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="cProfile the offline generate and the served worker's loop thread into this folder",
    )
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
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
        "--latency-requests",
        str(args.latency_requests),
        "--latency-len",
        str(args.latency_len),
        *(["--profile-dir", str(args.profile_dir)] if args.profile_dir else []),
    ]
    report: dict[str, object] = {
        "model": args.model,
        "workers": args.workers,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "stream_interval": args.stream_interval,
    }
    if not args.skip_offline:
        out = subprocess.run(
            [sys.executable, __file__, "--offline", *common], capture_output=True, text=True, check=True
        )
        report["offline"] = json.loads(out.stdout.strip().splitlines()[-1])
    env = dict(os.environ)
    if args.profile_dir:
        env["KVRELAY_LOOP_PROFILE"] = str(args.profile_dir.resolve() / "loop")
    serve_args = [
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
        "--router-processes",
        str(args.router_processes),
        "--stream-interval",
        str(args.stream_interval),
    ]
    with serving(serve_args, env) as (address, serve_pid):
        from kvrelay.cluster.client import KvrelayClient

        with KvrelayClient(address) as c:
            stats0 = c.server_stats()  # includes bench serve's 16 warm-up requests
            cpu0 = tree_cpu_seconds(serve_pid)
            with tempfile.TemporaryDirectory() as tmp:
                served = bench_serve(
                    address,
                    concurrency=args.concurrency,
                    requests_n=args.requests,
                    input_len=args.prompt_len,
                    output_len=args.max_tokens,
                    client_processes=args.client_processes,
                    connections=args.connections,
                    out=Path(tmp) / "throughput.json",
                )
                # The server's processes and their children (router processes), from /proc.
                served["serve_cpu_ms_per_token"] = (
                    1e3 * (tree_cpu_seconds(serve_pid) - cpu0) / served["output_tokens"]
                )
                time.sleep(0.5)  # the workers' counters ride on their heartbeats (every 0.1 s)
                served.update(worker_figures(stats0, c.server_stats(), int(served["output_tokens"])))
                report["served"] = served
                if args.profile_dir:  # the loop dumps its profile when it goes idle, as now
                    for f in args.profile_dir.glob("loop.*"):
                        f.replace(args.profile_dir / f"served.{f.name.split('.')[-1]}.prof")
                if args.latency_requests > 0:
                    report["served_latency"] = bench_serve(
                        address,
                        concurrency=1,
                        requests_n=args.latency_requests,
                        input_len=args.latency_len,
                        output_len=args.latency_len,
                        client_processes=1,
                        out=Path(tmp) / "latency.json",
                    )
    if "offline" in report:
        report["served_vs_offline"] = report["served"]["tok_s"] / report["offline"]["tok_s"]  # type: ignore[index]
        served_step = report["served"]["step_ms"]["mean"]  # type: ignore[index]
        offline_step = report["offline"]["step_ms"]["mean"]  # type: ignore[index]
        report["step_time_served_vs_offline"] = served_step / offline_step if offline_step else None
        lat: Any = report.get("served_latency")
        off: Any = report["offline"].get("latency")  # type: ignore[attr-defined]
        if lat and off:
            report["tpot_vs_offline_decode"] = lat["tpot_ms_p50"] / off["decode_ms_per_token"]
            report["ttft_minus_offline_ms"] = lat["ttft_ms_p50"] - off["ttft_ms"]
    print(json.dumps(report, indent=2))
    if args.profile_dir:
        print_profiles(args.profile_dir, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
