"""A thin wrapper over a `tokenizers` tokenizer.json plus the special-token ids from its config files.

Never imports transformers: a worker needs only encode/decode and the BOS/EOS ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from .chat_template import render_chat


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        name: str = "tokenizer",
    ) -> None:
        """add_bos_token: None keeps whatever tokenizer.json's post-processor does; True/False force a
        leading BOS on/off when special tokens are added (transformers' tokenizer_config.json flag).
        chat_template: the model's Jinja2 chat template, None when it has none. name: the model path,
        for error messages."""
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token=True needs a bos_token_id, got None")
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        post_adds_bos = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]
        self._prepend_bos = bool(add_bos_token) and not post_adds_bos
        self._strip_bos = add_bos_token is False and post_adds_bos
        self.chat_template = chat_template
        self.name = name
        # The strings templates see as bos_token / eos_token (transformers passes the tokens, not ids).
        self.bos_token: str = (backend.id_to_token(bos_token_id) or "") if bos_token_id is not None else ""
        first_eos = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token: str = (backend.id_to_token(first_eos) or "") if first_eos is not None else ""

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Reads tokenizer.json, and when present tokenizer_config.json (bos_token, eos_token,
        add_bos_token) and generation_config.json (eos_token_id, an int or a list: chat models such as
        Llama 3 list their end-of-turn tokens there)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{tok_file}: not found (a tokenizer directory needs tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"{tok_file}: not a valid tokenizer.json: {e}") from e

        cfg_file = path / "tokenizer_config.json"
        cfg = _read_json_object(cfg_file) if cfg_file.is_file() else {}
        bos = _special_token_id(backend, cfg.get("bos_token"), "bos_token", cfg_file)
        eos = _special_token_id(backend, cfg.get("eos_token"), "eos_token", cfg_file)
        add_bos = cfg.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ValueError(f"{cfg_file}: add_bos_token must be a bool, got {add_bos!r}")
        eos_ids = [eos] if eos is not None else []

        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            eos_ids += _generation_eos_ids(_read_json_object(gen_file), gen_file)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos_token=add_bos,
            chat_template=_dir_chat_template(path, cfg, cfg_file),
            name=str(path),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer a GGUF file describes in its tokenizer.ggml.* metadata (and its chat template)."""
        path = Path(path)
        tokenizer = cls._of_gguf(path)
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer (metadata key 'tokenizer.ggml.model' is absent)")
        return tokenizer

    @classmethod
    def load(cls, model_path: str | Path, gguf_reader: Any = None) -> Tokenizer | None:
        """The tokenizer of a resolved model path (a .gguf file or a HF directory); None when the
        model has none (it then serves token-id prompts only). ``gguf_reader``: the .gguf file
        already opened with `open_gguf` (the engine shares the one it loads the weights from)."""
        path = Path(model_path)
        if path.suffix.lower() == ".gguf":
            return cls._of_gguf(path, gguf_reader)
        return cls.from_dir(path) if (path / "tokenizer.json").is_file() else None

    @classmethod
    def _of_gguf(cls, path: Path, reader: Any = None) -> Tokenizer | None:
        from ..model.gguf_loader import open_gguf
        from .gguf_tokenizer import gguf_tokenizer_parts

        parts = gguf_tokenizer_parts(open_gguf(path) if reader is None else reader, path)
        return None if parts is None else cls(name=str(path), **parts)

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text the model was trained on. Raises ValueError("chat: ...")."""
        if self.chat_template is None:
            raise ValueError(
                f"chat: model {self.name} has no chat template; send a plain text prompt instead"
            )
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Renders then encodes without adding special tokens again: the template writes BOS itself
        where the model wants it (transformers' apply_chat_template(tokenize=True) does the same)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while Rust tokenizes (encode does not), so a long prompt
        # tokenized on the router's thread pool does not stall its event loop.
        ids: list[int] = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.bos_token_id is not None:
            if self._prepend_bos and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            elif self._strip_bos and ids[:1] == [self.bos_token_id]:
                del ids[0]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids the tokenizer does not know (a model's padded vocab rows) decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]


def _read_json_object(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_token_id(backend: tokenizers.Tokenizer, value: Any, field: str, file: Path) -> int | None:
    """value: the config entry, a token string, a serialized AddedToken ({"content": ...}) or null."""
    if value is None:
        return None
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise ValueError(f"{file}: {field} must be a token string or {{'content': str}}, got {value!r}")
    token_id = backend.token_to_id(content)
    if token_id is None:
        raise ValueError(f"{file}: {field} {content!r} is not in tokenizer.json's vocabulary")
    return token_id


def _generation_eos_ids(cfg: dict[str, Any], file: Path) -> list[int]:
    value = cfg.get("eos_token_id")
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{file}: eos_token_id must be a token id or a list of them, got {value!r}")
    return ids


def _dir_chat_template(path: Path, cfg: dict[str, Any], cfg_file: Path) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template (transformers' order), which
    is a string or a list of {"name", "template"} (the "default" one is taken)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja_file}: cannot read the chat template: {e}") from e
    value = cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
        raise ValueError(
            f"{cfg_file}: chat_template is a list without a 'default' template (names: {sorted(map(str, named))})"
        )
    raise ValueError(
        f"{cfg_file}: chat_template must be a string or a list of {{name, template}}, got {type(value).__name__}"
    )
