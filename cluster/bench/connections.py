"""Several gRPC connections behind one client, for a load-generator process.

A gRPC channel is one HTTP/2 connection, and `kvrelay serve --router-processes N` spreads
*connections* over its routers (SO_REUSEPORT hashes each new connection to one router process;
docs/ROUTERS.md). A client process with one channel therefore loads one router however many
streams it opens, and a handful of client processes hash unevenly onto N routers (16 processes
onto 8 routers leave some router with 4 and most likely another with none). `GrpcConnections`
opens `k` channels, each its own TCP connection (a local subchannel pool: channels with equal
arguments otherwise share one connection process-wide), and sends each new stream on the next
one in turn, as a production client fronting a multi-process server would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from ..client import OWN_CONNECTION, AsyncKvrelayClient, StreamChunk


class GrpcConnections:
    """`k` AsyncKvrelayClients to one target, one connection each; the calls `bench serve` makes
    (`wait_ready`, `model_info`, `generate`, `stream`) spread round-robin over them."""

    def __init__(self, target: str, k: int) -> None:
        if k < 1:
            raise ValueError(f"--connections must be >= 1, got {k}")
        self.clients = [AsyncKvrelayClient(target, channel_options=OWN_CONNECTION) for _ in range(k)]
        self._next = 0

    def _pick(self) -> AsyncKvrelayClient:
        client = self.clients[self._next]
        self._next = (self._next + 1) % len(self.clients)
        return client

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.gather(*(c.wait_ready(timeout) for c in self.clients))

    async def model_info(self, *, timeout: float | None = None) -> Any:
        return await self.clients[0].model_info(timeout=timeout)

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        return await self._pick().generate(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> AsyncGenerator[StreamChunk, None]:
        return self._pick().stream(*args, **kwargs)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    async def __aenter__(self) -> GrpcConnections:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
