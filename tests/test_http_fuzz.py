"""Fuzzing the OpenAI HTTP API with hypothesis: random JSON bodies on both generation routes.

One server over the in-process fake pool (one tiny-model worker). Every response must be 200 with
OpenAI's shape, or an error in OpenAI's error JSON with a 4xx status: never a 5xx, a traceback,
or FastAPI's 422. Streams are read to their end (max_tokens is capped so each stays short).
Afterwards the engine holds no request and no KV block. `derandomize`: the same examples each run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_pool import FakePool
from http_helpers import HttpServed, start_http, stop_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray_helpers import LoopThread

from kvrelay.worker.engine import Engine

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
SMALL_INT = st.one_of(st.integers(-2, 6), st.sampled_from([319, 320, 2**32, -(2**63)]))
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", ""]), JSON_SCALAR)},
    optional={"content": st.one_of(st.text(max_size=32), JSON_VALUE)},
)
FIELDS: dict[str, Any] = {
    "model": st.one_of(st.just("tiny"), JSON_SCALAR),
    "prompt": st.one_of(st.text(max_size=32), st.lists(SMALL_INT, max_size=8), JSON_VALUE),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON_VALUE),
    "max_tokens": SMALL_INT,
    "max_completion_tokens": SMALL_INT,
    "temperature": st.one_of(st.floats(-1, 3), JSON_SCALAR),
    "top_p": st.one_of(st.floats(-0.5, 1.5), JSON_SCALAR),
    "top_k": SMALL_INT,
    "min_p": st.floats(-0.5, 1.5),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), JSON_VALUE),
    "seed": SMALL_INT,
    "logprobs": st.one_of(st.booleans(), SMALL_INT, st.integers(0, 25)),
    "top_logprobs": st.one_of(SMALL_INT, st.integers(0, 25)),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "n": SMALL_INT,
    "stream": st.one_of(st.booleans(), JSON_SCALAR),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON_VALUE),
    "ignore_eos": st.booleans(),
    "echo": st.booleans(),
    "unknown_field": JSON_VALUE,
}
BODY = st.fixed_dictionaries({}, optional=FIELDS)


@pytest.fixture(scope="module")
def served() -> Iterator[HttpServed]:
    lt = LoopThread()
    s = start_http(lt, FakePool(1, num_kv_blocks=128))
    yield s
    stop_http(s)
    lt.close()


def _check_error(status: int, text: str) -> None:
    assert 400 <= status < 500, (status, text)
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, text
    assert "Traceback" not in text and 'File "' not in text, text


@FUZZ
@given(body=BODY, chat=st.booleans())
def test_random_bodies_get_openai_answers_or_4xx(
    served: HttpServed, body: dict[str, Any], chat: bool
) -> None:
    for key in ("max_tokens", "max_completion_tokens"):  # keep each accepted request short
        if isinstance(body.get(key), int) and body[key] > 6:
            body[key] = 6
    body.setdefault("max_tokens", 4)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with served.httpx() as c, c.stream("POST", path, json=body) as r:
        text = r.read().decode()
    if r.status_code != 200:
        _check_error(r.status_code, text)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], text
        for e in events[:-2]:
            chunk = json.loads(e.removeprefix("data: "))
            assert "error" not in chunk, chunk
    else:
        answer = json.loads(text)
        assert answer["object"] == ("chat.completion" if chat else "text_completion"), answer
        assert answer["usage"]["completion_tokens"] <= 6


def test_engine_is_idle_after_fuzzing(served: HttpServed) -> None:
    def read(e: Engine) -> tuple[int, int]:
        e.check_integrity()
        return len(e.requests), e.allocator.num_used_blocks

    worker = served.router._pool.workers[0]  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while served.lt.run(worker.call(read)) != (0, 0):
        assert time.monotonic() < deadline, "the engine still holds requests after fuzzing"
        time.sleep(0.05)
    assert served.router._streams == {}
