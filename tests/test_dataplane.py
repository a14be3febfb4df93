"""The data plane without Ray: wire round trips, and a DataPlaneServer over a real EngineLoop driven by
DataPlanePools of two routers (each gets exactly its own deltas, token-identical to Engine.generate)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import msgpack
import pytest
import zmq
from dataplane_helpers import FAST, GREEDY, LONG, Router, ServedPlane, model_of
from engine_helpers import make_engine, random_prompts

from kvrelay.cluster.dataplane import WorkerEndpoint
from kvrelay.cluster.pool_timeouts import PoolTimeouts
from kvrelay.worker import wire
from kvrelay.worker.dataplane import DataPlaneServer
from kvrelay.worker.engine import Engine
from kvrelay.worker.engine_loop import EngineLoop
from kvrelay.worker.loop_link import LoopLink
from kvrelay.worker.protocol import (
    EngineStats,
    FinishReason,
    HandoffTarget,
    StepBatch,
    TokenDelta,
    TokenLogprobs,
    WorkerLoad,
    WorkRequest,
)
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.wire import Kind, WireError


# ---- wire ---------------------------------------------------------------------------------------
def test_request_round_trip_keeps_every_field() -> None:
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=2**63, stop_token_ids=(5, 6), logprobs=2
    )
    target = HandoffTarget("peer-1", 3, 9, [4, 5], 1)
    for r in (WorkRequest("a", [1, 2, 3], params, 2.5, target), WorkRequest("b", [9], SamplingParams())):
        kind, fields = wire.unpack(wire.submit(7, [r]))
        assert kind is Kind.SUBMIT and fields[0] == 7
        assert wire.decode_request(fields[1][0]) == r


def test_delta_and_load_round_trip() -> None:
    d = TokenDelta(
        "x",
        [4, 5],
        [TokenLogprobs(4, -0.5, ((4, -0.5), (9, -1.25)))] * 2,
        FinishReason.LENGTH,
        True,
        3,
        2,
        1,
        "e",
    )
    stats = EngineStats(num_running=2, handoff_wait_counts=(1, 0, 3), step_time_counts=(0, 4), loop_cpu_s=1.5)
    load = WorkerLoad(2, 1, 0.25, 30, 77, 40, stats)
    kind, fields = wire.unpack(wire.deltas([d, TokenDelta.empty("y", 4)], load))
    assert kind is Kind.DELTAS
    assert [wire.decode_delta(x) for x in fields[0]] == [d, TokenDelta.empty("y", 4)]
    # DELTAS leave the counters out (they ride on heartbeats): everything else survives.
    assert wire.decode_load(fields[1]) == (WorkerLoad(2, 1, 0.25, 30, 77, 40, EngineStats()), False)
    _, beat = wire.unpack(wire.pack(Kind.LOAD, wire.encode_load(load), "inc"))
    assert wire.decode_load(beat[0]) == (load, True) and beat[1] == "inc"


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"", "version"),
        (b"\x02" + msgpack.packb([1]), "version"),
        (b"\x01\xc1", "msgpack"),
        (b"\x01" + msgpack.packb({"a": 1}), r"\[kind"),
        (b"\x01" + msgpack.packb([99]), "unknown message kind 99"),
    ],
)
def test_malformed_frames_are_refused(frame: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.unpack(frame)


def test_bad_sampling_params_are_a_wire_error_naming_the_field() -> None:
    item = wire.encode_request(WorkRequest("a", [1], SamplingParams()))
    item[2][0] = 0  # max_tokens
    with pytest.raises(WireError, match="max_tokens must be >= 1"):
        wire.decode_request(item)
    with pytest.raises(WireError, match="prompt is a list of ints"):
        wire.decode_request(["a", ["x"], item[2], None, None])


# ---- server + clients ---------------------------------------------------------------------------
@pytest.fixture
def engine() -> Engine:
    return make_engine(detokenize=False)


@pytest.fixture(params=["in-process", "own-process"])
def served(engine: Engine, request: pytest.FixtureRequest) -> Iterator[tuple[EngineLoop, ServedPlane]]:
    """The data plane beside the loop (its I/O thread in the loop's process), or in a process of its
    own behind the loop link, as a worker actor runs it: every scenario holds for both."""
    loop = EngineLoop(engine)
    server: ServedPlane
    if request.param == "in-process":
        server = DataPlaneServer(loop, "127.0.0.1", incarnation="inc-1", heartbeat_s=0.05)
    else:
        server = LoopLink(loop, "127.0.0.1", incarnation="inc-1", heartbeat_s=0.05)
    try:
        yield loop, server
    finally:
        if isinstance(server, DataPlaneServer):
            server.close()
            loop.shutdown()
        else:
            loop.shutdown()
            server.close()


def test_two_routers_get_exactly_their_own_deltas_token_identical(
    engine: Engine, served: tuple[EngineLoop, ServedPlane]
) -> None:
    loop, server = served
    prompts = random_prompts(6, [3, 17, 40], engine.model_config.vocab_size, seed=3)
    reference = [o.token_ids for o in make_engine(detokenize=False).generate(prompts, GREEDY)]
    endpoint = WorkerEndpoint(0, server.address, "inc-1")

    async def scenario() -> None:
        a, b = Router(model_of(engine), endpoint, "router-a"), Router(model_of(engine), endpoint, "router-b")
        await a.start()
        await b.start()
        assert a.pool.workers[0].healthy and b.pool.workers[0].healthy
        ids_a, ids_b = [f"a{i}" for i in range(3)], [f"b{i}" for i in range(3, 6)]
        refused = await asyncio.gather(
            a.pool.workers[0].submit([WorkRequest(i, prompts[k], GREEDY) for k, i in enumerate(ids_a)]),
            b.pool.workers[0].submit([WorkRequest(i, prompts[k + 3], GREEDY) for k, i in enumerate(ids_b)]),
        )
        assert refused == [{}, {}]
        await a.until(lambda: a.finished(ids_a))
        await b.until(lambda: b.finished(ids_b))
        assert sorted(a.deltas) == ids_a and sorted(b.deltas) == ids_b
        got = [a.deltas[i].token_ids for i in ids_a] + [b.deltas[i].token_ids for i in ids_b]
        assert got == reference
        assert {d.finish_reason for d in [*a.deltas.values(), *b.deltas.values()]} == {FinishReason.LENGTH}
        # The other router's id is refused, not stolen; a bad request is refused naming the field.
        await b.until(lambda: b.pool.workers[0].load.num_running == 0)
        assert await a.pool.workers[0].submit([WorkRequest("a7", prompts[0], LONG)]) == {}
        refused_b = await b.pool.workers[0].submit([WorkRequest("a7", prompts[0], GREEDY)])
        assert refused_b == {"a7": "request_id 'a7' is already in use"}
        too_long = WorkRequest("b9", prompts[0], SamplingParams(max_tokens=10**6))
        assert "max_model_len" in (await b.pool.workers[0].submit([too_long]))["b9"]
        # b cannot abort a's request; a can.
        await b.pool.workers[0].abort(["a7"])
        await asyncio.sleep(0.2)
        assert not a.deltas["a7"].finished and "a7" not in b.deltas
        await a.pool.workers[0].abort(["a7"])
        await a.until(lambda: a.finished(["a7"]))
        assert a.deltas["a7"].finish_reason is FinishReason.ABORT
        await a.pool.stop()
        await b.pool.stop()

    asyncio.run(scenario())
    loop.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_abort_frees_kv_and_a_router_that_leaves_takes_its_requests(
    engine: Engine, served: tuple[EngineLoop, ServedPlane]
) -> None:
    loop, server = served
    endpoint = WorkerEndpoint(0, server.address, "inc-1")

    async def scenario() -> None:
        a = Router(model_of(engine), endpoint, "router-a")
        await a.start()
        w = a.pool.workers[0]
        assert await w.submit([WorkRequest(f"r{i}", [5, 6, 7], LONG) for i in range(3)]) == {}
        await a.until(lambda: all(f"r{i}" in a.deltas for i in range(3)))
        await w.abort(["r0"])
        await a.until(lambda: a.finished(["r0"]))
        await a.until(lambda: w.load.num_running == 2)
        await a.pool.stop()  # BYE: the worker aborts what a still had running

    asyncio.run(scenario())
    end = time.monotonic() + 10
    while loop.load.num_running:
        assert time.monotonic() < end
        time.sleep(0.01)
    loop.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_worker_error_and_silence_take_the_client_down(
    engine: Engine, served: tuple[EngineLoop, ServedPlane]
) -> None:
    loop, server = served
    endpoint = WorkerEndpoint(0, server.address, "inc-1")

    async def scenario() -> None:
        a = Router(model_of(engine), endpoint, "router-a")
        await a.start()
        # Silence: an endpoint nobody serves never heartbeats after the switch.
        loop2 = EngineLoop(make_engine(detokenize=False))
        server2 = DataPlaneServer(loop2, "127.0.0.1", incarnation="inc-2", heartbeat_s=0.05)
        a.pool.set_endpoint(WorkerEndpoint(0, server2.address, "inc-2"), 0)  # restarted elsewhere
        await a.until(lambda: a.events == [("down", 0), ("up", 0)], 5)
        server2.close()
        started = time.monotonic()
        await a.until(lambda: len(a.events) == 3, 5)
        assert a.events[-1] == ("down", 0)
        assert time.monotonic() - started < FAST.stall_s + 1.0
        assert not a.pool.workers[0].healthy
        # Back at the first endpoint: up again; then the engine loop breaks: ERROR -> down at once.
        a.pool.set_endpoint(endpoint, 0)
        await a.until(lambda: a.events[-1] == ("up", 0), 5)
        assert await a.pool.workers[0].submit([WorkRequest("z", [4, 4], LONG)]) == {}
        loop.shutdown()  # the loop refuses further calls: the server reports it broken
        started = time.monotonic()
        await a.until(lambda: a.events[-1] == ("down", 0), 5)
        assert time.monotonic() - started < 1.0
        with pytest.raises(ConnectionError):
            await a.pool.workers[0].submit([WorkRequest("q", [4], GREEDY)])
        await a.pool.stop()
        loop2.shutdown()

    asyncio.run(scenario())


def test_malformed_messages_are_dropped_and_the_server_keeps_serving(
    served: tuple[EngineLoop, ServedPlane],
) -> None:
    _, server = served
    if not isinstance(server, DataPlaneServer):
        pytest.skip("reads the server's own counter; the data plane's process runs the same server")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"prober")
    sock.connect(server.address)
    try:
        for frame in (b"junk", b"\x01" + msgpack.packb([2, "x"]), wire.pack(Kind.SUBMIT, 1, [])):
            sock.send(frame)  # the last one comes before HELLO: refused too
        sock.send(wire.pack(Kind.HELLO, "prober"))
        sock.send(wire.submit(5, [WorkRequest("p", [1, 2], GREEDY)]))
        kinds = []
        end = time.monotonic() + 10
        while Kind.SUBMITTED not in kinds:
            assert time.monotonic() < end
            if sock.poll(100):
                kinds.append(wire.unpack(sock.recv())[0])
        assert kinds[0] is Kind.LOAD and server.num_malformed == 3
    finally:
        sock.close(0)


# ---- step time and CPU figures -----------------------------------------------------------------
def test_step_time_summary_reads_mean_exactly_and_percentiles_off_the_buckets() -> None:
    from kvrelay.worker.step_timer import STEP_TIME_BUCKETS_S, StepTimer, diff, summarize

    timer = StepTimer()
    for seconds in [0.002] * 98 + [0.05, 0.05]:
        timer.record(seconds)
    s = summarize(timer.counts, timer.sum_s)
    assert s.steps == 100 and s.mean_ms == pytest.approx(2.96)
    # 2 ms lies in the bucket (1.86, 2.33] ms, 50 ms in (46.6, 58.2] ms: each percentile is the
    # geometric middle of its bucket.
    i, j = [next(k for k, b in enumerate(STEP_TIME_BUCKETS_S) if b >= x) for x in (0.002, 0.05)]
    assert s.p50_ms == pytest.approx(1e3 * (STEP_TIME_BUCKETS_S[i - 1] * STEP_TIME_BUCKETS_S[i]) ** 0.5)
    assert s.p99_ms == pytest.approx(1e3 * (STEP_TIME_BUCKETS_S[j - 1] * STEP_TIME_BUCKETS_S[j]) ** 0.5)
    earlier = list(timer.counts)
    timer.record(0.002)
    assert summarize(diff(timer.counts, earlier), 0.002).steps == 1
    assert summarize([0] * len(timer.counts), 0.0).steps == 0


def test_heartbeats_carry_step_times_and_cpu(engine: Engine, served: tuple[EngineLoop, ServedPlane]) -> None:
    _, server = served
    endpoint = WorkerEndpoint(0, server.address, "inc-1")

    async def scenario() -> None:
        a = Router(model_of(engine), endpoint, "router-a")
        await a.start()
        w = a.pool.workers[0]
        assert await w.submit([WorkRequest("s", [3, 4, 5], GREEDY)]) == {}
        await a.until(lambda: a.finished(["s"]))
        await a.until(lambda: sum(w.load.stats.step_time_counts) == GREEDY.max_tokens, 5)
        stats = w.load.stats
        assert stats.num_steps == GREEDY.max_tokens and stats.step_time_sum_s > 0
        assert stats.loop_cpu_s > 0 and stats.io_cpu_s > 0 and stats.process_cpu_s >= stats.loop_cpu_s
        await a.pool.stop()

    asyncio.run(scenario())


def test_claimed_requests_stream_to_their_router_and_unowned_ones_to_all(
    engine: Engine, served: tuple[EngineLoop, ServedPlane]
) -> None:
    """A decode worker's handoffs arrive by a Ray call (reserve), not SUBMIT: `claim` names their
    router. Output of a request nobody claimed goes to every router (each ignores ids not its own)."""
    loop, server = served
    endpoint = WorkerEndpoint(0, server.address, "inc-1")

    async def scenario() -> None:
        a, b = Router(model_of(engine), endpoint, "router-a"), Router(model_of(engine), endpoint, "router-b")
        await a.start()
        await b.start()
        server.claim(["c"], "router-b")
        assert loop.submit([WorkRequest("c", [7, 8], GREEDY), WorkRequest("u", [9], GREEDY)]) == {}
        await b.until(lambda: b.finished(["c", "u"]))
        await a.until(lambda: a.finished(["u"]))
        assert "c" not in a.deltas
        assert a.deltas["u"].token_ids == b.deltas["u"].token_ids
        assert len(b.deltas["c"].token_ids) == GREEDY.max_tokens
        await a.pool.stop()
        await b.pool.stop()

    asyncio.run(scenario())
    loop.check_integrity()


def test_a_claim_for_a_router_that_is_gone_is_aborted_and_a_live_ones_streams(
    engine: Engine, served: tuple[EngineLoop, ServedPlane]
) -> None:
    """A controller's reserve can land after the router it names died and was forgotten: the
    request would run to its end unobserved. The heartbeat aborts it; a live router's claim and
    unclaimed work run on."""
    loop, server = served
    endpoint = WorkerEndpoint(0, server.address, "inc-1")

    async def scenario() -> None:
        a = Router(model_of(engine), endpoint, "router-a")
        await a.start()
        server.claim(["orphan"], "router-gone")
        server.claim(["mine"], "router-a")
        assert loop.submit([WorkRequest("orphan", [5, 6], LONG), WorkRequest("mine", [7, 8], GREEDY)]) == {}
        await a.until(lambda: a.finished(["mine"]))
        assert len(a.deltas["mine"].token_ids) == GREEDY.max_tokens and "orphan" not in a.deltas
        await a.until(lambda: loop.load.num_running == 0, timeout_s=5.0)  # 3000 tokens take far longer
        await a.pool.stop()

    asyncio.run(scenario())
    loop.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_a_stalled_engine_is_down_although_its_heartbeats_continue(
    engine: Engine, served: tuple[EngineLoop, ServedPlane]
) -> None:
    """The I/O thread keeps heartbeating (its CPU clocks tick) while the engine stops stepping: only
    progress counts, so a submit left waiting takes the worker down after no_progress_s."""
    loop, server = served
    timeouts = PoolTimeouts(poll_s=0.05, stall_s=5.0, probe_interval_s=0.1, no_progress_s=1.0)

    async def scenario() -> None:
        a = Router(model_of(engine), WorkerEndpoint(0, server.address, "inc-1"), "router-a", timeouts)
        await a.start()
        loop.stall(3.0)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await a.pool.workers[0].submit([WorkRequest("w", [1, 2], GREEDY)])
        assert a.events == [("down", 0)]
        assert 0.9 < time.monotonic() - started < 2.5
        await a.pool.stop()

    asyncio.run(scenario())


class PulseLoop:
    """A `ServedLoop` that publishes one delta per `pulse` from the caller's thread, hook and all,
    as the engine loop does after a step."""

    IDLE = WorkerLoad(0, 0, 0.0, 0, 0)

    def __init__(self) -> None:
        self._hook: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._out: list[TokenDelta] = []

    @property
    def load(self) -> WorkerLoad:
        return self.IDLE

    def set_output_hook(self, hook: Callable[[], None] | None) -> None:
        self._hook = hook

    def submit_future(self, requests: Sequence[WorkRequest]) -> Future[dict[str, str]]:
        fut: Future[dict[str, str]] = Future()
        fut.set_result({})
        return fut

    def abort(self, request_ids: Sequence[str]) -> None:
        pass

    def take(self) -> StepBatch:
        with self._lock:
            out, self._out = self._out, []
        return StepBatch(deltas=out, load=self.IDLE)

    def thread_cpu_s(self) -> float:
        return 0.0

    def pulse(self, request_id: str) -> None:
        with self._lock:
            self._out.append(TokenDelta(request_id, [1], [], None, False, 1, 1, 0))
        assert self._hook is not None
        self._hook()


class RacingWakeSocket:
    """The server's wake socket, but the first `recv` once armed lets another thread's hook fire
    right then (waiting at most 50 ms for it): the interleaving that used to lose a wake-up."""

    def __init__(self, real: Any, server: DataPlaneServer) -> None:
        self._real, self._server = real, server
        self.armed = False
        self.raced = threading.Event()

    def __hash__(self) -> int:  # the poller's events are keyed by the real socket
        return hash(self._real)

    def __eq__(self, other: object) -> bool:
        return other is self._real or other is self

    def recv(self, flags: int = 0) -> bytes:
        if self.armed:
            self.armed = False
            hook = threading.Thread(target=self._server._wake)
            hook.start()
            hook.join(0.05)  # the fixed server makes the hook wait for the drain's lock
            self.raced.set()
        data: bytes = self._real.recv(flags)
        return data

    def close(self, linger: int | None = None) -> None:
        self._real.close(linger)


def test_a_hook_firing_while_the_io_thread_drains_wake_ups_is_not_lost() -> None:
    """A hook fires between the I/O thread clearing its pending-wake flag and draining its wake
    socket. Deltas published afterwards still go out at once: the old code left the flag set with
    nothing pending, skipped every later hook, and they waited for the 5 s heartbeat here (with
    the default 0.1 s heartbeat, the suspected cause of the ~100 ms TTFT measured on an H200)."""
    loop = PulseLoop()
    server = DataPlaneServer(
        loop, "127.0.0.1", incarnation="inc-race", heartbeat_s=5.0, router_timeout_s=10.0
    )
    racing = RacingWakeSocket(server._wake_rx, server)
    server._wake_rx = racing  # type: ignore[assignment]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"router-race")
    sock.connect(server.address)
    sock.send(wire.pack(Kind.HELLO, "router-race"))

    def arrives(request_id: str, within_s: float) -> bool:
        end = time.monotonic() + within_s
        while (left := end - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return False
            kind, fields = wire.unpack(sock.recv())
            if kind is Kind.DELTAS and any(wire.decode_delta(x).request_id == request_id for x in fields[0]):
                return True
        return False

    try:
        assert sock.poll(5000), "no first heartbeat"
        sock.recv()
        racing.armed = True
        loop.pulse("armed")
        assert racing.raced.wait(5.0), "the I/O thread never drained its wake socket"
        assert arrives("armed", 1.0)
        for i in range(5):  # each within 1 s, where a skipped hook waits for the 5 s heartbeat
            loop.pulse(f"after-{i}")
            assert arrives(f"after-{i}", 1.0), f"delta after-{i} waited for a heartbeat"
    finally:
        sock.close(0)
        ctx.term()
        server.close()
