"""The random-weight benchmark presets have the exact parameter counts of the real checkpoints."""

from __future__ import annotations

import pytest
import torch

from kvrelay.worker.attention.torch_backend import TorchPagedAttention
from kvrelay.worker.model.loader import build_empty_model
from kvrelay.worker.model.presets import preset_config


@pytest.mark.parametrize(
    ("name", "params"),
    [("random:llama-3.2-1b", 1_235_814_400), ("random:llama-3.1-8b", 8_030_261_248)],
)
def test_preset_parameter_count(name: str, params: int) -> None:
    model = build_empty_model(
        preset_config(name), torch.bfloat16, torch.device("meta"), TorchPagedAttention()
    )
    unique = {id(p): p for p in model.parameters()}  # tied embeddings count once
    assert sum(p.numel() for p in unique.values()) == params


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="unknown random-weight preset 'random:gpt5'"):
        preset_config("random:gpt5")
