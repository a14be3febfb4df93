"""Where a whole engine step's time goes on the GPU timeline: device busy, device idle, and which
host phase launched the kernel after each idle gap.

Unlike scripts/profile_decode.py (the synchronous step, phase by phase with syncs), this runs the
engine as it serves: overlapped scheduling on, `Engine.step()` in a loop. Three scenarios, each
under torch.profiler (CPU and CUDA activities, one Chrome trace each):

- decode at each --batches size (context --context);
- time to first token, `Engine.generate` of one --ttft-lens prompt with max_tokens 1;
- the mixed step of `kvrelay bench engine` (a --mixed CHUNK,DECODES step).

python scripts/profile_step.py --model random:llama-3.2-1b --batches 1,32,256 --ttft-lens 16,256 \
    --mixed 256,64 --json out/profile_step.json --trace-dir out/traces
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kvrelay.worker import engine as engine_module
from kvrelay.worker.bench.engine import _admit_decoding
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine
from kvrelay.worker.sampling_params import SamplingParams

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
PHASE = "phase:"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wrap(obj: Any, attr: str, label: str) -> None:
    """Run obj.attr under a record_function named phase:label (read back from the trace)."""
    fn = getattr(obj, attr)

    def wrapped(*a: Any, **k: Any) -> Any:
        with record_function(PHASE + label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def instrument(engine: Engine) -> None:
    _wrap(engine.scheduler, "schedule", "schedule")
    _wrap(engine.runner, "prepare", "prepare")
    _wrap(engine.runner, "execute", "execute")
    _wrap(engine.sampler, "sample", "sample")
    _wrap(engine_module, "resolve", "resolve")  # engine.py calls its own imported name
    _wrap(engine, "add_request", "add_request")


def analyse(trace: dict[str, Any], iters: int) -> dict[str, Any]:
    """Device busy and idle within the profiled window, per iteration, and the idle gaps' causes."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    dev = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    marks = [e for e in events if e.get("name", "").startswith("iter")]
    phases = [e for e in events if e.get("name", "").startswith(PHASE) and e.get("cat") == "user_annotation"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    if not dev or not marks:
        return {"error": "no device events or iteration marks in the trace"}
    t0, t1 = min(m["ts"] for m in marks), max(m["ts"] + m["dur"] for m in marks)

    def phase_at(ts: float) -> str:
        inner = [p for p in phases if p["ts"] <= ts <= p["ts"] + p["dur"]]
        return min(inner, key=lambda p: p["dur"])["name"][len(PHASE) :] if inner else "other"

    busy = 0.0
    gaps: list[dict[str, Any]] = []
    end = None
    prev_name = None
    kernel_time: dict[str, float] = defaultdict(float)
    kernel_calls: dict[str, int] = defaultdict(int)
    first_start = None
    for e in dev:
        s, d = e["ts"], e["dur"]
        if s + d < t0 or s > t1:
            continue
        first_start = s if first_start is None else first_start
        kernel_time[e["name"][:80]] += d
        kernel_calls[e["name"][:80]] += 1
        if end is not None and s > end + 2.0:
            launch = launches.get(e.get("args", {}).get("correlation"))
            gaps.append(
                {
                    "us": s - end,
                    "after": (prev_name or "")[:60],
                    "before": e["name"][:60],
                    "launched_by": phase_at(launch["ts"]) if launch else "?",
                    "launch_lag_us": (s - launch["ts"]) if launch else None,
                }
            )
        new_end = s + d if end is None else max(end, s + d)
        busy += new_end - max(s, end) if end is not None and s < end else d
        end = new_end
        prev_name = e["name"]
    window = t1 - t0
    by_cause: dict[str, float] = defaultdict(float)
    for g in gaps:
        by_cause[g["launched_by"]] += g["us"]
    phase_us: dict[str, float] = defaultdict(float)
    for p in phases:
        if t0 <= p["ts"] <= t1:
            phase_us[p["name"][len(PHASE) :]] += p["dur"]
    top = sorted(kernel_time.items(), key=lambda kv: -kv[1])[:15]
    return {
        "window_us_per_iter": window / iters,
        "device_busy_us_per_iter": busy / iters,
        "device_idle_us_per_iter": (window - busy) / iters,
        "host_before_first_device_us": (first_start - t0) if first_start is not None else None,
        "gap_us_per_iter_by_launcher": {k: v / iters for k, v in sorted(by_cause.items(), key=lambda kv: -kv[1])},
        "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:12],
        "host_phase_us_per_iter": {k: v / iters for k, v in phase_us.items()},
        "kernels_per_iter": sum(kernel_calls.values()) / iters,
        "top_kernels_us_per_iter": [{"name": n, "us": t / iters, "calls": kernel_calls[n] / iters} for n, t in top],
    }


def profiled(name: str, fn: Callable[[], None], iters: int, trace_dir: Path | None) -> dict[str, Any]:
    """Wall per iteration unprofiled (median), then the same iterations under the profiler."""
    walls = []
    for _ in range(iters):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        walls.append(1e6 * (time.perf_counter() - t))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            _sync()
            with record_function(f"iter{i}"):
                fn()
                _sync()
    path = Path(f"/tmp/profile_step_{name}.json")
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        with gzip.open(trace_dir / f"{name}.json.gz", "wt") as f:
            json.dump(trace, f)
    res = {"scenario": name, "wall_us_median": statistics.median(walls), **analyse(trace, iters)}
    print(
        f"{name:>14}: wall {res['wall_us_median']:8.1f} us | device busy {res.get('device_busy_us_per_iter', 0):8.1f}"
        f" idle {res.get('device_idle_us_per_iter', 0):7.1f} | kernels {res.get('kernels_per_iter', 0):6.1f}"
        f" | idle by launcher {json.dumps({k: round(v, 1) for k, v in res.get('gap_us_per_iter_by_launcher', {}).items()})}",
        flush=True,
    )
    return res


def decode_scenario(engine: Engine, batch: int, context: int, steps: int) -> Callable[[], None]:
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=engine.max_model_len - context - 1, ignore_eos=True)
    for i in range(batch):
        _admit_decoding(engine, f"p{batch}-{i}", [rng.randrange(vocab) for _ in range(context)], params)
    for _ in range(4):
        engine.step()

    def run() -> None:
        for _ in range(steps):
            engine.step()

    return run


