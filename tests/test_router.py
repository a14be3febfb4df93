"""The gRPC router end to end on loopback, over an in-process pool of real engines (tests/fake_pool.py).

Two servers serve the module: `main` (2 workers, 256 KV blocks each) and `small` (1 worker, 96
blocks, a 4-request / 2000-token admission bound, a 0.1 s submit batching window). Every test
waits for its own streams to end, so the engines are idle between tests.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from engine_helpers import make_engine, random_prompts
from fake_pool import FakePool
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from ray_helpers import LoopThread

from kvrelay.cluster.client import (
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    KvrelayClient,
    KvrelayError,
    ResourceExhausted,
    Unavailable,
)
from kvrelay.cluster.config import load_config
from kvrelay.cluster.grpc_server import build_server
from kvrelay.cluster.router import GenerationRouter
from kvrelay.cluster.text import ResponseBuilder
from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc
from kvrelay.worker.engine import Engine
from kvrelay.worker.model.tiny import tiny_model_dir
from kvrelay.worker.protocol import TokenDelta
from kvrelay.worker.request import FinishReason
from kvrelay.worker.sampler import TokenLogprobs
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.text.detokenizer import IncrementalDetokenizer
from kvrelay.worker.text.tokenizer import Tokenizer

T = TypeVar("T")
VOCAB = 320


@dataclass
class Server:
    lt: LoopThread
    pool: FakePool
    router: GenerationRouter
    grpc_server: Any
    address: str

    def call(self, fn: Callable[[], T]) -> T:
        """fn() on the event loop's thread (router and pool state belong to it)."""

        async def run() -> T:
            return fn()

        return self.lt.run(run())

    def client(self) -> KvrelayClient:
        return KvrelayClient(self.address, timeout=60.0)

    def engine_state(self, rank: int) -> tuple[int, int]:
        """(live requests, used KV blocks) of a worker's engine, after its integrity check."""

        def read(e: Engine) -> tuple[int, int]:
            e.check_integrity()
            return len(e.requests), e.allocator.num_used_blocks

        result: tuple[int, int] = self.lt.run(self.pool.workers[rank].call(read))
        return result

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Until every engine holds no request and no KV block (integrity checked on the way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [self.engine_state(w.rank) for w in self.pool.workers]
            if all(s == (0, 0) for s in states):
                return
            assert time.monotonic() < deadline, f"engines still busy: {states}"
            time.sleep(0.02)

    def num_submitted(self) -> int:
        return sum(len(ids) for w in self.pool.workers for ids in w.submitted)


def start_server(lt: LoopThread, pool: FakePool, **overrides: Any) -> Server:
    config = load_config(None, {"port": 0, **overrides})

    async def start() -> Server:
        router = GenerationRouter(pool, config)
        await router.start()
        server, port = build_server(router, config)
        await server.start()
        return Server(lt, pool, router, server, f"127.0.0.1:{port}")

    return lt.run(start())


def stop_server(s: Server) -> None:
    s.lt.run(s.grpc_server.stop(0))
    s.lt.run(s.router.stop())


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="module")
def main(lt: LoopThread) -> Iterator[Server]:
    s = start_server(lt, FakePool(2, num_kv_blocks=256, revive_after_s=0.5), max_message_bytes=1 << 20)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def small(lt: LoopThread) -> Iterator[Server]:
    pool = FakePool(1, num_kv_blocks=96)
    s = start_server(lt, pool, max_queued_requests=4, max_queued_tokens=2000, batch_window_s=0.1)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def ref() -> Engine:
    """The in-process engine the served tokens must equal (text and stop strings done in-engine)."""
    return make_engine(num_kv_blocks=1024)


def greedy(max_tokens: int, **fields: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **fields)


def expect_error(kind: type[KvrelayError], fn: Callable[[], Any]) -> str:
    with pytest.raises(kind) as e:
        fn()
    return e.value.details


