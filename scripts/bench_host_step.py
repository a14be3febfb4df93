"""The engine step's host cost per output token, by phase, on the CPU (a diagnostic, not a test).

    python scripts/bench_host_step.py --batch 32,256                 # this tree
    python scripts/bench_host_step.py --batch 32,256 --before main   # also main's code, side by side
    python scripts/bench_host_step.py --batch 256 --profile out.prof # cProfile of the timed window

Each batch size, two workloads (--workload) over the built-in tiny model (detokenize off, as
on a served worker; overlapped scheduling on, as on a GPU, unless --sync):
    offline  `batch` requests of --prompt-len random tokens and --output-len tokens (greedy,
             ignore_eos) added at once, as `Engine.generate`; prefill runs untimed, then every
             step to the end is timed (the last ones finish requests and shrink the batch).
    steady   `batch` requests kept live, output lengths drawn from [L/2, 3L/2], a new request
             added for each one that finishes, as on a served worker: after 2 L warm-up steps,
             --steps steps are timed (decodes mixed with arriving prompts' prefill chunks).

Phases are timed by wrapping the engine's per-step calls (one wrapper call per step, so the
wrapping itself costs ~1 µs a step, not per token):
    schedule  Scheduler.schedule
    prepare   ModelRunner.prepare (block tables, input packing, upload)
    model     ModelRunner.execute (the forward pass: device work, or CPU compute here;
              --stub-model returns zero logits instead, so only the host work is left)
    sample    Sampler.sample / Sampler.__call__ (argmax on the CPU; the host's share is small)
    resolve   overlap.resolve (overlapped: prefix-cache hashing, append_token, stops, outputs)
    other     the rest of Engine.step (launch bookkeeping, penalties, the sync path's appends)
`host` = schedule + prepare + resolve + other: what a GPU step would spend on the CPU besides
launching kernels. µs/token = phase seconds / output tokens delivered in the timed steps; the
best (minimum) of --repeats rounds per phase.

--before REF extracts REF's kvrelay package (`git archive` of kvrelay/ and the folders it
links to) to a temporary directory and runs this same script against it in a subprocess, so
both columns come from one machine and one run of the script.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("schedule", "prepare", "model", "sample", "resolve", "other")
HOST = ("schedule", "prepare", "resolve", "other")
# kvrelay/ links to the top-level package folders: all of them make the package.
_PACKAGE_DIRS = ("kvrelay", "worker", "cluster", "memory_model", "proto")


class _Clock:
    """Seconds per phase, accumulated by the wrappers while `on`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        return timed


