"""What the sampling penalties cost per decode step: the sampler with no row penalized, with every
row penalized (counts kept on the device, one new token per row per step), and the alternative of
rebuilding the counts from the Python token lists every step.

    PYTHONPATH=$PWD python scripts/bench_penalties.py --device cuda --batch 64 --vocab 128256 --output-len 1000
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from kvrelay.worker.penalties import PenaltyState, token_counts
from kvrelay.worker.request import Request
from kvrelay.worker.sampler import Sampler
from kvrelay.worker.sampling_params import SamplingParams


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    device = torch.device(a.device)
    rng = random.Random(0)
    logits = torch.randn(a.batch, a.vocab, device=device)
    plain = SamplingParams(max_tokens=a.output_len + a.reps + 2)
    penal = SamplingParams(
        max_tokens=a.output_len + a.reps + 2,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    reqs = []
    for i in range(a.batch):
        r = Request(f"r{i}", [rng.randrange(a.vocab) for _ in range(a.prompt_len)], penal)
        r.all_token_ids += [rng.randrange(a.vocab) for _ in range(a.output_len)]
        reqs.append(r)
    sampler = Sampler(seed=0)
    state = PenaltyState(a.vocab, device)
    state.batch(reqs)  # open the slots: prompt masks and the first output_len counts

    def step_plain() -> object:
        return sampler(logits, [plain] * a.batch, penalties=state.batch([]))

    def step_incremental() -> object:
        for r in reqs:  # one new token per row, as after a decode step
            r.all_token_ids.append(rng.randrange(a.vocab))
        return sampler(logits, [penal] * a.batch, penalties=state.batch(reqs))

    def incremental_counts() -> object:  # what the engine does: add the one new token per row
        for r in reqs:
            r.all_token_ids.append(rng.randrange(a.vocab))
        return state.batch(reqs)

    def rebuild_counts() -> object:  # the per-step rebuild alternative: counts and prompt mask from lists
        return token_counts([r.output_token_ids for r in reqs], a.vocab, device), token_counts(
            [r.prompt_token_ids for r in reqs], a.vocab, device
        )

    print(f"device {device}, batch {a.batch}, vocab {a.vocab}, prompt {a.prompt_len}, output {a.output_len}")
    cases: list[tuple[str, Callable[[], object]]] = [
        ("sampler, no penalties", step_plain),
        ("sampler, every row penalized", step_incremental),
        ("counts kept on the device (PenaltyState)", incremental_counts),
        ("counts rebuilt from the token lists", rebuild_counts),
    ]
    for label, fn in cases:
        print(f"{label:<42} {_time_ms(fn, device, a.reps):8.3f} ms/step")


if __name__ == "__main__":
    main()
