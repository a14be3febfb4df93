"""Loads a llama.cpp GGUF file (llama / qwen2 / qwen3) into ``LlamaForCausalLM``.

The file is memory-mapped by ``gguf.GGUFReader``; each tensor is dequantized on its own
(``gguf.quants.dequantize``, every type the gguf package implements) to float32, cast to the
serving dtype and copied into the model, so the host holds about one dequantized tensor beyond
the model. GGUF names map onto the Hugging Face names the safetensors loader already targets
(``loader._targets``, which knows our fused qkv_proj / gate_up_proj). llama.cpp's converter
permutes the rows of Llama's Q and K projections (interleaved -> half-split RoPE pairs); that
is undone here exactly as transformers' GGUF loader does. Qwen files are not permuted.

Errors are one line naming the file and the metadata key or tensor.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..attention.backend import AttentionBackend
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .loader import _Target, _targets, build_empty_model

logger = logging.getLogger("kvrelay")

# general.architecture -> our architecture name.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_gguf_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def open_gguf(path: Path) -> Any:
    """The memory-mapped reader; any failure to parse (truncated, not GGUF) is one ValueError line."""
    from gguf import GGUFReader  # imported lazily: only GGUF models need it

    if not path.is_file():
        raise ValueError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, IndexError or struct errors by failure kind
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field_value(reader: Any, key: str) -> Any:
    """A metadata value (scalar, string or list), None when the key is absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_model_config(reader: Any, path: Path) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; vocab size from the embedding's rows."""
    arch = field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: key 'general.architecture' is {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: missing metadata key '{arch}.{key}'")
        return value

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    if "rope_freqs.weight" in tensors:
        raise ValueError(
            f"{path}: tensor 'rope_freqs.weight' (Llama 3 rope scaling in GGUF) is not supported yet"
        )
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = field_value(reader, f"{arch}.attention.key_length") or hidden // heads
    raw: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": int(embd.shape[1]),  # GGUF shapes are [cols, rows]: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field_value(reader, f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field_value(reader, f"{arch}.rope.freq_base") or 10000.0),
        "rope_scaling": _rope_scaling(reader, arch),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _opt_int(field_value(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(field_value(reader, "tokenizer.ggml.eos_token_id")),
    }
    try:
        return ModelConfig.from_dict(raw, path)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    # Anything else ("yarn", ...) is passed on and rejected by the config with the key named.
    return {"rope_type": kind, "factor": field_value(reader, f"{arch}.rope.scaling.factor")}


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name; None for a name we do not know."""
    stem, _, leaf = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{leaf}"
    m = _BLOCK.fullmatch(gguf_name)
    if m is None or m.group(2) not in _PER_LAYER:
        return None
    return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes llama.cpp's Q/K row permutation: per head, rows [dim/2 pairs, 2] -> [2, dim/2].
    weight: [n_head * head_dim, ...] (a bias too)."""
    dim = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, dim, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor: Any, path: Path) -> np.ndarray:
    """float32 array in row-major [rows, cols] order (GGUF lists shapes as [cols, rows])."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        arr = dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has quantization type {qtype.name}, which cannot be dequantized"
        ) from None
    except ValueError as e:  # bytes that do not fit the type's block size: a corrupt file
        raise ValueError(
            f"{path}: tensor {tensor.name!r} ({qtype.name}) cannot be dequantized: {e}"
        ) from None
    arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    # F32 tensors come back as views of the read-only memory map; torch wants a writable array.
    return arr if arr.flags.writeable else arr.copy()


def load_gguf_model(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: AttentionBackend,
    reader: Any = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Builds the model of GGUF file ``path`` with weights in ``dtype`` on ``device``, in eval mode.
    ``reader``: the file already opened by `open_gguf` (opening parses all metadata: seconds for a
    large vocabulary), else it is opened here."""
    start = time.perf_counter()
    if reader is None:
        reader = open_gguf(path)
    config = gguf_model_config(reader, path)
    model = build_empty_model(config, dtype, device, attn_backend)
    targets = _targets(model, config)
    filled: set[str] = set()
    permute = config.architecture == "LlamaForCausalLM"
    for tensor in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", leave=False):
        name = hf_name(tensor.name)
        target = targets.get(name) if name is not None else None
        if target is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for {config.architecture}")
        _copy_tensor(tensor, target, name or "", path, config, permute)
        filled.add(name or "")
    missing = sorted(set(targets) - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{path}: missing tensor(s) for: {shown}")
    logger.info("loaded %s: %d tensors, %.1f s", path.name, len(filled), time.perf_counter() - start)
    return model, config


def _copy_tensor(
    tensor: Any, target: _Target, name: str, path: Path, config: ModelConfig, permute: bool
) -> None:
    weight = torch.from_numpy(dequantize_tensor(tensor, path))
    if tuple(weight.shape) != target.shape:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has shape {list(weight.shape)}, expected {list(target.shape)}"
        )
    if permute and ".q_proj." in name:
        weight = unpermute_qk(weight, config.num_attention_heads)
    elif permute and ".k_proj." in name:
        weight = unpermute_qk(weight, config.num_key_value_heads)
    with torch.no_grad():
        target.param[target.row_start : target.row_start + target.shape[0]].copy_(weight)