def clear(engine: Engine) -> None:
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="decode steps per profiled iteration")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ttft-lens", default="16,256")
    ap.add_argument("--mixed", default="256,64")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--trace-dir", type=Path)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    engine = Engine(
        EngineConfig(
            model=args.model,
            max_model_len=args.context + 1200,  # decode room: iters x steps + warm-up steps
            max_num_seqs=max(256, *batches),
            enable_prefix_caching=False,
        )
    )
    instrument(engine)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": args.model, "scenarios": []}
    for b in batches:
        run = decode_scenario(engine, b, args.context, args.steps)
        res = profiled(f"decode_b{b}", run, args.iters, args.trace_dir)
        res["per_step_us"] = res["wall_us_median"] / args.steps
        report["scenarios"].append(res)
        clear(engine)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    for n in [int(x) for x in args.ttft_lens.split(",") if x]:
        params = SamplingParams(max_tokens=1, ignore_eos=True)

        def ttft(n: int = n, params: SamplingParams = params) -> None:
            engine.generate([[rng.randrange(vocab) for _ in range(n)]], params)

        ttft()
        report["scenarios"].append(profiled(f"ttft_{n}", ttft, args.iters, args.trace_dir))
    if args.mixed:
        chunk, decodes = (int(x) for x in args.mixed.split(","))
        decode_scenario(engine, decodes, args.context, 1)
        counter = iter(range(1_000_000))

        def mixed() -> None:
            engine.add_request(
                f"mixed-{next(counter)}", [rng.randrange(vocab) for _ in range(chunk)], SamplingParams(max_tokens=1)
            )
            engine.step()

        mixed()
        engine.step()
        report["scenarios"].append(profiled(f"mixed_{chunk}_{decodes}", mixed, args.iters, args.trace_dir))
        clear(engine)
    engine.check_integrity()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
