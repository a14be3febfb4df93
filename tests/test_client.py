"""cluster/client.py against a fake `kvrelay.v1.Generation` server (grpc.aio, loopback, its own
thread and event loop) with canned behaviour chosen by the prompt text: fixed token streams,
any status code on demand, metadata and deadline echoes, a stream that hangs until cancelled."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from kvrelay.cluster.client import (
    AsyncKvrelayClient,
    Cancelled,
    DeadlineExceeded,
    GenerationResult,
    InternalError,
    InvalidArgument,
    KvrelayClient,
    KvrelayError,
    ResourceExhausted,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Unauthenticated,
    Unavailable,
    Usage,
)
from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc

# Written out here rather than imported: the table under test is the client's own.
EXPECTED_ERROR = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}
FAILING_CODES = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]


class FakeGeneration(pb_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = threading.Event()  # a "hang" stream was cancelled or ran out of time

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        rid = request.request_id or "srv-1"
        prompt = request.text if request.WhichOneof("prompt") == "text" else None
        usage = pb.Usage(prompt_tokens=3, completion_tokens=1, cached_prompt_tokens=0)
        if prompt is not None and prompt.startswith("fail:"):
            name = prompt.removeprefix("fail:")
            await context.abort(grpc.StatusCode[name], f"fake {name} details")
        elif prompt == "fail-midstream":
            yield pb.GenerateResponse(request_id=rid, token_ids=[1], text="a")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker 1 died")
        elif prompt in ("auth", "deadline", "no-finish", "big"):
            md = dict(context.invocation_metadata())
            remaining = context.time_remaining()
            text = {
                "auth": md.get("authorization", "<none>"),
                "deadline": "none" if remaining is None else f"{remaining:.3f}",
                "no-finish": "x",
                "big": "y" * 4096,
            }[prompt]
            finish = pb.FINISH_REASON_UNSPECIFIED if prompt == "no-finish" else pb.FINISH_REASON_STOP
            yield pb.GenerateResponse(request_id=rid, text=text, finish_reason=finish, usage=usage)
        elif request.WhichOneof("prompt") == "chat":  # one chunk naming the roles it got
            roles = ",".join(m.role for m in request.chat.messages)
            yield pb.GenerateResponse(
                request_id=rid, text=roles, finish_reason=pb.FINISH_REASON_STOP, usage=usage
            )
        elif prompt == "hang":
            yield pb.GenerateResponse(request_id=rid, token_ids=[1], text="a")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        else:  # token ids: echo each id + 100, two per message, with logprobs if asked
            out = [t + 100 for t in request.token_ids.ids]
            for i in range(0, len(out), 2):
                toks = out[i : i + 2]
                last = i + 2 >= len(out)
                yield pb.GenerateResponse(
                    request_id=rid,
                    token_ids=toks,
                    text="".join(f"t{t} " for t in toks),
                    logprobs=[_logprobs(t, request.sampling.logprobs) for t in toks],
                    finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED,
                    usage=pb.Usage(prompt_tokens=len(out), completion_tokens=len(out), cached_prompt_tokens=1)
                    if last
                    else None,
                )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return pb.ModelInfo(
            model="fake", vocab_size=320, max_model_len=256, eos_token_ids=[2], max_logprobs=5
        )

    async def GetServerStats(self, request: pb.GetServerStatsRequest, context: Any) -> pb.ServerStats:
        if dict(context.invocation_metadata()).get("authorization") != "Bearer good":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        return pb.ServerStats(num_workers=2, num_healthy_workers=1, workers=[pb.WorkerStats(rank=1)])


def _logprobs(token: int, n: int) -> pb.TokenLogprobs:
    top = [pb.TopLogprob(token_id=token + k, logprob=-0.5 * (k + 1)) for k in range(n)]
    return pb.TokenLogprobs(token_id=token, logprob=-0.5, top=top)


class ServerThread:
    """A grpc.aio server on 127.0.0.1 running in its own thread's event loop."""

    def __init__(self, servicer: FakeGeneration, credentials: Any = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port: int = self._run(self._start(servicer, credentials))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self, servicer: FakeGeneration, credentials: Any) -> int:
        self.server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(servicer, self.server)
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return int(port)

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake() -> FakeGeneration:
    return FakeGeneration()


@pytest.fixture(scope="module")
def target(fake: FakeGeneration) -> Iterator[str]:
    server = ServerThread(fake)
    yield f"127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def client(target: str, fake: FakeGeneration) -> Iterator[KvrelayClient]:
    fake.cancelled.clear()
    with KvrelayClient(target) as c:
        yield c


