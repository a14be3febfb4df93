"""The serving sweeps of docs/BENCHMARKS.md, in one call: for each model, a real `kvrelay serve`
(one worker per GPU, or the `--serve-arg` layout), then `kvrelay bench serve` sweeping the
concurrency on the ShareGPT-like and the shared-prefix workloads, each writing its JSON, a
markdown report and PNG plots under OUT/<model>/<workload>/.

    python scripts/serve_sweep.py --out out/serve \\
        --models random:llama-3.2-1b random:llama-3.1-8b --concurrency 1 8 32 128

Each point is bounded by `--num-requests` and `--duration` (seconds of sending). Where
matplotlib is missing (the GPU machines) only JSON and reports are written; `--replot OUT`
then draws the plots and rewrites the reports from the JSON, on a machine that has it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kvrelay.cluster.bench.disagg import ServeSubprocess, free_port

WORKLOADS = {
    "sharegpt": ["--workload", "sharegpt"],
    # 8 system prompts of 1024 tokens, each request adds 64 of its own: the prefix cache and the
    # router's prefix affinity carry this one.
    "shared-prefix": [
        "--workload", "shared-prefix", "--num-prefixes", "8", "--prefix-len", "1024",
        "--suffix-len", "64", "--output-len", "128",
    ],
}  # fmt: skip


def _slug(model: str) -> str:
    return model.rsplit(":", 1)[-1].rsplit("/", 1)[-1]


def replot(root: Path) -> int:
    from kvrelay.cluster.bench.report import from_json, markdown, write_plots

    for result in sorted(root.rglob("result.json")):
        run = from_json(json.loads(result.read_text()))
        plots = write_plots(result.parent, run)
        rel = [Path(os.path.relpath(p, result.parent)) for p in plots]
        (result.parent / "report.md").write_text(markdown(run, rel), encoding="utf-8")
        print(f"{result.parent}: {', '.join(p.name for p in plots)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/serve"))
    p.add_argument("--models", nargs="+", default=["random:llama-3.2-1b", "random:llama-3.1-8b"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--concurrency", nargs="+", default=["1", "8", "32", "128"])
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--duration", type=float, default=25.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `kvrelay serve` flag (repeatable)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--replot", type=Path, help="only draw the plots of the results under this folder")
    args = p.parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    plots = importlib.util.find_spec("matplotlib") is not None
    summary = []
    for model in args.models:
        metrics_port = free_port()
        t0 = time.monotonic()
        print(f"== {model}: starting kvrelay serve {' '.join(args.serve_arg)}", flush=True)
        server = ServeSubprocess(
            ["--model", model, "--metrics-port", str(metrics_port), *args.serve_arg], args.start_timeout
        )
        print(f"   ready at {server.address} in {time.monotonic() - t0:.0f} s", flush=True)
        try:
            for workload in args.workloads:
                out = args.out / _slug(model) / workload
                out.mkdir(parents=True, exist_ok=True)
                cmd = [
                    sys.executable, "-m", "kvrelay.cli", "bench", "serve", "--server", server.address,
                    *WORKLOADS[workload], "--max-concurrency", ",".join(args.concurrency),
                    "--num-requests", str(args.num_requests), "--duration", str(args.duration),
                    "--warmup-requests", "4", "--no-progress",
                    "--metrics-url", f"http://127.0.0.1:{metrics_port}/metrics",
                    "--json", str(out / "result.json"), "--report", str(out / "report.md"),
                    *(["--plot-dir", str(out)] if plots else []),
                ]  # fmt: skip
                print(f"== {model} / {workload}: {' '.join(cmd[3:])}", flush=True)
                rc = subprocess.run(cmd, check=False).returncode
                summary.append({"model": model, "workload": workload, "exit": rc, "dir": str(out)})
        finally:
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(s["exit"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
