"""Builds a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE (tokens already spelled in GPT-2's byte alphabet, merges listed), with the
  split regex llama.cpp uses for `tokenizer.ggml.pre` (SmolLM2's "smollm", Llama 3's "llama-bpe",
  Qwen2's "qwen2"; anything else gets GPT-2's own).
- "llama": SentencePiece BPE (scores instead of merges; byte fallback through <0xNN> tokens). The
  merges are recovered from the scores as transformers' GGUF conversion does.
Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens,
so they are matched whole. Follows transformers/integrations/gguf/gguf_tokenizer_mapping.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def gguf_tokenizer_parts(reader: Any, path: Path) -> dict[str, Any] | None:
    """-> {"backend", "bos_token_id", "eos_token_ids", "add_bos_token", "chat_template"} (the
    Tokenizer's arguments), None for a file without tokenizer metadata."""
    from ..model.gguf_loader import field_value

    kind = field_value(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path}: missing metadata key 'tokenizer.ggml.tokens'")
    types = field_value(reader, "tokenizer.ggml.token_type") or []
    if kind == "gpt2":
        merges = field_value(reader, "tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{path}: missing metadata key 'tokenizer.ggml.merges'")
        backend = _byte_level(tokens, merges, field_value(reader, "tokenizer.ggml.pre"))
    elif kind == "llama":
        scores = field_value(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise ValueError(f"{path}: missing metadata key 'tokenizer.ggml.scores'")
        unk = field_value(reader, "tokenizer.ggml.unknown_token_id")
        backend = _sentencepiece(tokens, scores, tokens[int(unk)] if unk is not None else None)
    else:
        raise ValueError(f"{path}: key 'tokenizer.ggml.model' is {kind!r}; supported: 'gpt2', 'llama'")
    _add_tokens(backend, tokens, types)

    def opt_id(key: str) -> int | None:
        value = field_value(reader, f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= int(value) < len(tokens):
            raise ValueError(
                f"{path}: key 'tokenizer.ggml.{key}' is {value}, outside the {len(tokens)} tokens"
            )
        return None if value is None else int(value)

    eos = opt_id("eos_token_id")
    add_bos = field_value(reader, "tokenizer.ggml.add_bos_token")
    return {
        "backend": backend,
        "bos_token_id": opt_id("bos_token_id"),
        "eos_token_ids": [eos] if eos is not None else [],
        # llama.cpp adds BOS for SentencePiece vocabularies unless told otherwise.
        "add_bos_token": bool(add_bos) if add_bos is not None else kind == "llama",
        "chat_template": field_value(reader, "tokenizer.chat_template"),
    }


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> Backend:
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    backend = Backend(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, ignore_merges=False)
    )
    split = _SPLITS.get(pre or "")
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        # GPT-2's regex ("smollm" and the default); transformers' GGUF conversion does the same.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], scores: list[float], unk: str | None) -> Backend:
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, dict(zip(tokens, scores, strict=True))),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge, ranked by the merged token's score (best
    first), ties by the pieces' lengths; transformers' generate_merges, so ids agree with it."""
    merges: list[tuple[str, str, float]] = []
    for merged, score in scores.items():
        local = [
            (merged[:i], merged[i:], score)
            for i in range(1, len(merged))
            if merged[:i] in vocab and merged[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=False)
        if k == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=False)
        if k == _USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
