"""Chat templates: render a conversation with the model's Jinja2 template, as transformers'
`apply_chat_template` does (same sandbox, same options, same helpers), without importing it.

The template is untrusted model data, so it runs in jinja2's ImmutableSandboxedEnvironment; every
template failure (syntax, `raise_exception`, a sandbox violation) becomes `ValueError("chat: ...")`
so the API layers can answer INVALID_ARGUMENT / HTTP 400 instead of a traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

# A conversation longer than this is almost certainly a client bug; the token budget (max prompt
# length) bounds the rest.
MAX_CHAT_MESSAGES = 1024
# Roles are whatever the model's template knows ("system", "user", "assistant", "tool", Llama 3.1's
# "ipython", ...): the template rejects the ones it does not; here only the shape is bounded.
MAX_ROLE_CHARS = 64


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Checks the shape of a conversation and returns plain-dict copies (the template sees only these)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"chat: messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("chat: messages must hold at least 1 message, got 0")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise ValueError(f"chat: messages holds {len(messages)} messages, the limit is {MAX_CHAT_MESSAGES}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(
                f"chat: messages[{i}] must be an object with role and content, got {type(m).__name__}"
            )
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not 0 < len(role) <= MAX_ROLE_CHARS:
            raise ValueError(
                f"chat: messages[{i}].role must be a string of 1 to {MAX_ROLE_CHARS} characters, got {role!r}"
            )
        if not isinstance(content, str):
            raise ValueError(f"chat: messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Renders `messages` with `template`. bos_token / eos_token: the special-token strings (not ids)."""
    msgs = validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat: the model's chat template failed: {e}") from e
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        # Errors raised by Python operations the template performs on its inputs.
        raise ValueError(f"chat: the model's chat template failed: {type(e).__name__}: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; templates expect plain JSON (transformers overrides it the same way).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """One compiled template per distinct source: a server renders the same template per request."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(
            f"chat: the model's chat template does not parse (line {e.lineno}): {e.message}"
        ) from e
