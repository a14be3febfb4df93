from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kvrelay.worker.text.detokenizer import DetokenizedDelta, IncrementalDetokenizer
from kvrelay.worker.text.tokenizer import Tokenizer

CORPUS = [
    "héllo wörld 日本語 🙂",
    "hello world, the quick brown fox jumps over the lazy dog.",
    "naïve café déjà vu — ça va? 東京 タワー 👍🏽 🙂🙂",
    "STOP here. stop there. <end> of text",
]
SPECIALS = ["<s>", "</s>", "<pad>"]
# Characters of 1 to 4 UTF-8 bytes, several of them never merged by a tiny BPE.
CHAR_POOL = [*"abcxyz .,!?é", "ö", "ß", "日", "本", "語", "東", "京", "🙂", "👍", "🏽", "\u00a0", "€"]


def _byte_to_char() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: the printable stand-in ByteLevel uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


BYTE_TO_CHAR = _byte_to_char()


def _build_backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def _save(tmp: Path, backend: HFTokenizer, config: dict[str, object] | None = None) -> Path:
    backend.save(str(tmp / "tokenizer.json"))
    if config is not None:
        (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = _save(tmp_path_factory.mktemp("tok"), _build_backend(), {"bos_token": "<s>", "eos_token": "</s>"})
    return Tokenizer.from_dir(path)


def _byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte of text."""
    ids = [tok.token_to_id(BYTE_TO_CHAR[b]) for b in text.encode()]
    assert all(i is not None for i in ids)
    return [i for i in ids if i is not None]


def _mixed_ids(tok: Tokenizer, text: str, rng: random.Random) -> list[int]:
    """Tokens for text, each word either BPE-encoded or split into single-byte tokens."""
    ids: list[int] = []
    for word in text.split(" "):
        piece = word + " "
        ids += _byte_ids(tok, piece) if rng.random() < 0.5 else tok.encode(piece, add_special_tokens=False)
    return ids


def _feed(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int]) -> list[DetokenizedDelta]:
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.add_tokens(ids[i : i + size]))
        i += size
        if deltas[-1].stopped:
            return deltas
    assert i == len(ids)
    deltas.append(detok.flush())
    return deltas


def _random_chunks(n: int, rng: random.Random) -> list[int]:
    chunks: list[int] = []
    while sum(chunks) < n:
        chunks.append(min(rng.randint(1, 5), n - sum(chunks)))
    return chunks


def test_tokenizer_from_dir_reads_special_tokens_and_round_trips(tok: Tokenizer) -> None:
    assert tok.vocab_size > 256 + len(SPECIALS)  # every byte, the specials and some merges
    assert tok.id_to_token(tok.vocab_size - 1) is not None and tok.id_to_token(tok.vocab_size) is None
    assert tok.bos_token_id == tok.token_to_id("<s>") == 0
    assert tok.eos_token_ids == (1,)
    assert tok.special_token_ids == frozenset({0, 1, 2})
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.convert_ids_to_tokens([0, 1]) == ["<s>", "</s>"]
    assert (
        tok.decode([0, *tok.encode("hi", add_special_tokens=False), 1], skip_special_tokens=False)
        == "<s>hi</s>"
    )


def test_tokenizer_bos_policy_and_generation_config_eos(tmp_path: Path) -> None:
    backend = _build_backend()
    config = {
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "add_bos_token": True,
    }
    _save(tmp_path, backend, config)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (1, 2)
    body = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [0, *body]

    # A post-processor that adds BOS, switched off by add_bos_token=false.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    _save(tmp_path, backend, {**config, "add_bos_token": False})
    assert Tokenizer.from_dir(tmp_path).encode("hello") == body
    _save(tmp_path, backend, {"bos_token": "<s>"})
    assert Tokenizer.from_dir(tmp_path).encode("hello") == [0, *body]


def test_tokenizer_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json: not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    _save(tmp_path, _build_backend())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: cannot read JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<nope>' is not in"):
        Tokenizer.from_dir(tmp_path)


def test_emoji_split_into_four_byte_tokens_is_emitted_once_complete(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "a🙂b")
    assert len(ids) == 6
    detok = IncrementalDetokenizer(tok, prompt_ids=[])
    assert [detok.add_tokens([i]).new_text for i in ids] == ["a", "", "", "", "🙂", "b"]
    assert detok.flush().new_text == ""
    assert detok.text == "a🙂b"


@pytest.mark.parametrize("seed", range(6))
def test_streaming_equals_full_decode_for_any_chunking(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = " ".join("".join(rng.choices(CHAR_POOL, k=rng.randint(1, 6))) for _ in range(40))
    ids = _mixed_ids(tok, text, rng)
    prompt = tok.encode("héllo wörld ")
    assert tok.decode(ids) == text + " "
    for chunks in ([1] * len(ids), _random_chunks(len(ids), rng)):
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = _feed(detok, ids, chunks)
        assert all("\ufffd" not in d.new_text for d in deltas)
        assert "".join(d.new_text for d in deltas) == detok.text == tok.decode(ids)
        assert [d.num_consumed for d in deltas[:-1]] == chunks


@pytest.mark.parametrize("seed", range(3))
def test_invalid_utf8_bytes_stream_like_full_decode(tok: Tokenizer, seed: int) -> None:
    """Random bytes (mostly invalid UTF-8): the stream still equals the lossy full decode."""
    rng = random.Random(seed)
    ids = [
        tok.token_to_id(BYTE_TO_CHAR[rng.choice([0x41, 0x80, 0x9F, 0xC3, 0xE6, 0xF0, 0xFF])])
        for _ in range(200)
    ]
    detok = IncrementalDetokenizer(tok, [])
    deltas = _feed(detok, [i for i in ids if i is not None], [1] * len(ids))
    assert "".join(d.new_text for d in deltas) == tok.decode([i for i in ids if i is not None])


def test_long_run_of_invalid_bytes_is_released_before_it_ends(tok: Tokenizer) -> None:
    """Bytes that never form a character must not hold the window open forever (the cap is 32)."""
    ids = [tok.token_to_id(BYTE_TO_CHAR[0xFF])] * 40
    detok = IncrementalDetokenizer(tok, [])
    texts = [detok.add_tokens([i]).new_text for i in ids if i is not None]
    assert texts[:32] == [""] * 32 and texts[32] == "\ufffd" * 33
    assert "".join(texts) + detok.flush().new_text == "\ufffd" * 40


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = [0, *tok.encode("hi", add_special_tokens=False), *[2] * 40, *_byte_ids(tok, "日"), 1]
    for skip, expected in ((True, "hi日"), (False, "<s>hi" + "<pad>" * 40 + "日</s>")):
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        deltas = _feed(detok, ids, [1] * len(ids))
        assert "".join(d.new_text for d in deltas) == expected == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_context_is_not_emitted(tok: Tokenizer) -> None:
    prompt = _byte_ids(tok, "日本")[:-1]  # the prompt ends inside a character
    out = _byte_ids(tok, "本")[-1:] + tok.encode("x", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.add_tokens([i]).new_text for i in out] == ["", "x"]


def test_stop_string_across_token_boundaries(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "say STOP now")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    deltas = [detok.add_tokens([i]) for i in ids[:8]]
    texts = [d.new_text for d in deltas]
    assert texts == ["s", "a", "y", " ", "", "", "", ""]  # "S", "ST", "STO" held back, then the match
    assert [d.stopped for d in deltas] == [False] * 7 + [True]
    assert deltas[-1].num_consumed == 1 and deltas[-1].stop_string == "STOP"
    assert detok.text == "say " and detok.finished
    with pytest.raises(RuntimeError):
        detok.add_tokens([ids[8]])
    assert detok.flush() == DetokenizedDelta("", False, 0)


def test_stop_string_in_a_chunk_reports_tokens_consumed(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "ab日本語cd")
    detok = IncrementalDetokenizer(tok, [], stop=["本語", "zz"])
    delta = detok.add_tokens(ids)
    # "ab" (2 tokens) + 日 (3) + 本 (3) + 語 (3): the stop completes with token 11.
    assert delta == DetokenizedDelta("ab日", True, 11, "本語")


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    delta = detok.add_tokens(tok.encode("STOP here.", add_special_tokens=False))
    assert delta.stopped and delta.new_text == "" and detok.text == ""


def test_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["there", "stop"])
    delta = detok.add_tokens(tok.encode("STOP here. stop there.", add_special_tokens=False))
    assert delta.new_text == "STOP here. " and delta.stop_string == "stop"


def test_held_back_text_released_when_it_cannot_match_and_flushed_at_end(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["<end>", "xyz"])
    ids = _byte_ids(tok, "a<enx<exy")
    texts = [detok.add_tokens([i]).new_text for i in ids]
    assert texts == ["a", "", "", "", "<en", "x", "", "<e", ""]
    final = detok.flush()
    assert final == DetokenizedDelta("xy", False, 0)
    assert detok.text == "a<enx<exy"


def test_rejects_empty_stop_string(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=["ok", ""])


# ---- step: the one call of the engine and the router ------------------------------------------
def test_step_flushes_held_text_only_on_the_last_step(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["xyz"])
    ids = _byte_ids(tok, "abxy")
    assert detok.step(ids[:3], last=False) == DetokenizedDelta("ab", False, 3)  # "x" held back
    assert detok.step([], last=False) == DetokenizedDelta("", False, 0)
    # Ending for another reason (EOS, length): the held "x" and the new "y" are released together.
    assert detok.step(ids[3:], last=True) == DetokenizedDelta("xy", False, 1)
    assert detok.finished and detok.text == "abxy" == tok.decode(ids)


def test_step_with_no_tokens_on_the_last_step_flushes(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["<end>"])
    assert detok.step(_byte_ids(tok, "ok <en"), last=False).new_text == "ok "
    assert detok.step([], last=True) == DetokenizedDelta("<en", False, 0)


def test_step_stop_string_wins_over_the_last_step(tok: Tokenizer) -> None:
    """A stop string completed within the last step's tokens ends the request with STOP; the tokens
    after it are not consumed and the held text is not flushed past it."""
    detok = IncrementalDetokenizer(tok, [], stop=["cd"])
    ids = _byte_ids(tok, "abcde")
    assert detok.step(ids, last=True) == DetokenizedDelta("ab", True, 4, "cd")
    assert detok.text == "ab"


def test_step_equals_add_tokens_then_flush_on_random_streams(tok: Tokenizer) -> None:
    """Against the two-call form and against the tokenizer's own decode of the whole output."""
    rng = random.Random(7)
    num_stopped = 0
    for trial in range(30):
        text = "".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 40)))
        ids = _mixed_ids(tok, text, rng)
        cuts = sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, 5))) if len(ids) > 1 else []
        chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        i = rng.randrange(len(text))
        stop = [text[i : i + 2] if rng.random() < 0.6 else "qq"]  # mostly one that occurs
        one, two = IncrementalDetokenizer(tok, [], stop=stop), IncrementalDetokenizer(tok, [], stop=stop)
        got, want = [], []
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            d = one.step(chunk, last=last)
            got.append(d.new_text)
            ref = two.add_tokens(chunk)
            want.append(ref.new_text + (two.flush().new_text if last and not ref.stopped else ""))
            assert (d.stopped, d.num_consumed) == (ref.stopped, ref.num_consumed), trial
            if d.stopped:
                num_stopped += 1
                break
        assert got == want, trial
        full = tok.decode(ids)
        cut = min((full.find(s) for s in stop if s in full), default=len(full))
        assert "".join(got) == full[:cut], (trial, text)
    assert 5 <= num_stopped <= 25, num_stopped  # both endings were exercised
