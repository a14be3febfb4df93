"""Rotary position embeddings (Neox / rotate-half layout, as Hugging Face Llama).

The cos/sin table is computed once for every position up to max_model_len, in float32
and with the same operations transformers uses, then indexed by each token's position:
no per-step trigonometry and nothing that depends on the batch's shape beyond the
gather, so it is CUDA-graph safe. The model's RoPE runs in ``fused_ops.apply_rotary_``,
which reads the table by position inside its kernel; ``apply_rotary`` here is the PyTorch
reference it is held to, and its CPU path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 on the CPU: transformers' inverse frequencies, scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        # Dividing the frequencies is the same as dividing the positions.
        return inv_freq / factor
    assert scaling["rope_type"] == "llama3", scaling
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, and blend smoothly between.
    old_len = scaling["original_max_position_embeddings"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table; ``forward(positions)`` gathers the rows of this step's tokens."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_len = max_len
        self.theta = theta
        self.scaling = scaling
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", self._build(torch.get_default_device()), persistent=False)

    def reset_cache(self) -> None:
        """Rebuilds the table in float32 where it lives now. A model built on the meta device
        and then materialised with ``to_empty`` (or cast with ``.to(dtype)``) needs this."""
        self.cos_sin_cache = self._build(self.cos_sin_cache.device)

    def _build(self, device: torch.device) -> torch.Tensor:
        # [max_len, head_dim]: cos in the first half of the columns, sin in the second.
        if device.type == "meta":
            return torch.empty(self.max_len, self.head_dim, dtype=torch.float32, device=device)
        with torch.device("cpu"):
            inv_freq = inv_frequencies(self.head_dim, self.theta, self.scaling)  # [D/2]
            positions = torch.arange(self.max_len, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]  # [max_len, D/2]
            table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        return table.to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> (cos, sin), each [T, head_dim // 2] float32."""
        cos_sin = self.cos_sin_cache[positions]  # [T, D]
        cos, sin = cos_sin.chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, D/2] float32. Rotates pairs (i, i + D/2) as HF's rotate_half.

    cos/sin are cast to x's dtype first, as transformers does, so half-precision models
    round exactly as they do there.
    """
    cos = cos.to(x.dtype).unsqueeze(1)  # [T, 1, D/2]
    sin = sin.to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