# ---- streaming ---------------------------------------------------------------------------
def test_stream_token_prompt(main: Server, ref: Engine) -> None:
    prompt = [5, 6, 7, 8, 9, 10, 11]
    expected = ref.generate([prompt], greedy(16))[0]
    with main.client() as c:
        chunks = list(c.stream(prompt, max_tokens=16, ignore_eos=True, request_id="tok-1"))
    # A message per engine step, or fewer when the reader fell behind (queued deltas go together).
    assert len(chunks[0].token_ids) == 1 and all(ch.token_ids for ch in chunks) and len(chunks) <= 16
    assert [t for ch in chunks for t in ch.token_ids] == expected.token_ids
    assert {ch.request_id for ch in chunks} == {"tok-1"}
    assert [ch.finish_reason for ch in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert [ch.usage for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 16)
    main.wait_idle()


def test_stream_text_prompt(main: Server, ref: Engine) -> None:
    expected = ref.generate(["Hello world"], greedy(24))[0]
    with main.client() as c:
        chunks = list(c.stream("Hello world", max_tokens=24, ignore_eos=True))
    assert "".join(ch.text for ch in chunks) == expected.text
    assert [t for ch in chunks for t in ch.token_ids] == expected.token_ids
    assert len(chunks[0].request_id) == 32  # a server-assigned uuid
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == expected.prompt_tokens


def test_long_text_prompt_is_tokenized_off_the_loop(main: Server, ref: Engine) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 40  # 1800 characters: the thread pool path
    expected = ref.generate([text], greedy(4))[0]
    with main.client() as c:
        result = c.generate(text, max_tokens=4, ignore_eos=True)
    assert (result.token_ids, result.text) == (tuple(expected.token_ids), expected.text)
    assert result.usage.prompt_tokens == expected.prompt_tokens


def test_stop_string_cuts_text_and_aborts_on_the_worker(main: Server, ref: Engine) -> None:
    prompt = [40, 50, 60, 70, 80]
    full = ref.generate([prompt], greedy(40))[0].text
    stop = full[12:14]
    expected = ref.generate([prompt], greedy(40, stop=(stop,)))[0]  # the engine matches stops itself
    assert expected.finish_reason.value == "stop" and stop not in expected.text
    aborted_before = [len(w.aborted) for w in main.pool.workers]
    with main.client() as c:
        result = c.generate(prompt, max_tokens=40, ignore_eos=True, stop=[stop])
    assert (result.text, result.token_ids, result.finish_reason) == (
        expected.text, tuple(expected.token_ids), "stop",
    )  # fmt: skip
    assert result.usage.completion_tokens == len(expected.token_ids)
    main.wait_idle()
    assert [len(w.aborted) for w in main.pool.workers] != aborted_before  # the router told the worker


def test_skip_text_streams_the_same_tokens_without_text(main: Server, ref: Engine) -> None:
    """Text is sent by default, for token-id prompts too; skip_text opts out (token ids only)."""
    prompt = [40, 50, 60, 70, 80]
    expected = ref.generate([prompt], greedy(12))[0]
    assert expected.text  # the tiny model's bytes decode to text: an empty text below means skipped
    with grpc.insecure_channel(main.address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def run(req: pb.GenerateRequest) -> tuple[list[int], list[str]]:
            resps = list(stub.Generate(req, timeout=30))
            assert resps[-1].finish_reason == pb.FINISH_REASON_LENGTH
            return [t for r in resps for t in r.token_ids], [r.text for r in resps]

        tokens, texts = run(_request(prompt, max_tokens=12, ignore_eos=True))
        assert (tokens, "".join(texts)) == (expected.token_ids, expected.text)
        tokens, texts = run(_request(prompt, max_tokens=12, ignore_eos=True, skip_text=True))
        assert (tokens, texts) == (expected.token_ids, [""] * 12)
        by_text = ref.generate(["Hello world"], greedy(6))[0]
        tokens, texts = run(_request("Hello world", max_tokens=6, ignore_eos=True, skip_text=True))
        assert (tokens, texts) == (by_text.token_ids, [""] * 6)  # a text prompt may skip text too
    main.wait_idle()


def test_logprobs(main: Server) -> None:
    with main.client() as c:
        result = c.generate([1, 2, 3, 4], max_tokens=5, ignore_eos=True, logprobs=3)
    assert len(result.logprobs) == 5
    for token, lp in zip(result.token_ids, result.logprobs, strict=True):
        assert lp.token_id == token
        assert len(lp.top) == 3 and lp.top[0].token_id == token  # greedy: the most likely one
        assert lp.top[0].logprob == lp.logprob


def test_64_concurrent_streams_match_the_engine(main: Server, ref: Engine) -> None:
    prompts = random_prompts(64, range(5, 60), VOCAB, seed=3)
    expected = [o.token_ids for o in ref.generate(prompts, greedy(16))]
    submits_before = [len(w.submitted) for w in main.pool.workers]
    barrier = threading.Barrier(64)

    def one(p: list[int]) -> list[int]:
        with main.client() as c:
            barrier.wait()
            return list(c.generate(p, max_tokens=16, ignore_eos=True).token_ids)

    with ThreadPoolExecutor(64) as ex:
        got = list(ex.map(one, prompts))
    assert got == expected
    per_worker = [len(w.submitted) - n for w, n in zip(main.pool.workers, submits_before, strict=True)]
    assert all(n > 0 for n in per_worker), per_worker  # both workers served
    main.wait_idle()


def _delta(tokens: list[int], finish: FinishReason | None = None, completion: int = 0) -> TokenDelta:
    logprobs = [TokenLogprobs(t, -0.5, ((t, -0.5), (1, -2.0))) for t in tokens]
    return TokenDelta("w1", tokens, logprobs, finish, False, 3, completion, 1)


def test_response_builder_cuts_at_a_stop_string() -> None:
    """The byte-level tiny tokenizer: token id = byte, so b"a" is 97."""
    tok = Tokenizer.from_dir(tiny_model_dir())
    out = ResponseBuilder("r", IncrementalDetokenizer(tok, [1, 2, 3], stop=["cd"]))
    resp, stopped = out.build(_delta([ord("a"), ord("b"), ord("c")]))
    assert resp is not None and not stopped
    assert (list(resp.token_ids), resp.text, len(resp.logprobs)) == ([97, 98, 99], "ab", 3)  # "c" held back
    resp, stopped = out.build(_delta([ord("d"), ord("e")]))
    assert resp is not None and stopped and out.finished
    # "d" completed the stop: it is streamed as a token, "e" is not; the text stops before "cd".
    assert (list(resp.token_ids), resp.text, [lp.token_id for lp in resp.logprobs]) == ([100], "", [100])
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.cached_prompt_tokens) == (
        3,
        4,
        1,
    )
    assert [(t.token_id, t.logprob) for t in resp.logprobs[0].top] == [(100, -0.5), (1, -2.0)]


def test_response_builder_flushes_held_text_at_the_end() -> None:
    tok = Tokenizer.from_dir(tiny_model_dir())
    out = ResponseBuilder("r", IncrementalDetokenizer(tok, [1], stop=["xyz"]))
    resp, _ = out.build(_delta([ord("a"), ord("x")]))
    assert resp is not None and resp.text == "a"
    assert out.build(_delta([], completion=2)) == (None, False)  # nothing new: nothing sent
    resp, stopped = out.build(_delta([ord("y")], FinishReason.LENGTH, completion=3))
    assert resp is not None and not stopped
    assert (resp.text, resp.finish_reason, resp.usage.completion_tokens) == ("xy", pb.FINISH_REASON_LENGTH, 3)
    no_text = ResponseBuilder("r", None)
    resp, _ = no_text.build(_delta([5], FinishReason.ABORT))
    assert resp is not None and (list(resp.token_ids), resp.text, resp.finish_reason) == (
        [5],
        "",
        pb.FINISH_REASON_ABORT,
    )


# ---- refusals ----------------------------------------------------------------------------
def _request(prompt: Any = (1, 2, 3), request_id: str = "", **sampling: Any) -> pb.GenerateRequest:
    s = pb.SamplingParams(**sampling)
    if prompt is None:
        return pb.GenerateRequest(request_id=request_id, sampling=s)
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=request_id, text=prompt, sampling=s)
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=list(prompt)), sampling=s)


