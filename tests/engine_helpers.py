"""Factories shared by the engine tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from kvrelay.memory_model.transport import KVSender
from kvrelay.worker.config import EngineConfig
from kvrelay.worker.disagg.receiver import HandoffReceiver
from kvrelay.worker.disagg.role import DecodeRole, PrefillRole
from kvrelay.worker.engine import Engine


def make_engine(model: str | Path = "tiny", **overrides: Any) -> Engine:
    fields: dict[str, Any] = {"model": str(model), "device": "cpu", "dtype": "float32", "num_kv_blocks": 512}
    fields.update(overrides)
    return Engine(EngineConfig(**fields))


def receiver_of(engine: Engine) -> HandoffReceiver:
    """A decode engine's handoff receiver (fails the test on another role)."""
    assert isinstance(engine.role, DecodeRole), engine.role
    return engine.role.receiver


def sender_of(engine: Engine) -> KVSender:
    """A prefill engine's KV sender (fails the test on another role)."""
    assert isinstance(engine.role, PrefillRole), engine.role
    return engine.role.sender


def random_prompts(n: int, lengths: list[int] | range, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = list(lengths)
    return [[rng.randrange(3, vocab) for _ in range(lens[i % len(lens)])] for i in range(n)]


@torch.inference_mode()
def hf_greedy(hf_model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from a full recompute at every step: no KV cache, nothing shared with ours."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = hf_model(input_ids=ids).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out
