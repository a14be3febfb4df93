"""The scaling run (issue: 4 and 8 GPUs), in one call, on whatever this machine has.

    python scripts/scale_run.py --model random:llama-3.1-8b --json out/scale.json

1. Colocated pool throughput on the ShareGPT-like workload with 1, 2, 4, 8 workers (up to the
   GPUs present; `--workers-list` to choose): output tok/s and scaling efficiency against one
   worker (tok/s at N / (N x tok/s at 1); the issue's target is >= 0.90 at 4).
2. Disaggregated splits (1P:1D on 2 GPUs; 1P:3D, 2P:2D on 4; 1P:7D, 2P:6D, 4P:4D on 8; or
   `--splits`) against the same number of colocated workers, on the ShareGPT-like and the
   shared-prefix workloads: throughput and goodput ratios.
3. The router under `--streams` (1024) concurrent streams on the largest colocated pool: the
   serve process's CPU use (user + system seconds per wall second, the router's process only;
   workers are separate processes) and the client-observed p99 TTFT and ITL.

The handoff latency/bandwidth matrix between every GPU pair is `kvrelay bench handoff --matrix`
(scripts/gpu_check.sh memory). Every server is a real `kvrelay serve`, started and drained in
turn; every figure comes from the load-test harness (cluster/bench/serve.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvrelay.cluster.bench.disagg import ServeSubprocess, measure_point
from kvrelay.cluster.bench.metrics import BenchMetrics
from kvrelay.worker.cpu_time import process_cpu_seconds

DEFAULT_SPLITS = {2: ["1:1"], 4: ["1:3", "2:2"], 8: ["1:7", "2:6", "4:4"]}


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _measure(server: ServeSubprocess, argv: list[str]) -> BenchMetrics:
    return measure_point(server.address, argv)


def _row(m: BenchMetrics) -> dict[str, float]:
    return {
        "output_tok_s": m.output_throughput,
        "goodput_req_s": m.goodput,
        "ttft_p99_ms": m.ttft.p99 * 1e3,
        "itl_p99_ms": m.itl.p99 * 1e3,
        "failed": m.failed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--workers-list", default=None, help="colocated pool sizes (default 1,2,4,8 up to the GPUs)"
    )
    p.add_argument("--splits", default=None, help="P:D splits, comma-separated (default by GPU count)")
    p.add_argument("--requests-per-worker", type=int, default=256, help="ShareGPT-like requests per worker")
    p.add_argument("--streams", type=int, default=1024, help="concurrent streams of the router test")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `kvrelay serve` flag")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    gpus = _gpus()
    most = max(gpus, 1)
    sizes = (
        [int(x) for x in args.workers_list.split(",")]
        if args.workers_list
        else [n for n in (1, 2, 4, 8) if n <= most]
    )
    splits = args.splits.split(",") if args.splits else DEFAULT_SPLITS.get(most, [])
    common = ["--model", args.model, "--device", args.device, *args.serve_arg]
    sharegpt = ["--workload", "sharegpt", "--request-rate", "inf", "--warmup-requests", "4"]
    prefix = ["--workload", "shared-prefix", "--request-rate", "inf", "--warmup-requests", "4"]
    out: dict[str, Any] = {
        "gpus": gpus,
        "model": args.model,
        "date": time.strftime("%Y-%m-%d"),
        "colocated": {},
    }

    def n_req(n: int) -> list[str]:
        return ["--num-requests", str(args.requests_per_worker * n)]

    # 1. colocated scaling (and the shared-prefix baseline of each size a split needs)
    split_sizes = {sum(int(x) for x in s.split(":")) for s in splits}
    for n in sizes:
        server = ServeSubprocess([*common, "--workers", str(n)], 900)
        try:
            row = {"sharegpt": _row(_measure(server, [*sharegpt, *n_req(n)]))}
            if n in split_sizes:
                row["shared_prefix"] = _row(_measure(server, [*prefix, *n_req(n)]))
            if n == sizes[-1]:
                before, t0 = process_cpu_seconds(server.proc.pid), time.monotonic()
                m = _measure(server, ["--workload", "sharegpt", "--max-concurrency", str(args.streams),
                                      "--num-requests", str(2 * args.streams)])  # fmt: skip
                cpu = (process_cpu_seconds(server.proc.pid) - before) / (time.monotonic() - t0)
                out["router"] = {"streams": args.streams, "serve_process_cpu": cpu, **_row(m)}
        finally:
            server.stop()
        out["colocated"][n] = row
        base = out["colocated"][sizes[0]]["sharegpt"]["output_tok_s"] / sizes[0]
        row["efficiency"] = row["sharegpt"]["output_tok_s"] / (n * base)
        print(
            f"colocated x{n}: {row['sharegpt']['output_tok_s']:.0f} tok/s, efficiency {row['efficiency']:.2f}"
        )

    # 2. disaggregated splits against colocated of the same size
    out["disaggregated"] = {}
    for split in splits:
        pf, dc = (int(x) for x in split.split(":"))
        n = pf + dc
        server = ServeSubprocess([*common, "--prefill-workers", str(pf), "--decode-workers", str(dc)], 900)
        try:
            row = {
                "sharegpt": _row(_measure(server, [*sharegpt, *n_req(n)])),
                "shared_prefix": _row(_measure(server, [*prefix, *n_req(n)])),
            }
        finally:
            server.stop()
        colo = out["colocated"].get(n)
        if colo is not None:
            for wl in ("sharegpt", "shared_prefix"):
                if wl in colo:
                    for k in ("output_tok_s", "goodput_req_s"):
                        row[wl][f"{k}_ratio"] = row[wl][k] / colo[wl][k] if colo[wl][k] else float("nan")
        out["disaggregated"][split] = row
        print(f"{pf}P:{dc}D: " + ", ".join(f"{wl} {row[wl]['output_tok_s']:.0f} tok/s" for wl in row))

    if "router" in out:
        r = out["router"]
        print(
            f"router, {r['streams']} streams: serve process {r['serve_process_cpu']:.2f} CPU, "
            f"p99 TTFT {r['ttft_p99_ms']:.0f} ms, p99 ITL {r['itl_p99_ms']:.1f} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