EXPECTED_CHUNKS = [
    StreamChunk(
        "req-7",
        (105, 106),
        "t105 t106 ",
        (TokenLogprob(105, -0.5, (TopLogprob(105, -0.5), TopLogprob(106, -1.0))),
         TokenLogprob(106, -0.5, (TopLogprob(106, -0.5), TopLogprob(107, -1.0)))),
        None,
        None,
    ),
    StreamChunk(
        "req-7",
        (107,),
        "t107 ",
        (TokenLogprob(107, -0.5, (TopLogprob(107, -0.5), TopLogprob(108, -1.0))),),
        "length",
        Usage(prompt_tokens=3, completion_tokens=3, cached_prompt_tokens=1),
    ),
]  # fmt: skip
EXPECTED_RESULT = GenerationResult(
    "req-7",
    (105, 106, 107),
    "t105 t106 t107 ",
    EXPECTED_CHUNKS[0].logprobs + EXPECTED_CHUNKS[1].logprobs,
    "length",
    Usage(3, 3, 1),
)


def test_stream_chunks_and_request_fields(client: KvrelayClient, fake: FakeGeneration) -> None:
    chunks = list(
        client.stream(
            [5, 6, 7], max_tokens=9, temperature=0.5, top_p=0.75, top_k=4, min_p=0.125, seed=0,
            stop=["\n\n", "END"], stop_token_ids=[2, 3], ignore_eos=True, logprobs=2, repetition_penalty=1.25,
            presence_penalty=-0.5, frequency_penalty=1.5, request_id="req-7",
        )
    )  # fmt: skip
    assert chunks == EXPECTED_CHUNKS
    sent = fake.requests[-1]
    assert (sent.request_id, list(sent.token_ids.ids), sent.WhichOneof("prompt")) == (
        "req-7",
        [5, 6, 7],
        "token_ids",
    )
    s = sent.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p) == (9, 0.5, 0.75, 4, 0.125)
    assert (s.HasField("seed"), s.seed, list(s.stop), list(s.stop_token_ids)) == (
        True,
        0,
        ["\n\n", "END"],
        [2, 3],
    )
    assert (s.ignore_eos, s.logprobs) == (True, 2)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.25, -0.5, 1.5)


def test_generate_collects_and_defaults(client: KvrelayClient, fake: FakeGeneration) -> None:
    assert client.generate([5, 6, 7], logprobs=2, request_id="req-7") == EXPECTED_RESULT
    s = fake.requests[-1].sampling
    # The CLI's defaults; seed=None leaves the optional field unset (server picks).
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.HasField("seed")) == (
        16,
        0,
        1,
        0,
        0,
        False,
    )
    # Penalties off: repetition_penalty 1 (what the server assumes when unset), the others 0.
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.0, 0.0, 0.0)
    result = client.generate("auth")
    assert (result.text, result.request_id, result.finish_reason) == ("<none>", "srv-1", "stop")
    assert fake.requests[-1].text == "auth"


def test_generate_sends_chat_messages(client: KvrelayClient, fake: FakeGeneration) -> None:
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語?"}]
    assert client.generate(conv, max_tokens=3).text == "system,user"
    req = fake.requests[-1]
    assert req.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "Be brief."), ("user", "日本語?")]
    with pytest.raises(
        ValueError, match=r"^chat: messages\[1\] must be a \{'role': str, 'content': str\} mapping"
    ):
        client.generate([{"role": "user", "content": "x"}, {"role": "user"}])


@pytest.mark.parametrize("code", FAILING_CODES, ids=[c.name for c in FAILING_CODES])
def test_status_code_maps_to_typed_error(client: KvrelayClient, code: grpc.StatusCode) -> None:
    with pytest.raises(KvrelayError) as info:
        client.generate(f"fail:{code.name}")
    err = info.value
    assert type(err) is EXPECTED_ERROR.get(code, KvrelayError)
    assert (err.code, err.details, str(err)) == (
        code,
        f"fake {code.name} details",
        f"{code.name}: fake {code.name} details",
    )
    assert err.__cause__ is None and err.__suppress_context__  # no grpc traceback chained on


def test_error_mid_stream_keeps_earlier_chunks(client: KvrelayClient) -> None:
    got = []
    with pytest.raises(Unavailable, match="worker 1 died"):
        for chunk in client.stream("fail-midstream"):
            got.append(chunk.token_ids)
    assert got == [(1,)]
    with pytest.raises(InternalError, match="ended without a finish_reason"):
        client.generate("no-finish")


def _within(remaining: str, timeout: float) -> bool:
    # gRPC sends the timeout with coarse units rounded up: the server may see a few ms more.
    return timeout - 1.0 < float(remaining) <= timeout + 0.05


def test_deadline(client: KvrelayClient, target: str, fake: FakeGeneration) -> None:
    assert _within(client.generate("deadline", timeout=5.0).text, 5.0)
    assert client.generate("deadline").text == "none"
    with KvrelayClient(target, timeout=7.0) as default_deadline:
        assert _within(default_deadline.generate("deadline").text, 7.0)
        assert _within(default_deadline.generate("deadline", timeout=2.0).text, 2.0)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.generate("hang", timeout=0.3)
    assert time.monotonic() - start < 3.0
    assert fake.cancelled.wait(5), "the server never saw the deadline"


