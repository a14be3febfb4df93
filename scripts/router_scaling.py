"""The router scaling curve: `kvrelay bench router` at 1, 2, 4, 8 router processes, in one run.

    python scripts/router_scaling.py --routers 1,2,4,8 --workers 8 --step-ms 10 --streams 1024 \
        --output-len 128 --out out/router_scaling

Each point is one `bench router` run (synthetic worker processes behind the zmq data plane, N
router processes on one port, `--client-processes` = max(4, 2N) load-generator processes, each with
`--connections` gRPC connections (default 4N), since SO_REUSEPORT balances connections, not streams). Offered load = streams x 1000 / step_ms tokens per second (every stream gets
one token per synthetic step once it runs); delivered / offered is the figure of merit, with the
added TTFT p50 (over the synthetic TTFT) beside it. Writes `scaling.json` and, with matplotlib,
`scaling.png` (delivered tok/s and added TTFT p50 against router processes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_point(args: argparse.Namespace, routers: int, out: Path) -> dict[str, Any]:
    clients = max(4, 2 * routers) if args.client_processes == "auto" else int(args.client_processes)
    path = out / f"routers_{routers}.json"
    cmd = [
        sys.executable, "-m", "kvrelay.cli", "bench", "router",
        "--workers", str(args.workers), "--step-ms", str(args.step_ms), "--ttft-ms", str(args.ttft_ms),
        "--streams", str(args.streams), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--router-processes", str(routers),
        "--client-processes", str(clients), "--json", str(path),
        *(["--connections", str(args.connections)] if args.connections else []),
    ]  # fmt: skip
    print(f"== {routers} router process(es), {clients} client processes", flush=True)
    subprocess.run(cmd, check=True)
    point = json.loads(path.read_text())["points"][0]
    offered = args.streams * 1000.0 / args.step_ms
    return {
        "router_processes": routers,
        "client_processes": clients,
        "offered_tok_s": offered,
        "delivered_tok_s": point["output_throughput"],
        "delivered_vs_offered": point["output_throughput"] / offered,
        "added_ttft_ms_p50": point["added_ttft_ms"]["p50"],
        "added_ttft_ms_p99": point["added_ttft_ms"]["p99"],
        "router_cpu": point["router_cpu"],
        "server_cpu_per_process": point["server_cpu_per_process"],
        "router_cpu_us_per_token": point["router_cpu_us_per_token"],
        "worker_cpu_us_per_token": point["worker_cpu_us_per_token"],
        "client_cpu_per_process": point["client_cpu_per_process"],
        "client_cpu_warning": point["client_cpu_warning"],
        "failed": point["failed"],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["router_processes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [r["delivered_tok_s"] / 1e3 for r in rows], "o-", label="delivered")
    ax.axhline(rows[0]["offered_tok_s"] / 1e3, linestyle="--", color="gray", label="offered")
    ax.set_xlabel("router processes")
    ax.set_ylabel("output tokens/s (thousands)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    ax2 = ax.twinx()
    ax2.plot(n, [r["added_ttft_ms_p50"] for r in rows], "s:", color="tab:red", label="added TTFT p50")
    ax2.set_ylabel("added TTFT p50 (ms)", color="tab:red")
    ax2.set_yscale("log")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    ax.set_title("kvrelay bench router: scaling with router processes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routers", default="1,2,4,8", help="router process counts, a comma list")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--streams", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--client-processes", default="auto", help="N, or auto: max(4, 2 x routers)")
    ap.add_argument("--connections", type=int, default=None, help="per client process (default: 4 x routers)")
    ap.add_argument("--out", type=Path, default=Path("out/router_scaling"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n in args.routers.split(","):
        rows.append(run_point(args, int(n), args.out))
        # after every point, so a run cut short by a time limit keeps what it measured
        (args.out / "scaling.json").write_text(
            json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
        )
    print(
        f"\nrouter scaling: {args.workers} synthetic workers, step {args.step_ms:g} ms, {args.streams} streams"
    )
    print("routers  clients  delivered tok/s  of offered  +TTFT p50 ms  router cpu  router us/tok  failed")
    for r in rows:
        print(
            f"{r['router_processes']:>7}  {r['client_processes']:>7}  {r['delivered_tok_s']:>15.0f}  "
            f"{r['delivered_vs_offered']:>10.2f}  {r['added_ttft_ms_p50']:>12.1f}  {r['router_cpu']:>10.2f}  "
            f"{r['router_cpu_us_per_token']:>13.1f}  {r['failed']:>6}"
        )
    try:
        plot(rows, args.out / "scaling.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
