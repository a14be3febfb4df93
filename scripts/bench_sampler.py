"""The sampler alone, old (per-request torch.Generators, scripts/legacy_sampler.py) against new
(counter-based noise, one upload, the fused Triton draw), side by side in one run.

For each workload and batch size, one call of `sample` (tokens left on the device, as the
overlapped engine uses it) is timed with CUDA events around it (device time, which includes the
host's launch time whenever the GPU waits for it) and with the host clock (the call's own cost on
the critical path); medians of --reps calls after --warmup. Logits are float32 [batch, vocab], as
the model runner hands them over.

    PYTHONPATH=$PWD python scripts/bench_sampler.py                    # writes $OUT/bench_sampler.json if OUT is set
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from legacy_sampler import Sampler as LegacySampler

from kvrelay.worker.sampler import Sampler
from kvrelay.worker.sampling_params import SamplingParams

log = logging.getLogger("bench_sampler")

# workload -> the params of row i
WORKLOADS: dict[str, Callable[[int], SamplingParams]] = {
    "greedy": lambda i: SamplingParams(),
    "temperature, unseeded": lambda i: SamplingParams(temperature=0.8),
    "temperature, seeded": lambda i: SamplingParams(temperature=0.8, seed=1000 + i),
    "top-p / top-k, seeded": lambda i: (
        SamplingParams(temperature=0.8, top_p=0.9, seed=i)
        if i % 2 == 0
        else SamplingParams(temperature=0.8, top_k=50, seed=i)
    ),
}


def _time(fn: Callable[[], object], warmup: int, reps: int) -> tuple[float, float]:
    """(median device ms by CUDA events, median host ms) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    device_ms, host_ms = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - t) * 1e3)
        end.record()
        end.synchronize()
        device_ms.append(start.elapsed_time(end))
    return statistics.median(device_ms), statistics.median(host_ms)


def bench_one(workload: str, batch: int, vocab: int, warmup: int, reps: int) -> dict[str, object]:
    device = torch.device("cuda")
    logits = torch.randn(batch, vocab, device=device, generator=torch.Generator(device).manual_seed(batch))
    params = [WORKLOADS[workload](i) for i in range(batch)]
    # Old: a seeded request owns a device generator; unseeded rows share the engine's default one.
    default = torch.Generator(device=device).manual_seed(0)
    generators = [default if p.seed is None else torch.Generator(device).manual_seed(p.seed) for p in params]
    legacy = LegacySampler(seed=0)
    # New: what the engine passes, a seed per request (unseeded ones got theirs at admission) and
    # the count of tokens generated so far, one more each step.
    new = Sampler(seed=0)
    seeds = [p.seed if p.seed is not None else new.new_seed() for p in params]
    step = [0]

    def run_new() -> object:
        step[0] += 1
        return new.sample(logits, params, seeds=seeds, counters=[step[0]] * batch)

    old_dev, old_host = _time(lambda: legacy.sample(logits, params, generators), warmup, reps)
    new_dev, new_host = _time(run_new, warmup, reps)
    return {
        "workload": workload,
        "batch": batch,
        "vocab": vocab,
        "old_device_ms": round(old_dev, 4),
        "new_device_ms": round(new_dev, 4),
        "old_host_ms": round(old_host, 4),
        "new_host_ms": round(new_host, 4),
        "speedup": round(old_dev / new_dev, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--json", type=Path, default=None, help="default: $OUT/bench_sampler.json when OUT is set"
    )
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampler needs a CUDA GPU")
    rows = []
    for workload in WORKLOADS:
        for batch in (int(b) for b in a.batches.split(",")):
            rows.append(bench_one(workload, batch, a.vocab, a.warmup, a.reps))
            log.info("done: %s, batch %d", workload, batch)
    header = f"{'workload':<24}{'batch':>6}{'old ms':>10}{'new ms':>10}{'speedup':>9}{'old host':>10}{'new host':>10}"
    print(f"sampler alone, vocab {a.vocab}, {torch.cuda.get_device_name()}: median ms per call")
    print(header)
    for r in rows:
        print(
            f"{r['workload']:<24}{r['batch']:>6}{r['old_device_ms']:>10.3f}{r['new_device_ms']:>10.3f}"
            f"{r['speedup']:>8.2f}x{r['old_host_ms']:>10.3f}{r['new_host_ms']:>10.3f}"
        )
    path = a.json or (Path(os.environ["OUT"]) / "bench_sampler.json" if os.environ.get("OUT") else None)
    if path is not None:
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
