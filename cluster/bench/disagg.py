"""`kvrelay bench disagg`: disaggregated serving against colocated serving, side by side.

Starts `kvrelay serve` twice on the same model and flags, one after the other: N colocated
workers, then P prefill + D decode workers (P + D = N, so both get the same devices), and
drives each with the load-test harness (`cluster/bench/serve.py`) over the same requests:

    ttft        long prompts, short outputs, one request at a time: time to first token
                without queueing, so the disaggregated figure is the reserve call to the decode
                worker + prefill + handoff + one poll
    throughput  the ShareGPT-like workload, every request at once: pool output throughput

and prints each figure with its ratio (disaggregated / colocated). On a GPU machine this is
the issue's "TTFT of 1k-token prompts" and "1 prefill + 1 decode against 2 colocated"; on the
CPU it runs the same code paths on the tiny model (the ratios then say little about GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .metrics import BenchMetrics
from .serve import add_bench_serve_args, config_from_args, run

_READY = "kvrelay serving on "


def add_bench_disagg_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="model of both servers (default tiny)")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--ttft-input-len", type=int, default=1024, help="prompt tokens of the TTFT point")
    p.add_argument("--ttft-requests", type=int, default=20)
    p.add_argument("--throughput-requests", type=int, default=200, help="ShareGPT-like requests, all at once")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `kvrelay serve` flag (repeatable)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to become ready")
    p.add_argument("--json", type=Path, default=None, help="write both runs and the ratios here")


def free_port() -> int:
    """A loopback TCP port free now, for a server flag that takes no 0 (a race the scripts accept)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeSubprocess:
    """`kvrelay serve` in a subprocess of its own session; stopped with SIGTERM (a drain)."""

    def __init__(self, args: list[str], timeout_s: float) -> None:
        cmd = [sys.executable, "-m", "kvrelay.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        out, err = self.proc.stdout, self.proc.stderr
        assert out is not None and err is not None
        threading.Thread(target=_pump, args=(out, lines.put, ""), daemon=True).start()
        threading.Thread(target=_pump, args=(err, self.stderr.append, None), daemon=True).start()
        try:
            line = lines.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"kvrelay serve {' '.join(args)}: not ready in {timeout_s:g} s") from None
        if not line.startswith(_READY):
            self.stop()
            time.sleep(0.2)  # the stderr pump's last lines
            raise RuntimeError(f"kvrelay serve {' '.join(args)} failed: {''.join(self.stderr[-5:]).strip()}")
        self.address = line[len(_READY) :].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The server alone: it drains and stops its Ray cluster itself (a SIGTERM to the
            # whole session would kill Ray first and leave the drain waiting on it).
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _pump(stream: Any, sink: Any, at_eof: str | None) -> None:
    for line in stream:
        sink(line)
    if at_eof is not None:
        sink(at_eof)  # the server died before its ready line: say so now, not at the timeout


def measure_point(server: str, argv: list[str]) -> BenchMetrics:
    """One run of the load-test harness against `server` (`kvrelay bench serve` flags in `argv`,
    one point, no progress bar): its figures."""
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    cfg = config_from_args(p.parse_args(["--server", server, "--no-progress", *argv]))
    return asyncio.run(run(cfg)).points[0].metrics


def _points(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        "ttft": [
            "--workload", "random", "--input-len", str(args.ttft_input_len), "--output-len", "16",
            "--num-requests", str(args.ttft_requests), "--max-concurrency", "1", "--warmup-requests", "2",
        ],
        "throughput": [
            "--workload", "sharegpt", "--num-requests", str(args.throughput_requests),
            "--request-rate", "inf", "--warmup-requests", "4",
        ],
    }  # fmt: skip


def _measure(server_args: list[str], args: argparse.Namespace) -> dict[str, BenchMetrics]:
    server = ServeSubprocess(server_args, args.start_timeout)
    try:
        return {name: measure_point(server.address, argv) for name, argv in _points(args).items()}
    finally:
        server.stop()


def _summary(m: dict[str, BenchMetrics]) -> dict[str, float]:
    t, x = m["ttft"], m["throughput"]
    return {
        "ttft_mean_ms": t.ttft.mean * 1e3,
        "ttft_p50_ms": t.ttft.p50 * 1e3,
        "ttft_p99_ms": t.ttft.p99 * 1e3,
        "output_tok_s": x.output_throughput,
        "goodput_req_s": x.goodput,
        "tpot_p50_ms": x.tpot.p50 * 1e3,
        "failed": float(t.failed + x.failed),
    }


def run_bench_disagg(args: argparse.Namespace) -> int:
    if args.prefill_workers < 1 or args.decode_workers < 1:
        raise ValueError("--prefill-workers and --decode-workers must be >= 1")
    common = ["--model", args.model, "--device", args.device, *args.serve_arg]
    n = args.prefill_workers + args.decode_workers
    setups = {
        f"colocated x{n}": [*common, "--workers", str(n)],
        f"disaggregated {args.prefill_workers}P+{args.decode_workers}D": [
            *common, "--prefill-workers", str(args.prefill_workers), "--decode-workers", str(args.decode_workers),
        ],
    }  # fmt: skip
    results = {name: _summary(_measure(sargs, args)) for name, sargs in setups.items()}
    (base_name, base), (dis_name, dis) = results.items()
    ratios = {k: dis[k] / base[k] if base[k] else float("nan") for k in base if k != "failed"}
    rows = [f"{'figure':16s} {base_name:>18s} {dis_name:>24s} {'ratio':>8s}"]
    rows += [f"{k:16s} {base[k]:18.2f} {dis[k]:24.2f} {ratios[k]:8.2f}" for k in ratios]
    rows.append(f"{'failed':16s} {base['failed']:18.0f} {dis['failed']:24.0f}")
    print("\n".join(rows))
    if args.json is not None:
        doc = {"settings": vars(args) | {"json": str(args.json)}, "results": results, "ratios": ratios}
        args.json.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    return 0 if not base["failed"] and not dis["failed"] else 1