INVALID = [
    (_request(None), "prompt: give text or token_ids"),
    (_request(""), "text: the prompt must not be empty"),
    # max_model_len 4096 x 16: refused on its length, before any tokenizer work.
    (_request("x" * 65537), "text: 65537 characters exceed 65536 (max_model_len 4096 x 16)"),
    (_request(()), "token_ids: the prompt must hold at least 1 token"),
    (_request((1, 320, 2)), "token_ids: token id 320 is outside the vocabulary [0, 320)"),
    (_request((1, 2), max_tokens=4095), "max_tokens: prompt (2 tokens) + max_tokens (4095) = 4097 exceeds max_model_len 4096"),
    (_request(temperature=-1.0), "temperature: must be finite and >= 0"),
    (_request(temperature=float("nan")), "temperature: must be finite and >= 0"),
    (_request(top_p=1.5), "top_p: must be in (0, 1]"),
    (_request(min_p=2.0), "min_p: must be in [0, 1]"),
    (_request(top_k=321), "top_k: must be <= the vocabulary size 320"),
    (_request(stop=["x"] * 17), "stop: at most 16 stop strings, got 17"),
    (_request(stop=["x" * 257]), "stop: each stop string must be 1..256 characters, got 257"),
    (_request(stop_token_ids=[320]), "stop_token_ids: token id 320 is outside the vocabulary"),
    (_request(logprobs=21), "logprobs: at most 20, got 21"),
    (_request(repetition_penalty=0.0), "repetition_penalty: must be finite and > 0 (1 = off), got 0.0"),
    (_request(presence_penalty=2.5), "presence_penalty: must be in [-2, 2] (0 = off), got 2.5"),
    (_request(frequency_penalty=-3.0), "frequency_penalty: must be in [-2, 2] (0 = off), got -3.0"),
    (_request(request_id="r" * 257), "request_id: at most 256 characters, got 257"),
    (_request(stop=["x"], skip_text=True), "skip_text: stop strings are matched on the text, which skip_text turns off"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "message"), INVALID, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(INVALID)]
)
def test_invalid_argument_names_field_and_limit(
    main: Server, request_: pb.GenerateRequest, message: str
) -> None:
    submitted = main.num_submitted()
    with grpc.insecure_channel(main.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request_, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(message), e.value.details()
    assert main.num_submitted() == submitted  # nothing reached a worker


def test_past_one_workers_kv_capacity(small: Server) -> None:
    with small.client() as c:
        details = expect_error(InvalidArgument, lambda: c.generate([1] * 10, max_tokens=1600))
    assert details == (
        "max_tokens: prompt (10 tokens) + max_tokens (1600) = 1610 exceeds one worker's KV cache capacity "
        "of 1536 tokens"
    )


def test_oversized_message_is_refused_by_grpc(main: Server) -> None:
    with main.client() as c:
        details = expect_error(ResourceExhausted, lambda: c.generate("x" * (2 << 20), max_tokens=1))
    assert "larger than max" in details


def test_duplicate_in_flight_request_id(main: Server) -> None:
    with main.client() as c:
        stream = c.stream([1, 2, 3], max_tokens=500, ignore_eos=True, request_id="dup")
        next(stream)
        details = expect_error(KvrelayError, lambda: c.generate([4, 5], request_id="dup"))
        assert details == "request_id 'dup' is already in flight"
        stream.close()
        main.wait_idle()
        assert c.generate([4, 5], max_tokens=2, request_id="dup").request_id == "dup"  # free again


def test_unexpected_errors_are_internal_and_generic(
    main: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    codec = main.router._codec

    async def broken(text: str) -> list[int]:
        raise RuntimeError("tokenizer exploded at /secret/path 0x7f00")

    monkeypatch.setattr(codec, "encode", broken)
    with main.client() as c:
        details = expect_error(InternalError, lambda: c.generate("hello"))
    match = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\)", details)
    assert match is not None, details
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "/secret/path" in str(logged[0].exc_info[1])  # the detail is in the log only


# ---- admission, batching, deadlines, cancellation ---------------------------------------
def test_overload_is_refused_at_once_and_admitted_requests_finish(small: Server) -> None:
    submitted = small.num_submitted()
    with small.client() as c:
        streams = [
            c.stream([1, 2, 3, 4, 5, 6, 7, 8, 9, i], max_tokens=300, ignore_eos=True) for i in range(3)
        ]
        firsts = [next(s) for s in streams]  # 3 admitted: 930 of 2000 tokens
        t0 = time.monotonic()
        details = expect_error(ResourceExhausted, lambda: c.generate([1] * 10, max_tokens=1100))
        assert "(max_queued_tokens)" in details and "needs 1110" in details
        fourth = c.stream([2] * 10, max_tokens=100, ignore_eos=True)
        firsts.append(next(fourth))  # 1040 tokens, 4 requests: the request bound is reached
        details = expect_error(ResourceExhausted, lambda: c.generate([3] * 10, max_tokens=2))
        assert "4 requests in flight (max_queued_requests)" in details
        assert time.monotonic() - t0 < 2.0
        assert small.num_submitted() == submitted + 4  # the refused ones never reached the worker
        counts = [
            len(f.token_ids) + sum(len(ch.token_ids) for ch in s)
            for f, s in zip(firsts, [*streams, fourth], strict=True)
        ]
    assert counts == [300, 300, 300, 100]
    stats = small.call(lambda: (small.router._admission.num_requests, small.router._admission.num_tokens))
    assert stats == (0, 0)
    small.wait_idle()


def test_requests_bound_for_one_worker_are_batched(small: Server) -> None:
    calls_before = small.pool.workers[0].num_submit_calls
    barrier = threading.Barrier(4)

    def one(i: int) -> int:
        with small.client() as c:
            barrier.wait()
            return len(c.generate([i + 1] * 5, max_tokens=4, ignore_eos=True).token_ids)

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(one, range(4))) == [4, 4, 4, 4]
    assert small.pool.workers[0].num_submit_calls - calls_before == 1  # all four within the 0.1 s window
    assert sorted(len(ids) for ids in small.pool.workers[0].submitted[-1:]) == [4]


