"""The built-in ``tiny`` model: a small random Llama with a byte-level tokenizer.

It lets the whole engine run (CPU CI, demos, smoke tests) without downloading anything.
It is a complete Hugging Face model directory, written once on first use and loaded by
the same loader and tokenizer code as any real model. Its weights are deterministic, so
its greedy outputs are stable across runs and machines with the same torch version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

TINY_NAME = "tiny-v2"  # bump when the weights or files change, so stale caches are not reused
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257  # ids 0..255 are the bytes themselves

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,  # 256 bytes + <s>, </s>, rounded up to a multiple of 64; the rest unused
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "float32",
}
_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_root() -> Path:
    """``$KVRELAY_CACHE_DIR``, default ``~/.cache/kvrelay``: where built-in models are kept."""
    return Path(os.environ.get("KVRELAY_CACHE_DIR") or Path.home() / ".cache" / "kvrelay").expanduser()


def tiny_model_dir() -> Path:
    """The tiny model's directory under ``$KVRELAY_CACHE_DIR`` (default ``~/.cache/kvrelay``),
    written on first use. Safe when processes race: each writes a private temp dir and
    renames it into place; a loser finds the winner's complete copy and drops its own."""
    root = cache_root()
    final = root / TINY_NAME
    if final.exists():
        _check_complete(final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}.tmp-", dir=root))
    try:
        write_tiny_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():  # the rename failed for another reason than losing a race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_complete(final)
    return final


def _check_complete(model_dir: Path) -> None:
    missing = [name for name in _FILES if not (model_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"{model_dir}: incomplete tiny model (missing {', '.join(missing)}); delete it")


def write_tiny_model(model_dir: Path) -> None:
    """Writes every file of the tiny model into the existing directory ``model_dir``."""
    _write_json(model_dir / "config.json", TINY_CONFIG)
    _write_json(model_dir / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    save_file(tiny_weights(), str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(model_dir, model_max_length=TINY_CONFIG["max_position_embeddings"])


def tiny_weights() -> dict[str, torch.Tensor]:
    """Hugging Face-named float32 weights: N(0, 0.02) from a generator seeded 0, norms 1."""
    c = TINY_CONFIG
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_size = c["num_attention_heads"] * head_dim
    kv_size = c["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_size, hidden),
            p + "self_attn.k_proj.weight": (kv_size, hidden),
            p + "self_attn.v_proj.weight": (kv_size, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_size),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (c["vocab_size"], hidden)}
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in shapes.items():  # insertion order fixes the random stream
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape)
        else:
            weights[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
    # Random weights emit random bytes, mostly invalid UTF-8. A demo should print readable
    # gibberish: zero the output rows of every id but printable ASCII and EOS, and scale
    # those up, so they win greedy decoding always and sampling at temperature 1 nearly always.
    readable = torch.zeros(c["vocab_size"], dtype=torch.bool)
    readable[32:127] = True
    readable[EOS_ID] = True
    weights["lm_head.weight"] = torch.where(readable[:, None], weights["lm_head.weight"] * 10, 0.0)
    return weights


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: token id b < 256 is byte b (no merges), plus <s> and </s>.

    Every UTF-8 string round-trips: encode, then decode with special tokens skipped.
    A BOS is prepended to every encoding by the post-processor.
    """
    byte_to_char = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(BOS_TOKEN, special=True, normalized=False),
            AddedToken(EOS_TOKEN, special=True, normalized=False),
        ]
    )
    assert tok.token_to_id(BOS_TOKEN) == BOS_ID and tok.token_to_id(EOS_TOKEN) == EOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tok


def write_tokenizer_files(model_dir: Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json of the byte tokenizer, as transformers writes them."""
    byte_tokenizer().save(str(model_dir / "tokenizer.json"))
    _write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": _CHAT_TEMPLATE,
        },
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
