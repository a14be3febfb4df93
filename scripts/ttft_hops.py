"""Where a served request's time to first token goes, hop by hop, at concurrency 1.

    python scripts/ttft_hops.py --model random:llama-3.2-1b --device cuda --requests 32

Serves with KVRELAY_HOP_TRACE set (worker/hop_trace.py: every process appends a timestamp per
request and hop), runs `kvrelay bench serve` at concurrency 1 (prompt --prompt-len tokens, 2 output
tokens), and prints the median time between consecutive hops, from the router's gRPC handler
starting to it handing the first token to gRPC; what the client measured beyond that is the
client and gRPC, both ways. Writes --json when given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from serve_process import serving

from kvrelay.worker.hop_trace import STAGES


def read_trace(folder: Path) -> dict[str, dict[str, float]]:
    """request id -> stage -> its first timestamp, over every process's file."""
    hops: dict[str, dict[str, float]] = {}
    for f in folder.glob("trace.*"):
        for line in f.read_text().splitlines():
            rid, stage, t = line.split("\t")
            hops.setdefault(rid, {}).setdefault(stage, float(t))
    return hops


def hop_medians(hops: dict[str, dict[str, float]]) -> dict[str, float]:
    """Median ms from each stage to the next, over the requests that met every stage."""
    whole = [h for h in hops.values() if all(s in h for s in STAGES)]
    if not whole:
        raise SystemExit(
            f"no request met every stage; stages seen: {sorted({s for h in hops.values() for s in h})}"
        )
    out = {
        f"{a} -> {b}": 1e3 * statistics.median(h[b] - h[a] for h in whole)
        for a, b in itertools.pairwise(STAGES)
    }
    out["router_arrival -> router_yield_first"] = 1e3 * statistics.median(
        h[STAGES[-1]] - h[STAGES[0]] for h in whole
    )
    out["requests"] = len(whole)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--router-processes", default="1")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = dict(os.environ, KVRELAY_HOP_TRACE=str(folder / "trace"))
        serve_args = [
            "--model", args.model, "--device", args.device, "--workers", "1", "--port", "0",
            "--router-processes", args.router_processes,
        ]  # fmt: skip
        with serving(serve_args, env) as (address, _):
            report = folder / "bench.json"
            bench_cmd = [
                sys.executable, "-m", "kvrelay.cli", "bench", "serve", "--server", address,
                "--num-requests", str(args.requests), "--max-concurrency", "1",
                "--input-len", str(args.prompt_len), "--output-len", "2", "--warmup-requests", "4",
                "--json", str(report), "--no-progress",
            ]  # fmt: skip
            subprocess.run(bench_cmd, check=True, stdout=sys.stderr)
            metrics = json.loads(report.read_text())["points"][0]["metrics"]
        result: dict[str, Any] = hop_medians(read_trace(folder))
    result["client_ttft_p50"] = 1e3 * metrics["ttft"]["p50"]
    result["client_minus_router"] = result["client_ttft_p50"] - result["router_arrival -> router_yield_first"]
    for k, v in result.items():
        print(f"{k:45s} {v:8.3f}" if isinstance(v, float) else f"{k:45s} {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
