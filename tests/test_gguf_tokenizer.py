"""Tokenizer from GGUF metadata, SentencePiece-style vocabulary, against transformers' conversion
of the same file (the gpt2 case runs on SmolLM2's real file in test_smollm2.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_helpers import write_spm_vocab_gguf

from kvrelay.worker.text.tokenizer import Tokenizer

TEXTS = ["hello world", "hello  world", " hello", "hell or low", "héllo wörld ☃", "txt\nworld"]


def test_sentencepiece_vocab_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_spm_vocab_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.chat_template) == (1, (2,), None)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1  # add_bos_token
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    # Merges follow the scores: whole words where the vocabulary has them, bytes for the rest.
    assert ours.convert_ids_to_tokens(ours.encode("hello world", add_special_tokens=False)) == [
        "\u2581hello",
        "\u2581world",
    ]
    assert ours.convert_ids_to_tokens(ours.encode("☃", add_special_tokens=False))[-3:] == [
        "<0xE2>",
        "<0x98>",
        "<0x83>",
    ]


def test_tokenizer_load_picks_gguf_and_errors(tmp_path: Path) -> None:
    path = write_spm_vocab_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.load(path)
    assert tok is not None and tok.encode("hello") == Tokenizer.from_gguf(path).encode("hello")
    with pytest.raises(ValueError, match=r"^chat: model .*spm\.gguf has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"bad\.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(bad)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path: Path, pre: str) -> None:
    from gguf_helpers import write_byte_bpe_gguf
    from transformers import AutoTokenizer

    path = write_byte_bpe_gguf(tmp_path / "bpe.gguf", pre)
    ours = Tokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello the world", "  the   12345 hello\n\n world", "I'm HELLO<|endoftext|>é 日本"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), (pre, text)