class _TimedSampler:
    """The engine's sampler with both entry points timed (`engine.sampler(...)` looks __call__
    up on the type, so the instance cannot simply be patched)."""

    def __init__(self, inner: Any, clock: _Clock) -> None:
        self._inner = inner
        self.sample = clock.wrap("sample", inner.sample)
        self._call = clock.wrap("sample", inner.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _instrument(engine: Any, clock: _Clock, stub_model: bool) -> None:
    import torch

    import kvrelay.worker.engine as engine_mod

    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    engine.runner.prepare = clock.wrap("prepare", engine.runner.prepare)
    execute = engine.runner.execute
    if stub_model:
        vocab = engine.model_config.vocab_size

        def execute(inp: Any) -> Any:  # [S, vocab] zeros: greedy picks token 0 for every row
            return torch.zeros(inp.sample_rows.shape[0], vocab)

    engine.runner.execute = clock.wrap("model", execute)
    engine.sampler = _TimedSampler(engine.sampler, clock)
    # engine.py calls overlap.resolve through its own module namespace.
    engine_mod.resolve = clock.wrap("resolve", engine_mod.resolve)


def _round(engine: Any, clock: _Clock, args: argparse.Namespace, batch: int, seed: int, prof: Any) -> dict:
    """One timed window: {tokens, steps, seconds per phase}."""
    from kvrelay.worker.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    serial = iter(range(1 << 30))

    bench_s = [0.0]  # the bench's own time inside the timed window (drawing prompts), not counted

    def add(max_tokens: int) -> None:
        t0 = time.perf_counter()
        prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
        bench_s[0] += time.perf_counter() - t0
        engine.add_request(
            f"b{seed}-{next(serial)}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        )

    def output_len() -> int:  # steady: spread over [L/2, 3L/2], so requests finish on different steps
        n = args.output_len
        return n if args.workload == "offline" else rng.randint(max(1, n // 2), n + n // 2)

    def step() -> int:
        outs = engine.step()
        if args.workload == "steady":  # a new request for every one that finished
            for _ in range(sum(o.finish_reason is not None for o in outs)):
                add(output_len())
        return sum(len(o.token_ids) for o in outs)

    for _ in range(batch):
        add(output_len())
    if args.workload == "offline":
        # Prefill (untimed): until every request has sampled its first token.
        while any(r.num_output_tokens == 0 for r in engine.requests.values()) or engine.scheduler.waiting:
            step()
    else:
        for _ in range(2 * args.output_len):  # until arrivals and finishes are spread out
            step()
    clock.seconds.clear()
    bench_s[0] = 0.0
    clock.on = True
    if prof is not None:
        prof.enable()
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests() and (args.workload == "offline" or steps < args.steps):
        tokens += step()
        steps += 1
    total = time.perf_counter() - t0 - bench_s[0]
    if prof is not None:
        prof.disable()
    clock.on = False
    for rid in list(engine.requests):  # steady: what is still running is not timed
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    phases = {p: clock.seconds[p] for p in PHASES[:-1]}
    phases["other"] = total - sum(phases.values())
    return {"tokens": tokens, "steps": steps, "seconds": phases}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """{batch: {phase: µs/token}} for this interpreter's kvrelay."""
    import torch

    from kvrelay.worker.config import EngineConfig
    from kvrelay.worker.engine import Engine

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for batch in args.batches:
        max_len = args.prompt_len + args.output_len + args.output_len // 2 + 16  # steady's longest
        blocks_per_req = -(-max_len // 16)
        engine = Engine(
            EngineConfig(
                model="tiny",
                device="cpu",
                dtype="float32",
                num_kv_blocks=batch * blocks_per_req + 64,
                max_num_seqs=batch,
                max_num_batched_tokens=max(2048, batch),
                max_model_len=max_len,
                async_scheduling=not args.sync,
                detokenize=False,
            )
        )
        clock = _Clock()
        _instrument(engine, clock, args.stub_model)
        best: dict[str, float] = {}
        prof = cProfile.Profile() if args.profile and batch == max(args.batches) else None
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = _round(engine, clock, args, batch, seed=r, prof=prof if r == args.repeats - 1 else None)
            print(
                f"  batch {batch} round {r + 1}/{args.repeats}: {res['tokens']} tokens timed over "
                f"{res['steps']} steps ({time.perf_counter() - t0:.2f} s with warm-up)",
                file=sys.stderr,
                flush=True,
            )
            for p, s in res["seconds"].items():
                us = 1e6 * s / res["tokens"]
                best[p] = min(best.get(p, us), us)
        best["host"] = sum(best[p] for p in HOST)
        results[str(batch)] = best
        if prof is not None:
            prof.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    return results


def _run_before(ref: str, args: argparse.Namespace) -> dict[str, Any]:
    """This script against REF's kvrelay package, in a subprocess."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-host-before-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", ref, *_PACKAGE_DIRS], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        cmd = [sys.executable, __file__, "--json-only", *_common_args(args)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=_env_with_path(tmp))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env_with_path(path: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = path
    return env


def _common_args(args: argparse.Namespace) -> list[str]:
    out = ["--batch", ",".join(map(str, args.batches)), "--prompt-len", str(args.prompt_len)]
    out += ["--output-len", str(args.output_len), "--repeats", str(args.repeats)]
    out += ["--workload", args.workload, "--steps", str(args.steps)]
    out += ["--threads", str(args.threads)] + (["--sync"] if args.sync else [])
    out += ["--stub-model"] if args.stub_model else []
    return out


def _table(cols: dict[str, dict[str, Any]], batches: list[int]) -> str:
    names = list(cols)
    lines = []
    for batch in batches:
        head = f"batch {batch}: µs/token"
        lines.append(f"{head:<22}" + "".join(f"{n:>12}" for n in names))
        for p in (*PHASES, "host"):
            row = [cols[n][str(batch)][p] for n in names]
            lines.append(f"  {p:<20}" + "".join(f"{v:>12.2f}" for v in row))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="32,256", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--workload",
        choices=("offline", "steady"),
        default="offline",
        help="offline: every request at once, decode steps timed to the end (Engine.generate); "
        "steady: `batch` requests kept live, staggered lengths, a new one per finish (a served worker)",
    )
    ap.add_argument("--steps", type=int, default=256, help="steady: steps timed")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per batch size; best per phase kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a served worker runs with 1)")
    ap.add_argument("--sync", action="store_true", help="the synchronous step instead of the overlapped one")
    ap.add_argument(
        "--stub-model", action="store_true", help="skip the forward pass (zero logits): host work only, fast"
    )
    ap.add_argument("--before", default=None, help="a git ref: also run its kvrelay/ package, side by side")
    ap.add_argument("--profile", default=None, help="cProfile the largest batch's last round into this file")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batch.split(",")]
    cols: dict[str, dict[str, Any]] = {}
    if args.before:
        print(f"running {args.before}'s kvrelay ...", file=sys.stderr, flush=True)
        cols[args.before] = _run_before(args.before, args)
    if not args.json_only:
        print("running this tree's kvrelay ...", file=sys.stderr, flush=True)
    cols["this tree"] = measure(args)
    if args.json_only:
        print(json.dumps(cols["this tree"]))
        return
    print(_table(cols, args.batches))
    if args.json:
        Path(args.json).write_text(json.dumps(cols, indent=1))


if __name__ == "__main__":
    main()
