"""Factories that write small GGUF files with gguf.GGUFWriter, as llama.cpp's converter would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

# HF name suffix -> GGUF name suffix (per layer).
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute: half-split RoPE rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    stem, _, leaf = hf.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{leaf}"
    _, _, rest = stem.partition("model.layers.")
    layer, _, module = rest.partition(".")
    return f"blk.{layer}.{_LAYER[module]}.{leaf}"


def write_gguf_from_checkpoint(
    ckpt: Path, out: Path, arch: str = "llama", edit: Callable[[GGUFWriter], None] | None = None
) -> Path:
    """The F32 GGUF of a single-file HF checkpoint dir (tests/checkpoints.make_checkpoint)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(
        float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e4))
    )
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if edit is not None:
        edit(w)
    for name, tensor in load_file(str(ckpt / "model.safetensors")).items():
        if arch == "llama" and ".q_proj." in name:
            tensor = llama_cpp_permute(tensor, heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = llama_cpp_permute(tensor, kv_heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(tensor, dtype=np.float32))
    _finish(w)
    return out


def write_quantized_gguf(out: Path, tensors: dict[str, np.ndarray], qtype: GGMLQuantizationType) -> Path:
    """A GGUF holding ``tensors`` quantized to ``qtype`` (float32 rows, cols a block multiple)."""
    w = GGUFWriter(str(out), "llama")
    for name, arr in tensors.items():
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            # The quantized array is uint8 [rows, row bytes]; the writer derives the logical shape.
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    _finish(w)
    return out


def write_raw_gguf(out: Path, name: str, blocks: np.ndarray, qtype: GGMLQuantizationType) -> Path:
    """A GGUF holding one tensor given as its quantized bytes, uint8 [rows, row bytes]."""
    w = GGUFWriter(str(out), "llama")
    w.add_tensor(name, blocks, raw_dtype=qtype)
    _finish(w)
    return out


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_spm_vocab_gguf(out: Path) -> Path:
    """A tokenizer-only GGUF with a small SentencePiece-style ("llama") vocabulary: <unk> <s> </s>,
    256 byte-fallback tokens <0xNN>, then pieces whose scores fix the merge order."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "ell", "hell", "\u2581hell", "\u2581hello",
              "lo", "ld", "\u2581w", "or", "\u2581wor", "\u2581world", "\u2581t", "t", "x"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    # Longer pieces score higher, as SentencePiece BPE's merge ranks do.
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-100.0 + len(p) * 10 - i * 0.01 for i, p in enumerate(pieces))]
    types = [2, 3, 3, *([6] * 256), *([1] * len(pieces))]  # unknown, control, byte, normal
    w = GGUFWriter(str(out), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    _finish(w)
    return out


def write_byte_bpe_gguf(out: Path, pre: str) -> Path:
    """A tokenizer-only GGUF with a small GPT-2-style ("gpt2") byte-level BPE vocabulary and the
    pre-tokenizer name ``pre`` (tokenizer.ggml.pre); one control token, <|endoftext|>."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())  # 256 byte spellings, "Ġ" is the space
    merges = ["Ġ t", "h e", "Ġt he", "l l", "e ll", "h ell", "hell o", "1 2", "12 3", "Ġ w", "o r", "Ġw or"]
    tokens = [*alphabet, *(m.replace(" ", "") for m in merges), "<|endoftext|>"]
    w = GGUFWriter(str(out), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    _finish(w)
    return out
