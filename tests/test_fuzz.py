"""Fuzzing the served router with hypothesis: random GenerateRequests and random bytes.

One router over the in-process fake pool (one tiny-model worker, 64 KiB message limit, token auth)
serves the module. Every call must end OK (or still be streaming after 32 responses, when the test
cancels it), INVALID_ARGUMENT or RESOURCE_EXHAUSTED: never INTERNAL or UNKNOWN, whose messages could
carry a traceback. Between examples the test waits for the router to hold no stream, so a reused
request_id never meets a cancelled one. Afterwards a normal request still succeeds and the engine
holds no request and no KV block. `derandomize`: the same examples on every run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fake_pool import FakePool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray_helpers import LoopThread

from kvrelay.cluster.auth import TOKENS_ENV, load_security
from kvrelay.cluster.client import KvrelayClient
from kvrelay.cluster.config import load_config
from kvrelay.cluster.grpc_server import build_server
from kvrelay.cluster.router import GenerationRouter
from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.engine import Engine

TOKEN = "fuzz-0123456789abcdef"
METADATA = (("authorization", f"Bearer {TOKEN}"),)
MAX_MESSAGE_BYTES = 64 * 1024
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
METHODS = ("Generate", "GetModelInfo", "GetServerStats")
MAX_RESPONSES = 32  # read this many of a stream, then cancel it (a valid request may ask for 4096 tokens)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

UINT32 = st.one_of(
    st.integers(0, 40), st.integers(0, 2**32 - 1), st.sampled_from([319, 320, 2**31, 2**32 - 1])
)
ANY_FLOAT = st.one_of(
    st.floats(0, 1, width=32),
    st.floats(width=32),  # nan, inf, -0.0, subnormals, huge
    st.sampled_from([float("nan"), float("inf"), -1.0, 1e-45, 3.4e38]),
)
ANY_TEXT = st.one_of(
    st.text(max_size=64),
    st.text(st.characters(min_codepoint=0x80), max_size=400),  # non-ASCII, emoji, combining marks
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(1, 30_000)),  # long
)
# Values the server accepts (tiny model: vocab 320), so that a request gets past validation to the
# tokenizer, the worker and the detokenizer's stop-string matching.
TOKEN_ID = st.integers(0, 319)
VALID_TEXT = st.text(min_size=1, max_size=200).filter(str.strip)
VALID_STOP = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


def sampling(valid: bool) -> st.SearchStrategy[pb.SamplingParams]:
    if not valid:
        return st.builds(
            pb.SamplingParams,
            max_tokens=UINT32, temperature=ANY_FLOAT, top_p=ANY_FLOAT, top_k=UINT32, min_p=ANY_FLOAT,
            seed=st.none() | st.integers(0, 2**64 - 1), stop=st.lists(st.text(max_size=300), max_size=18),
            stop_token_ids=st.lists(UINT32, max_size=70), ignore_eos=st.booleans(), logprobs=UINT32,
        )  # fmt: skip
    return st.builds(
        pb.SamplingParams,
        max_tokens=st.integers(0, 8), temperature=st.floats(0, 2), top_p=st.floats(0, 1),
        top_k=st.integers(0, 320), min_p=st.floats(0, 1), seed=st.none() | st.integers(0, 2**64 - 1),
        stop=st.lists(VALID_STOP, max_size=3), stop_token_ids=st.lists(TOKEN_ID, max_size=4),
        ignore_eos=st.booleans(), logprobs=st.integers(0, 5),
    )  # fmt: skip


@st.composite
def generate_requests(draw: Any) -> pb.GenerateRequest:
    """Half of them valid in every field (then the prompt's content is what varies), half anything."""
    valid = draw(st.booleans())
    request_id = draw(st.text(max_size=32) if valid else st.text(max_size=300))
    request = pb.GenerateRequest(request_id=request_id, sampling=draw(sampling(valid)))
    prompt = draw(st.sampled_from(["text", "ids"] if valid else ["text", "ids", "none"]))
    if prompt == "text":
        request.text = draw(VALID_TEXT if valid else ANY_TEXT)
    elif prompt == "ids":
        ids = st.lists(TOKEN_ID, min_size=1, max_size=200) if valid else st.lists(UINT32, max_size=3000)
        request.token_ids.ids.extend(draw(ids))
    return request


@dataclass
class Served:
    lt: LoopThread
    pool: FakePool
    router: GenerationRouter
    grpc_server: Any
    address: str
    channel: grpc.Channel

    def call(self, method: str, payload: bytes) -> grpc.StatusCode:
        """The call's status; a stream still going after MAX_RESPONSES counts as OK and is cancelled."""
        rpc = f"/kvrelay.v1.Generation/{method}"
        try:
            if method == "Generate":
                call = self.channel.unary_stream(rpc)(payload, timeout=30, metadata=METADATA)
                try:
                    for n, _ in enumerate(call):
                        if n == MAX_RESPONSES:
                            break
                finally:
                    call.cancel()
            else:
                self.channel.unary_unary(rpc)(payload, timeout=30, metadata=METADATA)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            if code == grpc.StatusCode.CANCELLED:  # our own cancel, after a first response
                return grpc.StatusCode.OK
            assert code in ALLOWED, (code, e.details())
            return code
        finally:
            self.wait_no_streams()
        return grpc.StatusCode.OK

    def wait_no_streams(self) -> None:
        async def count() -> int:
            return len(self.router._streams)

        deadline = time.monotonic() + 10
        while self.lt.run(count()):
            assert time.monotonic() < deadline, "a stream stayed open"
            time.sleep(0.002)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    config = load_config(None, {"port": 0, "max_message_bytes": MAX_MESSAGE_BYTES})
    lt, pool = LoopThread(), FakePool(1, num_kv_blocks=64)

    async def start() -> tuple[GenerationRouter, Any, int]:
        router = GenerationRouter(pool, config)
        await router.start()
        server, port = build_server(router, config, load_security(config, environ={TOKENS_ENV: TOKEN}))
        await server.start()
        return router, server, port

    router, server, port = lt.run(start())
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    )
    s = Served(lt, pool, router, server, f"127.0.0.1:{port}", channel)
    yield s
    channel.close()
    lt.run(server.stop(0))
    lt.run(router.stop())
    lt.close()


