"""Count the final status codes of N simultaneous streams from one client process (issue 14).

    python scripts/overload_probe.py --streams 2000                      # a bare grpc.aio server
    python scripts/overload_probe.py --streams 2000 --default-backlog    # ... with gRPC's defaults
    python scripts/overload_probe.py --streams 2000 --address HOST:PORT  # a running kvrelay serve

The bare server (its own process) admits --admit streams at once and refuses the rest with
RESOURCE_EXHAUSTED, as kvrelay's admission does. With gRPC core's default pending-request backlog
(grpc.server.max_pending_requests 1000, hard limit 3000) some calls end CANCELLED before any handler
runs; with the backlog kvrelay sets (cluster/grpc_server.py) every one is OK or RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections import Counter
from typing import Any

import grpc
import grpc.aio

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc


def _bare_server(port_out: Any, admit: int, options: list[tuple[str, int]]) -> None:
    async def main() -> None:
        in_flight = 0

        async def generate(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            nonlocal in_flight
            if in_flight >= admit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server is full")
            in_flight += 1
            try:
                for _ in range(5):
                    await asyncio.sleep(0.2)
                    yield b""
            finally:
                in_flight -= 1

        handler = grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=bytes, response_serializer=bytes
        )
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("kvrelay.v1.Generation", {"Generate": handler}),)
        )
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def flood(address: str, streams: int, max_tokens: int) -> Counter[str]:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, skip_text=True),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one() -> str:
            try:
                async for _ in stub.Generate(request, timeout=120):
                    pass
            except grpc.aio.AioRpcError as e:
                return e.code().name
            return "OK"

        return Counter(await asyncio.gather(*(one() for _ in range(streams))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--address", help="flood this kvrelay serve instead of a bare server")
    p.add_argument("--admit", type=int, default=100, help="bare server: streams admitted at once")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--default-backlog", action="store_true", help="bare server: gRPC's default backlog")
    args = p.parse_args()
    proc = None
    address = args.address
    if address is None:
        options = [("grpc.max_concurrent_streams", 2048)]
        if not args.default_backlog:
            options += [
                ("grpc.server.max_pending_requests", 8192),
                ("grpc.server.max_pending_requests_hard_limit", 16384),
            ]
        ctx = multiprocessing.get_context("spawn")
        port_q = ctx.Queue()
        proc = ctx.Process(target=_bare_server, args=(port_q, args.admit, options), daemon=True)
        proc.start()
        address = f"127.0.0.1:{port_q.get(timeout=30)}"
    start = time.monotonic()
    codes = asyncio.run(flood(address, args.streams, args.max_tokens))
    print(f"{args.streams} streams against {args.address or 'a bare grpc.aio server'}: {dict(codes)} "
          f"in {time.monotonic() - start:.1f} s")  # fmt: skip
    if proc is not None:
        proc.kill()


if __name__ == "__main__":
    main()
