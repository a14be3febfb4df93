"""The Llama family (Llama, Mistral, Qwen2, Qwen3) over packed tokens and a paged KV cache.

The batch is one flat stream of T tokens from many sequences (no padding, no batch dim);
where each token's sequence, position and cache slot are is all in ``AttentionMetadata``,
which only the attention backend reads. Differences between architectures are flags on
``ModelConfig``: Qwen2 adds q/k/v biases; Qwen3 adds a per-head RMSNorm on q and k before
RoPE and an explicit head_dim; Mistral is Llama.

Parameter names follow Hugging Face's except two fused projections (one matmul instead of
several): ``self_attn.qkv_proj`` = rows [q; k; v] and ``mlp.gate_up_proj`` = rows [gate; up].
The loader concatenates the checkpoint's weights into them.

A layer's elementwise work is a handful of fused launches (``fused_ops``): its norm,
RoPE on q and k in place in the qkv output, and SiLU-and-mul. The residual stream is carried
beside the hidden states as in vLLM: a layer takes and returns ``(hidden, residual)``, where
the true stream is ``hidden + residual``, and the next norm adds them as it normalises.

Forward has no host syncs and no data-dependent shapes, so a step can be captured in a CUDA
graph: decode steps always (worker/cuda_graph.py), steps with prefill chunks where the
attention backend is ``prefill_graph_safe`` (worker/prefill_graph.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata
from . import fused_ops
from .config import ModelConfig
from .fused_ops import FUSED_IMPLS, FusedImpl
from .gemv import Linear
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """Normalises in float32, rounds back, then scales: transformers' order, so that
    half-precision results match it bit for bit."""

    def __init__(self, dim: int, eps: float, impl: FusedImpl = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.rms_norm(x, self.weight, self.eps, impl=self.impl)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(residual + x), residual + x); ``residual`` is updated in place."""
        return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps, impl=self.impl)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, impl: FusedImpl) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.rms_norm_eps = config.rms_norm_eps
        self.impl = impl
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            # Only their weights are used: the RoPE launch applies them (fused_ops.apply_rotary_).
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, impl)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, impl)
        self.attn_backend = attn_backend

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_len, D] float32: cos | sin
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Strided views into qkv (row stride (H + 2 Hkv) D): RoPE rotates them in place.
        q = q.view(T, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        fused_ops.apply_rotary_(
            q,
            k,
            positions,
            cos_sin_cache,
            q_norm_weight=self.q_norm.weight if self.qk_norm else None,
            k_norm_weight=self.k_norm.weight if self.qk_norm else None,
            norm_eps=self.rms_norm_eps,
            impl=self.impl,
        )
        o = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))  # [T, hidden]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, impl: FusedImpl) -> None:
        super().__init__()
        self.impl = impl
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = fused_ops.silu_and_mul(self.gate_up_proj(x), impl=self.impl)  # [T, I]
        return self.down_proj(act)  # [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, impl: FusedImpl) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, impl)
        self.self_attn = Attention(config, attn_backend, impl)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, impl)
        self.mlp = MLP(config, impl)

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # [T, hidden]; None in the first layer (h is the stream)
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mlp output, residual): the stream after this layer is their sum."""
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(h, positions, cos_sin_cache, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, impl: FusedImpl) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, attn_backend, impl) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, impl)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, each < max_model_len
        kv_caches: Sequence[torch.Tensor],  # one [2, num_blocks, block_size, Hkv, D] per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        assert len(kv_caches) == len(self.layers), (len(kv_caches), len(self.layers))
        cos_sin_cache = self.rotary_emb.cos_sin_cache  # read by position in each layer's RoPE
        h = self.embed_tokens(input_ids)  # [T, hidden]; a fresh tensor, so the stream may own it
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, positions, cos_sin_cache, kv_cache, meta)
        assert residual is not None  # num_hidden_layers >= 1
        return self.norm.add_forward(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: ModelConfig, attn_backend: AttentionBackend, fused_impl: FusedImpl = "auto"
    ) -> None:
        """``fused_impl`` picks the elementwise kernels (see ``fused_ops``): "auto" runs Triton
        on CUDA and PyTorch on the CPU; tests force "triton" or "torch"."""
        super().__init__()
        if fused_impl not in FUSED_IMPLS:
            raise ValueError(f"fused_impl must be one of {FUSED_IMPLS}, got {fused_impl!r}")
        self.config = config
        self.attn_backend = attn_backend  # every layer's; the graph runners ask it what they may capture
        self.model = LlamaModel(config, attn_backend, fused_impl)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] int64, packed -> final-normed hidden states [T, hidden].

        Writes this step's K/V into ``kv_caches`` at ``meta.slot_mapping``.
        """
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
        """[N, hidden] -> [N, vocab], float32 (upcast=False: the model's dtype, for a caller that
        upcasts only where its math needs it: the sampler does, so the engine skips a float32
        copy of every step's logits, 96 us a step at batch 256 on an H200). Run it on the rows
        that sample, not on all T."""
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def tie_weights(self) -> None:
        """Shares the embedding with lm_head if the config says so. ``to_empty`` (meta ->
        device) gives every module its own new tensor, so it must be called again after."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope_cache(self) -> None:
        """Rebuilds the float32 RoPE table after ``to_empty`` or a dtype cast of the module."""
        self.model.rotary_emb.reset_cache()
