"""The OpenAI HTTP API over in-process engines (FakePool, no Ray): the official `openai` client
against the gRPC path's token ids (an independent path to the same engines), raw HTTP for every
error code and body shape, client disconnects freeing KV blocks, and drain."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from fake_pool import FakePool
from http_helpers import (
    HttpServed,
    chat_model_dir,
    plain_model_dir,
    reference_chat_ids,
    start_http,
    stop_http,
)
from ray_helpers import LoopThread

from kvrelay.cluster.auth import TokenSet
from kvrelay.cluster.client import KvrelayClient
from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc
from kvrelay.worker.engine import Engine
from kvrelay.worker.text.tokenizer import Tokenizer

TOKEN = "t" * 32
needs_chat = pytest.mark.skipif(
    not hasattr(Tokenizer, "apply_chat_template"), reason="Tokenizer.apply_chat_template not merged yet"
)


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def main(lt: LoopThread, model_dir: Path) -> Iterator[HttpServed]:
    pool = FakePool(2, model=str(model_dir), num_kv_blocks=256)
    s = start_http(lt, pool, max_message_bytes=1 << 16)
    yield s
    stop_http(s)


@pytest.fixture(scope="module")
def guarded(lt: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServed]:
    """Tokens on, admission of one request, one worker (killed by a test), no chat template."""
    plain = plain_model_dir(tmp_path_factory.mktemp("models"))
    pool = FakePool(1, model=str(plain), num_kv_blocks=128, revive_after_s=1.0)
    s = start_http(lt, pool, TokenSet([TOKEN]), max_queued_requests=1)
    yield s
    stop_http(s)


def grpc_ids(s: HttpServed, prompt: str | list[int], max_tokens: int, **kw: Any) -> list[int]:
    with KvrelayClient(s.grpc_address, timeout=60.0) as c:
        return list(c.generate(prompt, max_tokens=max_tokens, ignore_eos=True, **kw).token_ids)


def engine_state(s: HttpServed, rank: int) -> tuple[int, int]:
    """(live requests, used KV blocks) of a worker's engine, after its integrity check."""

    def read(e: Engine) -> tuple[int, int]:
        e.check_integrity()
        return len(e.requests), e.allocator.num_used_blocks

    result: tuple[int, int] = s.lt.run(s.router._pool.workers[rank].call(read))  # type: ignore[attr-defined]
    return result