def test_request_expiring_while_queued_never_reaches_a_worker(small: Server) -> None:
    submitted = small.num_submitted()
    with small.client() as c:
        expect_error(DeadlineExceeded, lambda: c.generate([1, 2, 3], max_tokens=4, timeout=0.03))
    time.sleep(0.2)  # past the batching window
    assert small.num_submitted() == submitted
    assert small.call(lambda: small.router._admission.num_requests) == 0


def test_deadline_exceeded_frees_blocks(main: Server) -> None:
    with main.client() as c:
        t0 = time.monotonic()
        expect_error(
            DeadlineExceeded, lambda: c.generate([7] * 50, max_tokens=3000, ignore_eos=True, timeout=0.4)
        )
        assert time.monotonic() - t0 < 2.0
    main.wait_idle(timeout_s=2.0)


def test_cancel_frees_blocks_within_a_step(main: Server) -> None:
    with main.client() as c:
        stream = c.stream([9] * 40, max_tokens=3000, ignore_eos=True, request_id="to-cancel")
        for _ in range(3):
            next(stream)
        rank = main.call(lambda: main.router.worker_of("to-cancel"))
        assert rank is not None and main.engine_state(rank)[0] == 1
        stream.close()  # cancels the call
    main.wait_idle(timeout_s=1.0)
    assert main.pool.workers[rank].aborted[-1:] != []
    assert main.call(lambda: main.router.worker_of("to-cancel")) is None


