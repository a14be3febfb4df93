"""Overload reads RESOURCE_EXHAUSTED, never CANCELLED (issue 14): 2,000 simultaneous streams from one
client process on one channel against the real gRPC server (`build_server`, a `GenerationRouter`
over an in-process `FakePool`) in its own process, with admission limits that refuse most of them.

Before `grpc.server.max_pending_requests` was raised (cluster/grpc_server.py), gRPC core shed calls
waiting for a handler past its default backlog of 1,000 at random: ~6% of 2,000 read CANCELLED
with no handler run (`scripts/overload_probe.py` shows it against a bare grpc.aio server)."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from typing import Any

import grpc
import grpc.aio
from engine_helpers import make_engine

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc
from kvrelay.worker.sampling_params import SamplingParams

STREAMS = 2000
ADMITTED = 64  # max_queued_requests: the rest are refused
PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 8


def _serve(port_out: Any, stop: Any) -> None:
    """The server process: build_server over a FakePool, until `stop` is set."""
    from fake_pool import FakePool

    from kvrelay.cluster.config import ServerConfig
    from kvrelay.cluster.grpc_server import build_server
    from kvrelay.cluster.router import GenerationRouter

    async def main() -> None:
        config = ServerConfig(port=0, max_queued_requests=ADMITTED)
        router = GenerationRouter(FakePool(1, num_kv_blocks=128), config)
        await router.start()
        server, port = build_server(router, config)
        await server.start()
        port_out.put(port)
        await asyncio.to_thread(stop.wait)
        await server.stop(0)
        await router.stop()

    asyncio.run(main())


async def _flood(address: str) -> tuple[Counter[str], list[list[int]]]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        request = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=PROMPT),
            sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, skip_text=True),
        )
        ok: list[list[int]] = []

        async def one() -> str:
            tokens: list[int] = []
            try:
                async for r in stub.Generate(request, timeout=120):
                    tokens += r.token_ids
            except grpc.aio.AioRpcError as e:
                return e.code().name
            ok.append(tokens)
            return "OK"

        codes = Counter(await asyncio.gather(*(one() for _ in range(STREAMS))))
        return codes, ok


def test_2000_streams_overload_reads_resource_exhausted() -> None:
    expected = make_engine(num_kv_blocks=64).generate(
        [PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    ctx = multiprocessing.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(port_q, stop), daemon=True)
    proc.start()
    try:
        port = port_q.get(timeout=60)
        codes, ok = asyncio.run(_flood(f"127.0.0.1:{port}"))
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert sum(codes.values()) == STREAMS
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # never CANCELLED, never UNAVAILABLE
    assert codes["RESOURCE_EXHAUSTED"] >= STREAMS - 2 * ADMITTED * 4, codes  # most were refused
    assert codes["OK"] >= ADMITTED, codes
    assert all(t == expected[0].token_ids for t in ok)