def wait_engines(s: HttpServed, want: str, timeout_s: float = 5.0) -> None:
    """Until every engine is idle ("idle") or some engine runs a request ("busy")."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [engine_state(s, r) for r in range(len(s.router._pool.workers))]  # type: ignore[attr-defined]
        if want == "idle" and all(st == (0, 0) for st in states):
            return
        if want == "busy" and any(st[0] > 0 for st in states):
            return
        assert time.monotonic() < deadline, f"engines not {want} after {timeout_s} s: {states}"
        time.sleep(0.02)


def decode(s: HttpServed, ids: list[int]) -> str:
    codec = s.router.codec
    assert codec is not None and codec.tokenizer is not None
    return codec.tokenizer.decode(ids)


# ---- completions --------------------------------------------------------------------------
def test_completion_equals_the_grpc_tokens(main: HttpServed) -> None:
    ids = grpc_ids(main, "Hello kvrelay", 12, logprobs=2)
    r = main.openai().completions.create(
        model="tiny-chat", prompt="Hello kvrelay", max_tokens=12, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.text == decode(main, ids)
    assert choice.finish_reason == "length"
    assert r.object == "text_completion" and r.model == "tiny-chat" and r.id.startswith("cmpl-")
    assert choice.logprobs is not None and choice.logprobs.tokens == [decode(main, [t]) for t in ids]
    assert [len(t) for t in choice.logprobs.top_logprobs or []] == [2] * 12
    assert r.usage is not None
    prompt_len = len(main.router.codec.tokenizer.encode("Hello kvrelay"))  # type: ignore[union-attr]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_len, 12, prompt_len + 12,
    )  # fmt: skip
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_completion_token_ids_prompt_and_stream_with_usage(main: HttpServed) -> None:
    prompt = [5, 6, 7, 8, 9, 10, 11]
    ids = grpc_ids(main, prompt, 10)
    chunks = list(
        main.openai().completions.create(
            model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks[:-1]) == decode(main, ids)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 10)
    assert len({c.id for c in chunks}) == 1


def test_stop_string_cuts_the_text(main: HttpServed) -> None:
    full = decode(main, grpc_ids(main, "Hello kvrelay", 16))
    stop = full[5:7]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = main.openai().completions.create(
            model="tiny-chat", prompt="Hello kvrelay", max_tokens=16, temperature=0, stop=[stop], stream=stream,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        if stream:
            chunks = list(r)  # type: ignore[arg-type]
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason  # type: ignore[union-attr]
        assert (text, finish) == (cut, "stop")
    wait_engines(main, "idle")


def test_sse_wire_format(main: HttpServed) -> None:
    body = {"model": "tiny-chat", "prompt": "Hi", "max_tokens": 3, "stream": True, "temperature": 0}
    with main.httpx() as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)


# ---- chat ---------------------------------------------------------------------------------
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello kvrelay"},
]


@needs_chat
def test_chat_equals_grpc_on_the_reference_template(main: HttpServed, model_dir: Path) -> None:
    ref_ids = reference_chat_ids(model_dir, MESSAGES)
    ids = grpc_ids(main, ref_ids, 10, logprobs=1)
    r = main.openai().chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_completion_tokens=10, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True},
    )  # type: ignore[call-overload]  # fmt: skip
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == decode(main, ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage is not None and r.usage.prompt_tokens == len(ref_ids)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [e.token for e in choice.logprobs.content] == [decode(main, [t]) for t in ids]
    assert [len(e.top_logprobs) for e in choice.logprobs.content] == [2] * 10
    # gRPC's chat prompt renders the same ids
    with grpc.insecure_channel(main.grpc_address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MESSAGES])
        sampling = pb.SamplingParams(max_tokens=10, ignore_eos=True)
        got = [
            t
            for resp in stub.Generate(pb.GenerateRequest(chat=chat, sampling=sampling))
            for t in resp.token_ids
        ]
    assert got == ids


@needs_chat
def test_chat_stream_role_then_content_then_usage(main: HttpServed) -> None:
    whole = main.openai().chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )  # type: ignore[call-overload]
    chunks = list(
        main.openai().chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # type: ignore[call-overload]
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    usage, whole_usage = chunks[-1].usage, whole.usage
    assert chunks[-1].choices == [] and usage is not None and whole_usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole_usage.prompt_tokens, 8)
    assert whole_usage.completion_tokens == 8


def test_chat_without_a_template_names_messages(guarded: HttpServed) -> None:
    with guarded.httpx() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny-plain", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["message"].startswith("chat: this model has no chat template")


# ---- errors -------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/completions", {"prompt": "a", "n": 2}, "n", "n: only n=1 is supported"),
        (
            "/v1/completions",
            {"prompt": "a", "temperature": -1},
            "temperature",
            "temperature: Input should be greater",
        ),
        ("/v1/completions", {}, "prompt", "prompt: Field required"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "prompt: one prompt per request"),
        (
            "/v1/completions",
            {"prompt": "a", "max_tokens": 5000},
            "max_tokens",
            "max_tokens: at most max_model_len",
        ),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs", "logprobs: Input should be less"),
        (
            "/v1/completions",
            {"prompt": [5, 999]},
            "prompt",
            "token_ids: token id 999 is outside the vocabulary",
        ),
        ("/v1/completions", {"prompt": "a", "stop": ["x"] * 17}, "stop", "stop: at most 16 stop strings"),
        (
            "/v1/completions",
            {"prompt": "a", "presence_penalty": 3},
            "presence_penalty",
            "presence_penalty: must be in",
        ),
        ("/v1/chat/completions", {"messages": []}, "messages", "messages: List should have at least 1 item"),
        (
            "/v1/chat/completions",
            {"messages": [{"content": "x"}]},
            "messages.0.role",
            "messages.0.role: Field",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "top_logprobs: needs logprobs",
        ),
    ],
)
def test_invalid_field_is_400_naming_it(
    main: HttpServed, path: str, body: dict[str, Any], param: str, message: str
) -> None:
    with main.httpx() as c:
        error = _error(c.post(path, json={"model": "tiny-chat", **body}), 400)
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert error["message"].startswith(message), error["message"]


def test_body_errors(main: HttpServed) -> None:
    with main.httpx() as c:
        bad_json = _error(
            c.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400
        )
        assert bad_json["message"].startswith("request body: not valid JSON")
        deep = _error(
            c.post("/v1/completions", content=b"[" * 60_000, headers={"content-type": "application/json"}),
            400,
        )
        assert deep["message"] == "request body: JSON nested too deeply"
        not_object = _error(c.post("/v1/completions", json=[1]), 400)
        assert not_object["message"] == "request body: must be a JSON object, got list"
        wrong_type = _error(
            c.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"}), 415
        )
        assert wrong_type["message"] == "content-type: must be application/json, got 'text/plain'"
        big = _error(c.post("/v1/completions", json={"model": "tiny-chat", "prompt": "a" * 70_000}), 413)
        assert big["message"] == "request body: larger than 65536 bytes"
        model = _error(c.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"}), 404)
        assert (model["param"], model["code"]) == ("model", "model_not_found")
        route = _error(c.get("/v1/nothing"), 404)
        assert route["message"] == "GET /v1/nothing: no such route"


def test_models_and_health(main: HttpServed) -> None:
    models = main.openai().models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    with main.httpx() as c:
        assert c.get("/health").json() == {"status": "serving"}


def test_auth_admission_and_no_worker(guarded: HttpServed) -> None:
    body = {"model": "tiny-plain", "prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with guarded.httpx() as c:
        missing = _error(c.post("/v1/completions", json=body), 401)
        assert missing["code"] == "invalid_api_key"
        _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong-token-0123456789"}), 401)
        assert c.get("/health").status_code == 200  # open without a token, as gRPC health
        with pytest.raises(openai.AuthenticationError):
            guarded.openai(api_key="x" * 32).models.list()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with c.stream("POST", "/v1/completions", json=body, headers=auth) as held:  # fills admission
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            full = _error(c.post("/v1/completions", json={**body, "stream": False}, headers=auth), 429)
            assert (full["type"], full["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        wait_engines(guarded, "idle")
        guarded.lt.run(_kill(guarded, 0))
        down = _error(c.post("/v1/completions", json={**body, "max_tokens": 2}, headers=auth), 503)
        assert down["message"] == "no worker is available; retry later"
        assert _error(c.get("/health"), 503)["message"] == "no worker is available"
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.05)
    counts = {
        (s.labels["route"], s.labels["status"]): s.value
        for m in guarded.router.metrics.registry.collect()
        if m.name == "kvrelay_http_requests"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert counts[("/v1/completions", "401")] == 1 and counts[("/v1/completions", "429")] == 1
    assert counts[("/v1/completions", "503")] == 1


async def _kill(s: HttpServed, rank: int) -> None:
    s.router._pool.kill(rank)  # type: ignore[attr-defined]


# ---- disconnects --------------------------------------------------------------------------
def _raw_post(s: HttpServed, body: dict[str, Any]) -> socket.socket:
    port = int(s.base_url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_frees_the_kv_blocks(main: HttpServed, stream: bool) -> None:
    """3000 tokens take far longer than the 2 s the engines get to be idle again."""
    body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    sock = _raw_post(main, body)
    try:
        wait_engines(main, "busy")
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    wait_engines(main, "idle", timeout_s=2.0)
    assert main.router._streams == {}


# ---- drain --------------------------------------------------------------------------------
def test_drain_refuses_new_requests_and_lets_open_streams_finish(lt: LoopThread) -> None:
    s = start_http(lt, FakePool(1, num_kv_blocks=128))
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with s.httpx() as c, c.stream("POST", "/v1/completions", json=body) as open_stream:
            lines = open_stream.iter_lines()
            assert next(lines).startswith("data: ")
            drained = asyncio.run_coroutine_threadsafe(s.router.drain(30.0), lt.loop)
            deadline = time.monotonic() + 5
            while not s.router.draining:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert _error(c.get("/health"), 503)["message"] == "the server is shutting down"
            refused = _error(c.post("/v1/completions", json={**body, "stream": False}), 503)
            assert refused["message"] == "the server is shutting down"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        drained.result(10)
    finally:
        stop_http(s)