def test_closing_stream_cancels_call(client: KvrelayClient, fake: FakeGeneration) -> None:
    stream = client.stream("hang")
    assert next(stream).token_ids == (1,)
    stream.close()
    assert fake.cancelled.wait(5), "the server's handler was not cancelled"


def test_token_metadata_and_unary_calls(target: str) -> None:
    with KvrelayClient(target, token="good") as c:
        assert c.generate("auth").text == "Bearer good"
        stats = c.server_stats()
        assert (stats.num_workers, stats.num_healthy_workers, [w.rank for w in stats.workers]) == (2, 1, [1])
        info = c.model_info(timeout=5.0)
        assert (info.model, info.vocab_size, list(info.eos_token_ids), info.max_logprobs) == (
            "fake",
            320,
            [2],
            5,
        )
    with (
        KvrelayClient(target, token="bad") as c,
        pytest.raises(Unauthenticated, match="missing or wrong token"),
    ):
        c.server_stats()


def test_message_size_limits_are_explicit(target: str) -> None:
    with KvrelayClient(target, max_message_bytes=1024) as small:
        with pytest.raises(ResourceExhausted):
            small.generate("z" * 4096)  # send limit, refused before it leaves
        with pytest.raises(ResourceExhausted):
            small.generate("big")  # receive limit: the server's 4 KiB message
    with KvrelayClient(target) as default:  # 16 MiB both ways
        assert len(default.generate("big").text) == 4096


def test_bad_arguments_fail_locally(client: KvrelayClient) -> None:
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in \[0, 4294967296\), got -1"):
        client.generate([1], max_tokens=-1)
    with pytest.raises(ValueError, match="prompt token id must be an integer"):
        client.generate([1, 2**32])
    with pytest.raises(ValueError, match="stop must be a sequence of strings"):
        client.generate([1], stop="END")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        KvrelayClient("127.0.0.1:1", timeout=0)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_server(target: str) -> None:
    with KvrelayClient(target) as c:
        c.wait_ready(5.0)
    with KvrelayClient(f"127.0.0.1:{_unused_port()}") as c:
        with pytest.raises(Unavailable, match="no server reachable"):
            c.wait_ready(0.2)
        with pytest.raises(Unavailable):
            c.generate([1], timeout=5.0)


def test_async_client(target: str, fake: FakeGeneration) -> None:
    fake.cancelled.clear()

    async def main() -> None:
        async with AsyncKvrelayClient(target, token="good") as c:
            await c.wait_ready(5.0)
            chunks = [ch async for ch in c.stream([5, 6, 7], logprobs=2, request_id="req-7")]
            assert chunks == EXPECTED_CHUNKS
            results = await asyncio.gather(
                *(c.generate([5, 6, 7], logprobs=2, request_id="req-7") for _ in range(4))
            )
            assert results == [EXPECTED_RESULT] * 4
            assert (await c.generate("auth")).text == "Bearer good"
            assert _within((await c.generate("deadline", timeout=3.0)).text, 3.0)
            assert (await c.model_info()).model == "fake"
            assert (await c.server_stats()).num_workers == 2
            for code in FAILING_CODES:
                with pytest.raises(KvrelayError) as info:
                    await c.generate(f"fail:{code.name}")
                assert type(info.value) is EXPECTED_ERROR.get(code, KvrelayError)
                assert (info.value.code, info.value.details) == (code, f"fake {code.name} details")
            with pytest.raises(DeadlineExceeded):
                await c.generate("hang", timeout=0.3)
            assert fake.cancelled.wait(5)
            fake.cancelled.clear()
            stream = c.stream("hang")
            assert (await stream.__anext__()).token_ids == (1,)
            await stream.aclose()
            assert await asyncio.to_thread(fake.cancelled.wait, 5), "aclose did not cancel the call"
            fake.cancelled.clear()
            async for _ in c.stream("hang"):
                break  # the generator's finalizer cancels the call
            assert await asyncio.to_thread(fake.cancelled.wait, 5), "break did not cancel the call"
        async with AsyncKvrelayClient(target, token="bad") as c:
            with pytest.raises(Unauthenticated):
                await c.server_stats()

    asyncio.run(main())


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=kvrelay-test",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


def test_tls_with_root_cert(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    server = ServerThread(FakeGeneration(), grpc.ssl_server_credentials([(key, cert)]))
    try:
        with KvrelayClient(f"127.0.0.1:{server.port}", tls_root_cert=tmp_path / "cert.pem", token="t") as c:
            assert c.generate("auth", timeout=10).text == "Bearer t"
        with KvrelayClient(f"127.0.0.1:{server.port}", tls_root_cert=cert) as c:
            assert c.model_info(timeout=10).model == "fake"
        with KvrelayClient(f"127.0.0.1:{server.port}") as plaintext, pytest.raises(Unavailable):
            plaintext.model_info(timeout=5)
    finally:
        server.stop()
