"""The OpenAI HTTP API over a real Ray pool of tiny-model CPU workers (one server per parameter):
the official `openai` client's greedy answers equal the gRPC path's token ids, and a client that
goes away mid-stream or mid-response frees its KV blocks on the worker. Served by the in-process
router, and by 2 router processes sharing the HTTP port (`--router-processes 2`)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_helpers import HttpServed, add_http, chat_model_dir, reference_chat_ids
from ray_helpers import ray_local  # noqa: F401
from router_helpers import spread_clients
from serve_helpers import Served, start_served

from kvrelay.worker.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module", params=[1, 2], ids=["1router", "2routers"])
def served(
    ray_local: None,  # noqa: F811
    model_dir: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Served, HttpServed]]:
    engine = {"model": str(model_dir), "dtype": "float32"}
    if request.param == 1:
        s = start_served(num_workers=1, num_kv_blocks=256, engine=engine)
        assert s.router is not None
        try:
            yield s, add_http(s.lt, s.router)
        finally:
            s.lt.run(s.router.drain(0.0))
            s.stop()
        return
    s = start_served(num_workers=1, num_kv_blocks=256, engine=engine, routers=2, config={"http_port": 0})
    try:
        yield s, HttpServed(s.lt, None, None, f"http://{s.http_address}")
    finally:
        s.stop()


def test_completion_equals_grpc(served: tuple[Served, HttpServed], model_dir: Path) -> None:
    s, h = served
    tok = Tokenizer.from_dir(model_dir)
    with s.client() as c:
        ids = list(c.generate("Hello kvrelay", max_tokens=12, ignore_eos=True).token_ids)
    client = h.openai()
    r = client.completions.create(
        model="tiny-chat",
        prompt="Hello kvrelay",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == tok.decode(ids)
    streamed = client.completions.create(
        model="tiny-chat", prompt="Hello kvrelay", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == tok.decode(ids)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    s.wait_idle()


def test_chat_equals_grpc_on_the_reference_template(
    served: tuple[Served, HttpServed], model_dir: Path
) -> None:
    s, h = served
    tok = Tokenizer.from_dir(model_dir)
    messages = [{"role": "user", "content": "Hello kvrelay"}]
    with s.client() as c:
        ids = list(
            c.generate(reference_chat_ids(model_dir, messages), max_tokens=8, ignore_eos=True).token_ids
        )
    chat = h.openai().chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )  # type: ignore[call-overload]
    assert chat.choices[0].message.content == tok.decode(ids)
    s.wait_idle()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_frees_the_workers_kv_blocks(served: tuple[Served, HttpServed], stream: bool) -> None:
    s, h = served
    body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    data = json.dumps(body).encode()
    port = int(h.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data)
        deadline = time.monotonic() + 30
        while not any(used for used in s.used_blocks()):
            assert time.monotonic() < deadline, "the request never reached the worker"
            time.sleep(0.02)
    finally:
        sock.close()
    s.wait_idle(timeout_s=3.0)  # 3000 tokens would take far longer
    if s.router is not None:
        assert s.router._streams == {}
    else:  # every router process: no stream left open
        clients = spread_clients(lambda: s.client(own_connection=True), s.router_pids(), s.port)
        try:
            assert [c.server_stats().num_in_flight for c, _ in clients] == [0] * len(clients)
        finally:
            for c, _ in clients:
                c.close()
