"""cluster/handoff_relay.py without Ray: a router's submit relayed over a real pipe to the
controller's `serve_handoff` over a stand-in pool, the local ones submitted by the router itself,
aborts reaching both sides, and every failure (worker down, a bug, the controller gone) ending the
submit with ConnectionError (UNAVAILABLE) rather than hanging it."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from typing import Any

import pytest

from kvrelay.cluster.handoff_relay import HandoffRelay, RelayedDecodeClient, serve_handoff
from kvrelay.worker.protocol import WorkRequest
from kvrelay.worker.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=4)


class Decode:
    """The router's data-plane client of one decode worker: records what it was sent."""

    rank = 1
    healthy = True
    load: Any = None

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.aborted: list[str] = []

    async def submit(self, requests: Sequence[WorkRequest]) -> dict[str, str]:
        self.submitted += [r.request_id for r in requests]
        return {"bad-local": "max_tokens: too many"} if "bad-local" in self.submitted else {}

    async def abort(self, request_ids: Sequence[str]) -> None:
        self.aborted += request_ids


class Pool:
    """The controller's DisaggregatedPool: handoff refuses "bad", sends "busy*" back to run locally."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[int, list[str], str]] = []
        self.prefill_aborts: list[str] = []
        self.fail = fail

    async def handoff(
        self, rank: int, requests: list[WorkRequest], router_id: str
    ) -> tuple[dict[str, str], list[WorkRequest]]:
        self.calls.append((rank, [r.request_id for r in requests], router_id))
        if self.fail is not None:
            raise self.fail
        refused = {r.request_id: "prompt: too long" for r in requests if r.request_id == "bad"}
        return refused, [
            r for r in requests if r.request_id.startswith("busy") or r.request_id == "bad-local"
        ]

    async def abort_prefill(self, request_ids: list[str]) -> None:
        self.prefill_aborts += request_ids


def run(pool: Pool, scenario: Any) -> None:
    """scenario(relay, decode client) on a loop where the controller's end serves the same pipe."""
    ours, theirs = multiprocessing.Pipe()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay = HandoffRelay(ours, "router0-x")
        tasks: set[asyncio.Future[None]] = set()

        def controller() -> None:  # RouterProcesses._on_message, reduced
            while theirs.poll():
                t = asyncio.ensure_future(serve_handoff(pool, theirs.recv(), theirs.send))
                tasks.add(t)

        def router() -> None:  # router_process._read_pipe, reduced
            while ours.poll():
                relay.on_reply(ours.recv())

        loop.add_reader(theirs.fileno(), controller)
        loop.add_reader(ours.fileno(), router)
        try:
            decode = Decode()
            await scenario(relay, decode, RelayedDecodeClient(decode, relay))  # type: ignore[arg-type]
            await asyncio.gather(*tasks)
        finally:
            loop.remove_reader(theirs.fileno())
            loop.remove_reader(ours.fileno())

    asyncio.run(main())


def reqs(*ids: str) -> list[WorkRequest]:
    return [WorkRequest(i, [1, 2, 3], PARAMS) for i in ids]


def test_handoff_refused_and_local_requests() -> None:
    pool = Pool()

    async def scenario(relay: HandoffRelay, decode: Decode, client: RelayedDecodeClient) -> None:
        refused = await client.submit(reqs("a", "bad", "busy1", "b", "bad-local"))
        assert refused == {"bad": "prompt: too long", "bad-local": "max_tokens: too many"}
        assert decode.submitted == ["busy1", "bad-local"]  # only these ran as plain requests
        await client.abort(["a", "busy1"])
        assert decode.aborted == ["a", "busy1"]
        await asyncio.sleep(0.05)  # the abort_prefill message is one-way

    run(pool, scenario)
    assert pool.calls == [(1, ["a", "bad", "busy1", "b", "bad-local"], "router0-x")]
    assert pool.prefill_aborts == ["a", "busy1"]


@pytest.mark.parametrize(
    ("fail", "message"),
    [(ConnectionError("worker 1 is unavailable"), "worker 1 is unavailable"),
     (KeyError("bug"), "handoff failed: KeyError")],
)  # fmt: skip
def test_a_failed_handoff_is_unavailable_and_submits_nothing(fail: BaseException, message: str) -> None:
    async def scenario(relay: HandoffRelay, decode: Decode, client: RelayedDecodeClient) -> None:
        with pytest.raises(ConnectionError, match=message):
            await client.submit(reqs("busy1"))
        assert decode.submitted == []

    run(Pool(fail), scenario)


def test_the_controller_gone_fails_waiting_and_later_handoffs() -> None:
    ours, theirs = multiprocessing.Pipe()

    async def main() -> None:
        relay = HandoffRelay(ours, "router0-x")
        waiting = asyncio.ensure_future(relay.handoff(0, reqs("a")))
        await asyncio.sleep(0.01)
        assert theirs.recv()[:3] == ("handoff", 0, 0)  # sent, never answered
        relay.close("the controller is gone")
        with pytest.raises(ConnectionError, match="the controller is gone"):
            await waiting
        with pytest.raises(ConnectionError, match="the controller is gone"):
            await relay.handoff(0, reqs("b"))
        assert not theirs.poll()  # nothing more was sent

    asyncio.run(main())
