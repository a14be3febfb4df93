"""The GPU transport of the KV handoff, end to end, in two processes: a decode engine in a
child process exports its pool by CUDA IPC and its mailbox in shared memory; a prefill engine
here opens them, copies each prompt's blocks with the one-launch Triton kernel, and its last
CTA publishes with st.release.sys into the mapped mailbox. On one GPU the two processes share
it (CUDA IPC within a device); with two, the decode engine sits on the second (NVLink).
Greedy tokens equal one colocated engine's."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from typing import Any

import pytest
import torch
from engine_helpers import random_prompts, receiver_of, sender_of

from kvrelay.worker.config import EngineConfig
from kvrelay.worker.engine import Engine
from kvrelay.worker.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _config(device: str, **kw: Any) -> EngineConfig:
    return EngineConfig(
        model="tiny", device=device, dtype="float32", num_kv_blocks=256, enforce_eager=True, **kw
    )


def _decode_process(device: str, conn: Any) -> None:
    torch.cuda.set_device(torch.device(device))
    engine = Engine(_config(device, kv_role="decode"))
    conn.send(receiver_of(engine).descriptor)
    prompts: list[list[int]] = conn.recv()
    conn.send(
        [receiver_of(engine).reserve(f"r{i}", p, PARAMS, None, "parent") for i, p in enumerate(prompts)]
    )
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()
    deadline = time.monotonic() + 120
    while len(done) < len(prompts) and time.monotonic() < deadline:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                done.add(out.request_id)
    engine.check_integrity()
    conn.send(([tokens.get(f"r{i}", []) for i in range(len(prompts))], engine.allocator.num_used_blocks))
    conn.recv()  # the parent is done with our memory


@pytest.mark.gpu
def test_cuda_ipc_handoff_between_two_processes() -> None:
    decode_device = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_process, args=(decode_device, child), daemon=True)
    proc.start()
    try:
        descriptor = parent.recv()
        prefill = Engine(_config("cuda:0", kv_role="prefill"))
        sender_of(prefill).connect(descriptor)
        prompts = random_prompts(6, [5, 16, 33, 47], prefill.model_config.vocab_size, seed=3)
        parent.send(prompts)
        targets = parent.recv()
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            prefill.add_request(f"r{i}", p, dataclasses.replace(PARAMS, max_tokens=1), handoff=t)
        while prefill.has_unfinished_requests():
            for out in prefill.step():
                assert out.error is None, out.error
        got, used = parent.recv()
        expected = [c.token_ids for c in Engine(_config("cuda:0")).generate(prompts, PARAMS)]
        assert got == expected
        assert used == 0
        sender_of(prefill).close()
        parent.send("bye")
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