@FUZZ
@given(request=generate_requests())
def test_random_generate_requests(served: Served, request: pb.GenerateRequest) -> None:
    served.call("Generate", request.SerializeToString())


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    payload=st.one_of(
        st.binary(max_size=256),
        st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 40_000)),
    ),
)
def test_random_bytes(served: Served, method: str, payload: bytes) -> None:
    code = served.call(method, payload)
    if len(payload) > MAX_MESSAGE_BYTES:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_kind_of_reply_is_reached(served: Served) -> None:
    """The fuzzers' space holds all three outcomes (so they are not all one refusal)."""
    ok = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams(max_tokens=2))
    bad = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**32 - 1]))
    assert served.call("Generate", ok.SerializeToString()) == grpc.StatusCode.OK
    assert served.call("Generate", bad.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
    assert served.call("Generate", b"\x0a" * (MAX_MESSAGE_BYTES + 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.call("Generate", b"\xff") == grpc.StatusCode.INVALID_ARGUMENT


def test_server_keeps_serving_after_the_fuzz(served: Served) -> None:
    with KvrelayClient(served.address, token=TOKEN, timeout=30.0) as c:
        result = c.generate([5, 6, 7], max_tokens=4, ignore_eos=True)
        assert (len(result.token_ids), result.finish_reason) == (4, "length")
        assert c.server_stats().num_in_flight == 0

    def state(e: Engine) -> tuple[int, int]:
        e.check_integrity()
        return len(e.requests), e.allocator.num_used_blocks

    deadline = time.monotonic() + 5
    while (now := served.lt.run(served.pool.workers[0].call(state))) != (0, 0):
        assert time.monotonic() < deadline, f"the engine still holds {now}"
        time.sleep(0.02)
    assert served.router._num_queued == 0
