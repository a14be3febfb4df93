"""How a stream's deltas become responses (cluster/stream.py `gather`, through RouterCore.responses): deltas that queued up while the
reader was busy go out as one response, and `stream_interval` gathers N tokens per response after
the first. Deterministic: the deltas are queued by hand before the reader runs; no pool runs."""

from __future__ import annotations

import asyncio

import pytest
from fake_pool import FakePool

from kvrelay.cluster.admission import Ticket
from kvrelay.cluster.config import load_config
from kvrelay.cluster.router_core import RouterCore, RouterError, Status, Stream
from kvrelay.cluster.text import ResponseBuilder
from kvrelay.worker.protocol import FinishReason, TokenDelta
from kvrelay.worker.sampling_params import SamplingParams


def delta(i: int, *, last: bool = False) -> TokenDelta:
    """The worker's delta carrying token 100 + i, the (i + 1)-th of its request."""
    return TokenDelta("w1", [100 + i], [], FinishReason.LENGTH if last else None, False, 3, i + 1, 0)


def make_stream(max_tokens: int) -> Stream:
    """A routed stream as RouterCore.open leaves it (prompt [1, 2, 3], no detokenizer)."""
    return Stream(
        request_id="r1",
        worker_request_id="w1",
        prompt_ids=[1, 2, 3],
        params=SamplingParams(max_tokens=max_tokens),
        ticket=Ticket(3 + max_tokens),
        arrival=0.0,
        deadline=None,
        out=ResponseBuilder("r1", None),
    )


def responses_of(interval: int, events: list[TokenDelta | RouterError]) -> tuple[list[list[int]], str]:
    """Token ids per response, and how the stream ended ("ok" or the error's status), when every
    event is queued before the reader first runs."""

    async def run() -> tuple[list[list[int]], str]:
        core = RouterCore(FakePool(1), load_config(None, {"stream_interval": interval}))
        s = make_stream(len(events))
        for e in events:
            s.events.put_nowait(e)
        got: list[list[int]] = []
        try:
            async for resp in core.responses(s):
                got.append(list(resp.token_ids))
        except RouterError as e:
            return got, e.status.name
        return got, "ok"

    return asyncio.run(run())


def test_deltas_queued_behind_a_busy_reader_go_out_as_one_response() -> None:
    # Six deltas had queued up by the time the reader ran: one response carries them all.
    got, end = responses_of(1, [delta(i, last=i == 5) for i in range(6)])
    assert got == [[100, 101, 102, 103, 104, 105]] and end == "ok"


@pytest.mark.parametrize("interval", [2, 4])
def test_stream_interval_gathers_tokens_after_the_first(interval: int) -> None:
    """One delta at a time (the reader keeps up): responses of `interval` tokens after the first,
    the last one as soon as the request ends."""

    async def run() -> list[list[int]]:
        core = RouterCore(FakePool(1), load_config(None, {"stream_interval": interval}))
        s = make_stream(10)
        got: list[list[int]] = []

        async def feed() -> None:
            for i in range(10):
                s.events.put_nowait(delta(i, last=i == 9))
                await asyncio.sleep(0.001)  # the reader runs between deltas

        feeder = asyncio.ensure_future(feed())
        async for resp in core.responses(s):
            got.append(list(resp.token_ids))
        await feeder
        return got

    got = asyncio.run(run())
    assert [t for r in got for t in r] == [100 + i for i in range(10)]
    sizes = [len(r) for r in got]
    assert sizes[0] == 1 and all(n == interval for n in sizes[1:-1]) and 1 <= sizes[-1] <= interval


def test_an_error_after_gathered_tokens_sends_them_first() -> None:
    for interval in (1, 8):
        events: list[TokenDelta | RouterError] = [
            delta(0),
            delta(1),
            delta(2),
            RouterError(Status.UNAVAILABLE, "worker 0 became unavailable"),
        ]
        got, end = responses_of(interval, events)
        assert got == [[100, 101, 102]] and end == "UNAVAILABLE"


def test_tokens_gathered_for_the_interval_go_out_before_a_later_error() -> None:
    async def run() -> tuple[list[list[int]], str]:
        core = RouterCore(FakePool(1), load_config(None, {"stream_interval": 8}))
        s = make_stream(10)
        got: list[list[int]] = []

        async def feed() -> None:
            for i in range(3):
                s.events.put_nowait(delta(i))
                await asyncio.sleep(0.001)
            s.events.put_nowait(RouterError(Status.UNAVAILABLE, "worker 0 became unavailable"))

        feeder = asyncio.ensure_future(feed())
        try:
            async for resp in core.responses(s):
                got.append(list(resp.token_ids))
        except RouterError as e:
            await feeder
            return got, e.status.name
        raise AssertionError("the stream ended without its error")

    assert asyncio.run(run()) == ([[100], [101, 102]], "UNAVAILABLE")
