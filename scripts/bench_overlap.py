"""Decode ms/token with overlapped scheduling off and on, side by side (one engine, CUDA graphs on).

python scripts/bench_overlap.py --model random:llama-3.2-1b --batch 1,32,256 --context 512

The same engine (same weights, KV pool and graphs) runs each batch size twice, with
`engine.async_scheduling` off then on; decode is timed as `kvrelay bench engine` times it
(worker/bench/engine.py measure_decode: requests admitted at the context, steady-state steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from kvrelay.worker.bench.engine import measure_decode
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine

log = logging.getLogger("kvrelay")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--batch", default="1,32,256", help="comma-separated batch sizes")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="alternating off/on runs per batch; best kept")
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: a smoke run of the script)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batches = [int(b) for b in args.batch.split(",")]
    t0 = time.perf_counter()
    engine = Engine(
        EngineConfig(
            model=args.model,
            max_model_len=args.context + args.steps + 16,
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(2048, max(batches)),
            enable_prefix_caching=False,
            device=args.device,
            async_scheduling=False,
        )
    )
    where = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    log.info("engine ready in %.1f s on %s", time.perf_counter() - t0, where)
    rows = []
    for batch in batches:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for overlapped in (False, True):
                engine.async_scheduling = overlapped  # safe between runs: measure_decode drains
                s = measure_decode(engine, batch, args.context, args.steps)
                best[overlapped] = min(best[overlapped], s)
                engine.check_integrity()
        rows.append({"batch": batch, "sync_ms": 1e3 * best[False], "overlapped_ms": 1e3 * best[True]})
        log.info("batch %d done", batch)
    print(f"{args.model}, context {args.context}, {args.steps} steps, best of {args.repeats}, {where}")
    print(f"{'batch':>6} {'sync ms/step':>13} {'overlapped':>11} {'speedup':>8} {'tok/s overlapped':>17}")
    for r in rows:
        print(
            f"{r['batch']:>6} {r['sync_ms']:>13.3f} {r['overlapped_ms']:>11.3f} "
            f"{r['sync_ms'] / r['overlapped_ms']:>7.2f}x {r['batch'] * 1e3 / r['overlapped_ms']:>17.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "context": args.context, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