# ---- worker death ------------------------------------------------------------------------
def test_worker_killed_mid_stream(main: Server) -> None:
    prompts = random_prompts(6, range(10, 30), VOCAB, seed=11)
    results: dict[str, Any] = {}

    def run(i: int) -> None:
        with main.client() as c:
            try:
                results[f"k{i}"] = c.generate(prompts[i], max_tokens=400, ignore_eos=True, request_id=f"k{i}")
            except KvrelayError as e:
                results[f"k{i}"] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while main.call(lambda: sum(main.router.worker_of(f"k{i}") is not None for i in range(6))) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks = main.call(lambda: {f"k{i}": main.router.worker_of(f"k{i}") for i in range(6)})
    assert set(ranks.values()) == {0, 1}
    time.sleep(0.1)
    main.call(lambda: main.pool.kill(0))
    killed_at = time.monotonic()
    for t in threads:
        t.join(30)
    for rid, rank in ranks.items():
        r = results[rid]
        if rank == 0:
            assert isinstance(r, Unavailable) and "worker 0 became unavailable" in r.details, r
        else:
            assert not isinstance(r, Exception) and len(r.token_ids) == 400, r
    assert main.call(lambda: main.router._admission.num_requests) == 0
    # Back after revive_after_s; new requests then reach both workers again.
    while not main.pool.workers[0].healthy:
        assert time.monotonic() - killed_at < 5
        time.sleep(0.05)
    before = len(main.pool.workers[0].submitted)
    with main.client() as c:
        for p in random_prompts(4, range(5, 20), VOCAB, seed=12):
            assert len(c.generate(p, max_tokens=3).token_ids) == 3
    assert len(main.pool.workers[0].submitted) > before
    main.wait_idle()


