"""HTTP (OpenAI API) against gRPC throughput over one `kvrelay serve`, side by side in one run.

    python scripts/http_vs_grpc.py --model smollm2 --concurrency 64 --out out/http_vs_grpc

One server serves both protocols over the same pool (`--http-port`). The same requests (random
token-id prompts, `--input-len` in / `--output-len` out, EOS ignored) are sent through
`kvrelay bench serve` over gRPC and over HTTP (`--protocol http`: streaming `/v1/completions`),
alternating `--rounds` times so that drift in the machine hits both. Prints a table of output
tok/s, TTFT and ITL per protocol and the HTTP/gRPC throughput ratio of the best rounds; writes
every run's JSON and a summary under `--out`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kvrelay.cluster.bench.disagg import ServeSubprocess, free_port


def _bench(protocol: str, server: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "kvrelay.cli", "bench", "serve", "--protocol", protocol, "--server", server,
        "--workload", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--max-concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
        "--warmup-requests", str(args.concurrency), "--client-processes", str(args.client_processes),
        "--no-progress", "--json", str(out),
    ]  # fmt: skip
    print(f"== {protocol}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    point = json.loads(out.read_text())["points"][0]
    m = point["metrics"]
    return {
        "output_tok_s": m["output_throughput"],
        "completed": m["completed"],
        "failed": m["failed"],
        "ttft_p50_ms": m["ttft"]["p50"] * 1e3,
        "itl_p50_ms": m["itl"]["p50"] * 1e3,
        "client_cpu": sum(point.get("client_cpu") or [0.0]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `kvrelay serve` flag (repeatable)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("out/http_vs_grpc"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    http_port = free_port()
    t0 = time.monotonic()
    server = ServeSubprocess(
        ["--model", args.model, "--http-port", str(http_port), *args.serve_arg], args.start_timeout
    )
    print(f"== {args.model}: serving at {server.address} (gRPC) and 127.0.0.1:{http_port} (HTTP), "
          f"ready in {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"grpc": [], "http": []}
    try:
        for r in range(args.rounds):
            for protocol, address in (("grpc", server.address), ("http", f"127.0.0.1:{http_port}")):
                runs[protocol].append(_bench(protocol, address, args, args.out / f"{protocol}_{r}.json"))
    finally:
        server.stop()

    best = {k: max(v, key=lambda x: x["output_tok_s"]) for k, v in runs.items()}
    ratio = best["http"]["output_tok_s"] / best["grpc"]["output_tok_s"]
    summary = {
        "settings": vars(args) | {"out": str(args.out)},
        "runs": runs,
        "best": best,
        "http_over_grpc": ratio,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"\n{'protocol':<9}{'round':>6}{'out tok/s':>11}{'TTFT p50 ms':>13}{'ITL p50 ms':>12}{'client CPU':>12}{'failed':>8}"
    )
    for protocol, rows in runs.items():
        for i, m in enumerate(rows):
            print(f"{protocol:<9}{i:>6}{m['output_tok_s']:>11.0f}{m['ttft_p50_ms']:>13.1f}{m['itl_p50_ms']:>12.2f}"
                  f"{m['client_cpu']:>12.2f}{m['failed']:>8.0f}")  # fmt: skip
    print(f"HTTP / gRPC output throughput (best of {args.rounds} rounds each): {ratio:.3f}")
    return 0 if all(m["failed"] == 0 for rows in runs.values() for m in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
