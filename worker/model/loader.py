"""Loads a Hugging Face safetensors checkpoint into ``LlamaForCausalLM``.

The module is built on the meta device (no init cost), materialised once in the target
dtype and device, and then filled tensor by tensor straight from the shards, so the host
holds about one tensor of the checkpoint at a time beyond the model itself. Every key of
the checkpoint must land somewhere and every parameter must be filled, or loading fails
with a ValueError naming the file and the key.

Does not import transformers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..attention.backend import AttentionBackend
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .smollm2 import SMOLLM2_NAME, smollm2_path
from .tiny import tiny_model_dir

logger = logging.getLogger("kvrelay")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF module name -> (our fused module, index of its row block). Row blocks are stacked in this order.
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def resolve_model(name_or_path: str) -> Path:
    """``"tiny"`` -> the built-in model (written on first use); ``"smollm2"`` -> its GGUF file
    (fetched on first use); a ``.gguf`` file; otherwise a local model directory."""
    if name_or_path == "tiny":
        return tiny_model_dir()
    if name_or_path == SMOLLM2_NAME:
        return smollm2_path()
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"model: GGUF file {name_or_path!r} does not exist")
        return path
    if not path.is_dir():
        raise ValueError(
            f"model: {name_or_path!r} is not 'tiny', 'smollm2', a .gguf file nor an existing directory"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {path} has no config.json; expected a Hugging Face model directory")
    return path


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: AttentionBackend,
    gguf_reader: Any = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Builds the model of ``model_dir`` (a HF directory or a .gguf file) with its weights in
    ``dtype`` on ``device``, in eval mode. ``gguf_reader``: a .gguf file already opened with
    `gguf_loader.open_gguf`, so that its metadata is parsed once for the weights and the tokenizer."""
    model_dir = Path(model_dir)
    if model_dir.suffix.lower() == ".gguf":
        from .gguf_loader import load_gguf_model  # it imports this module

        return load_gguf_model(model_dir, dtype, device, attn_backend, gguf_reader)
    config = ModelConfig.from_dir(model_dir)
    shards, weights_file = _find_shards(model_dir)
    model = build_empty_model(config, dtype, device, attn_backend)

    targets = _targets(model, config)
    filled: set[str] = set()
    start, num_bytes = time.perf_counter(), 0
    for i, shard in enumerate(shards):
        logger.info("loading weights: shard %d/%d %s", i + 1, len(shards), shard.name)
        num_bytes += _load_shard(shard, targets, filled, config)
    missing = sorted(set(targets) - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{weights_file}: missing weight key(s): {shown}")
    logger.info(
        "loaded %s: %.2f GB in %d shard(s), %.1f s",
        model_dir.name,
        num_bytes / 1e9,
        len(shards),
        time.perf_counter() - start,
    )
    return model, config


def build_empty_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, attn_backend: AttentionBackend
) -> LlamaForCausalLM:
    """The model with uninitialised weights in ``dtype`` on ``device`` (built on ``meta``, so no
    init cost and no host copy), in eval mode with gradients off; the RoPE table is real."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, attn_backend)
    model = model.to(dtype=dtype)  # free on meta: only records the dtype
    if config.tie_word_embeddings:
        # to_empty would give lm_head a second, throwaway embedding-sized tensor; re-tied below.
        model.lm_head.register_parameter("weight", None)
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_rope_cache()  # to_empty left it uninitialised, and .to(dtype) would have cast it
    model.requires_grad_(False)
    model.eval()
    return model


def _find_shards(model_dir: Path) -> tuple[list[Path], Path]:
    """-> (shard files in load order, the file to name in checkpoint-wide errors)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: unreadable index, key 'weight_map' ({e!r})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: key 'weight_map' must be a non-empty object")
        shards: list[Path] = []
        for key, name in weight_map.items():
            shard = model_dir / str(name)
            if not shard.is_file():
                raise ValueError(f"{index}: key {key!r} names shard {name!r}, which does not exist")
            if shard not in shards:
                shards.append(shard)
        return sorted(shards), index
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single], single
    raise ValueError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints load)")


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes: rows [row_start, row_start + shape[0]) of ``param``."""

    param: torch.Tensor
    row_start: int
    shape: tuple[int, ...]


def _targets(model: LlamaForCausalLM, config: ModelConfig) -> dict[str, _Target]:
    """Checkpoint key -> target, for every tensor the checkpoint must provide."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    block_rows = {
        "self_attn.qkv_proj": [q_size, kv_size, kv_size],
        "mlp.gate_up_proj": [config.intermediate_size, config.intermediate_size],
    }
    # named_parameters drops the tied lm_head.weight, so a tied checkpoint need not have it.
    params = dict(model.named_parameters())
    targets: dict[str, _Target] = {}
    for name, param in params.items():
        module, _, leaf = name.rpartition(".")
        fused = next((f for f in block_rows if module.endswith("." + f)), None)
        if fused is None:
            targets[name] = _Target(param, 0, tuple(param.shape))
            continue
        layer_prefix = module[: -len(fused)]
        for hf_module, (ours, block) in _FUSED.items():
            if ours != fused:
                continue
            rows = block_rows[fused]
            shape = (rows[block], *param.shape[1:])
            targets[f"{layer_prefix}{hf_module}.{leaf}"] = _Target(param, sum(rows[:block]), shape)
    return targets


def _load_shard(shard: Path, targets: dict[str, _Target], filled: set[str], config: ModelConfig) -> int:
    """Copies every tensor of ``shard`` into its target; returns the bytes read."""
    num_bytes = 0
    try:
        handle: Any = safe_open(str(shard), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type, or OSError, by failure kind
        raise ValueError(f"{shard}: unreadable safetensors file ({e})") from None
    with handle as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            if key.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints stored the RoPE frequencies; we compute them
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied checkpoints keep a copy of the embedding here
            target = targets.get(key)
            if target is None:
                raise ValueError(f"{shard}: unexpected weight key {key!r} for {config.architecture}")
            if key in filled:
                raise ValueError(f"{shard}: weight key {key!r} appears in more than one shard")
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise ValueError(f"{shard}: unreadable tensor for key {key!r} ({e})") from None
            if tuple(tensor.shape) != target.shape:
                raise ValueError(
                    f"{shard}: shape mismatch for key {key!r}: expected {list(target.shape)}, "
                    f"got {list(tensor.shape)}"
                )
            with torch.no_grad():
                target.param[target.row_start : target.row_start + target.shape[0]].copy_(tensor)
            filled.add(key)
            num_bytes += tensor.numel() * tensor.element_size()
    return num_bytes
