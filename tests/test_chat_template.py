"""Chat templates: our renderer against transformers' apply_chat_template on the same tokenizer dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvrelay.worker.model.tiny import write_tokenizer_files
from kvrelay.worker.text.chat_template import MAX_CHAT_MESSAGES
from kvrelay.worker.text.tokenizer import Tokenizer

# ChatML (SmolLM2 / Qwen style), with a default system prompt, a loop control and tojson.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 style: BOS/EOS strings from the vocabulary, raise_exception on bad role order.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
TOJSON = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Très bien — et toi ? 日本語"},
        {"role": "user", "content": 'Ünïcödé <b>&</b> "quotes"'},
    ],
]


def _tokenizer_dir(tmp_path: Path, template: str | list[dict[str, str]], as_file: bool = False) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(tmp_path, model_max_length=512)
    cfg_file = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    if as_file:
        assert isinstance(template, str)
        (tmp_path / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("template", [CHATML, LLAMA2, TOJSON], ids=["chatml", "llama2", "tojson"])
@pytest.mark.parametrize("gen", [True, False])
def test_matches_transformers(tmp_path: Path, template: str, gen: bool) -> None:
    d = _tokenizer_dir(tmp_path, template)
    ours, ref = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == template
    for conv in CONVERSATIONS:
        if template is LLAMA2 and conv[0]["role"] == "system":
            continue
        expected_text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert ours.render_chat(conv, add_generation_prompt=gen) == expected_text
        expected_ids = ref.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=gen, return_dict=False
        )
        assert ours.apply_chat_template(conv, add_generation_prompt=gen) == list(expected_ids)


def test_template_sources(tmp_path: Path) -> None:
    listed = _tokenizer_dir(
        tmp_path / "a", [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    )
    assert Tokenizer.from_dir(listed).chat_template == CHATML
    jinja = _tokenizer_dir(tmp_path / "b", LLAMA2, as_file=True)
    assert Tokenizer.from_dir(jinja).chat_template == LLAMA2
    no_default = _tokenizer_dir(tmp_path / "c", [{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match=r"chat_template is a list without a 'default' template"):
        Tokenizer.from_dir(no_default)


def test_errors(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "a", LLAMA2))
    user = {"role": "user", "content": "x"}
    with pytest.raises(
        ValueError, match=r"^chat: the model's chat template failed: Conversation roles must alternate"
    ):
        tok.apply_chat_template([user, user])
    with pytest.raises(ValueError, match=r"^chat: messages must hold at least 1 message, got 0$"):
        tok.apply_chat_template([])
    with pytest.raises(
        ValueError, match=r"^chat: messages\[1\]\.role must be a string of 1 to 64 characters, got ''$"
    ):
        tok.apply_chat_template([user, {"role": "", "content": "x"}])
    with pytest.raises(ValueError, match=r"^chat: messages\[0\]\.content must be a string, got int$"):
        tok.apply_chat_template([{"role": "user", "content": 3}])  # type: ignore[dict-item]
    with pytest.raises(
        ValueError, match=rf"^chat: messages holds {MAX_CHAT_MESSAGES + 1} messages, the limit is"
    ):
        tok.apply_chat_template([user] * (MAX_CHAT_MESSAGES + 1))
    bad = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "b", "{% for %}"))
    with pytest.raises(ValueError, match=r"^chat: the model's chat template does not parse \(line 1\)"):
        bad.apply_chat_template([user])
    # The sandbox refuses attribute escapes and reports them as a template failure.
    escape = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "c", "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(ValueError, match=r"^chat: the model's chat template failed"):
        escape.render_chat([user])
    plain = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "d", "x"))
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"^chat: model .* has no chat template"):
        plain.apply_chat_template([user])