def test_no_healthy_worker_is_unavailable(main: Server) -> None:
    def kill_both() -> None:
        main.pool.kill(0)
        main.pool.kill(1)

    main.call(kill_both)
    with main.client() as c:
        details = expect_error(Unavailable, lambda: c.generate([1, 2, 3]))
        assert details == "no worker is available; retry later"
        with grpc.insecure_channel(main.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            deadline = time.monotonic() + 5
            while (
                check(health_pb2.HealthCheckRequest(service="")).status
                != health_pb2.HealthCheckResponse.SERVING
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert all(w.healthy for w in main.pool.workers)
        assert len(c.generate([1, 2, 3], max_tokens=2).token_ids) == 2


# ---- health, reflection, stats, metrics --------------------------------------------------
def test_health_and_reflection(main: Server) -> None:
    with grpc.insecure_channel(main.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "kvrelay.v1.Generation"):
            assert (
                check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        with pytest.raises(grpc.RpcError) as e:
            check(health_pb2.HealthCheckRequest(service="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"kvrelay.v1.Generation", "grpc.health.v1.Health"} <= set(db.get_services())
        service = DescriptorPool(db).FindServiceByName("kvrelay.v1.Generation")
        assert [m.name for m in service.methods] == ["Generate", "GetModelInfo", "GetServerStats"]


def test_model_info_and_server_stats(main: Server) -> None:
    with main.client() as c:
        info = c.model_info()
        stats = c.server_stats()
    assert (info.model, info.vocab_size, info.max_model_len, list(info.eos_token_ids)) == (
        "tiny",
        320,
        4096,
        [257],
    )
    assert (info.max_logprobs, info.max_stop_strings, info.max_stop_string_length, info.accepts_text) == (
        20,
        16,
        256,
        True,
    )
    assert (stats.num_workers, stats.num_healthy_workers, stats.num_in_flight, stats.num_queued) == (
        2,
        2,
        0,
        0,
    )
    assert stats.num_requests_total > 0
    assert [w.rank for w in stats.workers] == [0, 1]
    assert all(w.healthy and w.kv_usage == 0.0 and w.prefix_cache_queries > 0 for w in stats.workers)


def test_metrics_endpoint(main: Server) -> None:
    port, stop = main.router.metrics.serve_http("127.0.0.1", 0)
    try:
        with main.client() as c:
            c.generate([1, 2, 3], max_tokens=3, ignore_eos=True)
            expect_error(InvalidArgument, lambda: c.generate([1, 2, 3], top_p=2.0))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        stop()
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "queue_time"):
        assert f"kvrelay_{histogram}_seconds_bucket" in text, histogram
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["kvrelay_time_to_first_token_seconds_count"]) >= 1
    assert float(samples['kvrelay_requests_total{code="OK"}']) >= 1
    assert float(samples['kvrelay_requests_total{code="INVALID_ARGUMENT"}']) >= 1
    for rank in ("0", "1"):
        for name in ("worker_running_requests", "worker_waiting_requests", "worker_kv_usage_ratio",
                     "worker_prefix_cache_hit_rate", "worker_preemptions_total", "worker_graph_replays_total",
                     "worker_eager_steps_total"):  # fmt: skip
            assert f'kvrelay_{name}{{worker="{rank}"}}' in samples, (name, rank)
    assert float(samples['kvrelay_worker_eager_steps_total{worker="0"}']) > 0


# ---- drain (last: the small server stops serving) ----------------------------------------
def test_drain(small: Server) -> None:
    with small.client() as c:
        short = c.stream([1] * 8, max_tokens=60, ignore_eos=True)
        long = c.stream([2] * 8, max_tokens=1500, ignore_eos=True)
        first_short, first_long = next(short), next(long)
        drained = asyncio.run_coroutine_threadsafe(small.router.drain(1.5), small.lt.loop)
        with grpc.insecure_channel(small.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            deadline = time.monotonic() + 1
            while (
                check(health_pb2.HealthCheckRequest(service="kvrelay.v1.Generation")).status
                != health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert expect_error(Unavailable, lambda: c.generate([3, 4])) == "the server is shutting down"
        assert len(first_short.token_ids) + sum(len(ch.token_ids) for ch in short) == 60  # finished in grace
        long_tokens = len(first_long.token_ids)
        with pytest.raises(Unavailable) as e:
            for ch in long:
                long_tokens += len(ch.token_ids)
        assert e.value.details == "the server shut down before the request finished"
        assert long_tokens < 1500
        drained.result(10)
    small.wait_idle(timeout_s=2.0)
