"""Model shapes with random weights, for benchmarks that must not download a checkpoint.

``random:llama-3.2-1b`` and ``random:llama-3.1-8b`` have the exact tensor shapes of those
models (so bytes moved and FLOPs per token are the real ones); their weights are
normal(0, 0.02) with unit norms, which keeps activations finite in bf16. No tokenizer.
"""

from __future__ import annotations

import logging
import time

import torch

from ..attention.backend import AttentionBackend
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .loader import build_empty_model

log = logging.getLogger("kvrelay")

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        torch_dtype="bfloat16",
    ),
    "llama-3.1-8b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        torch_dtype="bfloat16",
    ),
}
PREFIX = "random:"


def is_random_model(name: str) -> bool:
    return name.startswith(PREFIX)


def preset_config(name: str) -> ModelConfig:
    key = name.removeprefix(PREFIX)
    if key not in PRESETS:
        raise ValueError(
            f"model: unknown random-weight preset {name!r}; known: {', '.join(PREFIX + k for k in PRESETS)}"
        )
    return PRESETS[key]


@torch.no_grad()
def random_model(
    name: str, dtype: torch.dtype, device: torch.device, attn_backend: AttentionBackend, seed: int = 0
) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = preset_config(name)
    t0 = time.perf_counter()
    model = build_empty_model(config, dtype, device, attn_backend)
    gen = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            p.fill_(1.0)
        elif pname.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info("random weights %s: %.2f GB in %.1f s", name, num_bytes / 1e9, time.perf_counter() - t0)
    return model, config
