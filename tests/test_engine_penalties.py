"""Penalties end to end in the engine: greedy tokens equal transformers' logits + the reference penalties."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from checkpoints import hf_logits, hf_reference, make_checkpoint
from engine_helpers import make_engine, random_prompts
from test_penalties import reference_penalize

from kvrelay.worker.sampling_params import SamplingParams

STEPS = 16
# Mixed in one batch: repetition alone, repetition < 1 with presence, frequency that rewards
# repeats, all three, and a row without penalties.
PARAMS = [
    SamplingParams(max_tokens=STEPS, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(max_tokens=STEPS, ignore_eos=True, repetition_penalty=0.8, presence_penalty=1.5),
    SamplingParams(max_tokens=STEPS, ignore_eos=True, frequency_penalty=-0.5),
    SamplingParams(
        max_tokens=STEPS, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=1.0
    ),
    SamplingParams(max_tokens=STEPS, ignore_eos=True),
]


def reference_greedy(model: torch.nn.Module, prompt: list[int], params: SamplingParams) -> list[int]:
    """Full recompute with transformers at every step, reference penalties, argmax."""
    out: list[int] = []
    for _ in range(params.max_tokens):
        logits = hf_logits(model, prompt + out)[-1].tolist()
        penalized = reference_penalize(logits, prompt, out, params)
        out.append(max(range(len(penalized)), key=penalized.__getitem__))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], list[list[int]]]:
    """A random checkpoint, prompts and the reference's penalized greedy tokens for PARAMS."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=5)
    model = hf_reference(ckpt)
    prompts = random_prompts(len(PARAMS), [3, 9, 20, 6, 14], 256, seed=8)
    expected = [reference_greedy(model, p, s) for p, s in zip(prompts, PARAMS, strict=True)]
    return ckpt, prompts, expected


def test_penalized_greedy_equals_transformers_reference(
    llama: tuple[Path, list[list[int]], list[list[int]]],
) -> None:
    ckpt, prompts, expected = llama
    engine = make_engine(ckpt)
    outs = engine.generate(prompts, PARAMS)  # submitted together: one mixed batch
    assert [o.token_ids for o in outs] == expected
    # Not vacuous: without penalties the penalized rows decode differently.
    plain = engine.generate(prompts[:4], SamplingParams(max_tokens=STEPS, ignore_eos=True))
    assert all(p.token_ids != e for p, e in zip(plain, expected[:4], strict=True))
    # A strong repetition penalty repeats less than plain greedy does.
    assert len(set(expected[0])) > len(set(plain[0].token_ids))
    engine.check_integrity()
    assert engine.penalties.num_slots == 0 and engine.penalties.capacity == 0


def test_penalized_greedy_survives_preemption(llama: tuple[Path, list[list[int]], list[list[int]]]) -> None:
    ckpt, prompts, expected = llama
    # Each request needs up to 3 blocks of 16; 5 at once need ~13. Give the pool 6.
    engine = make_engine(ckpt, num_kv_blocks=6)
    outs = engine.generate(prompts, PARAMS)
    assert engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    engine.check_integrity()


def test_slots_freed_on_finish_and_abort() -> None:
    engine = make_engine()
    prompts = random_prompts(3, [4, 7, 9], 256, seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, dataclasses.replace(PARAMS[i], max_tokens=2 + 4 * i))
    engine.add_request("plain", prompts[0], PARAMS[-1])
    engine.step()
    assert engine.penalties.num_slots == 3  # the unpenalized request never takes one
    engine.step()
    assert engine.penalties.num_slots == 2  # p0 finished after its 2 tokens
    engine.abort_request("p2")
    assert engine.penalties.num_slots == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.penalties.num_slots == 0 and engine.penalties.capacity == 0
    engine.check_integrity()
