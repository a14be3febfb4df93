"""`kvrelay serve --router-processes 2` as a subprocess over the real Ray pool (1 CPU worker):
streams through both routers match the engine, one metrics endpoint sums both routers, killing a
router fails only its own streams (UNAVAILABLE) and it comes back, a short soak across both gives
every stream exactly one terminal status with no KV left in use, and SIGTERM drains to exit 0.

Which router holds a connection is read from the kernel (psutil: the router process's established
sockets on the gRPC port), since the reuseport hash picks it."""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from engine_helpers import make_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from router_helpers import OWN_CONNECTION, controller_routers, router_of_port
from test_serve import ServeProcess

from kvrelay.cluster.config import ServerConfig, resolve_router_processes
from kvrelay.cluster.router_procs import split_budget
from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.proto import kvrelay_pb2_grpc as pb_grpc
from kvrelay.worker.sampling_params import SamplingParams

CONFIG = """\
port: 0
workers: 1
device: cpu
drain_grace_s: 10
metrics_port: 0
health_port: 0
http_port: 0
router_processes: 2
engine:
  num_kv_blocks: 256
  dtype: float32
"""
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
CHANNEL_OPTIONS = OWN_CONNECTION


class Server:
    def __init__(self, proc: ServeProcess, address: str, health: str, metrics: str) -> None:
        self.proc, self.address, self.health, self.metrics = proc, address, health, metrics
        self.port = int(address.rsplit(":", 1)[1])

    def routers(self) -> list[psutil.Process]:
        """The router processes: the controller's multiprocessing-spawned children (Ray's are not)."""
        return [psutil.Process(pid) for pid in controller_routers(self.proc.proc.pid)]

    def router_of_port(self) -> dict[int, int]:
        """client port -> pid of the router process holding that connection."""
        return router_of_port([r.pid for r in self.routers()], self.port)

    def health_status(self) -> int:
        with grpc.insecure_channel(self.health) as ch:
            return int(
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            )

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.health_status() != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the controller's health did not turn SERVING"
            time.sleep(0.1)

    def stats(self) -> pb.ServerStats:
        with grpc.insecure_channel(self.address) as ch:
            return pb_grpc.GenerationStub(ch).GetServerStats(pb.GetServerStatsRequest(), timeout=10)

    def wait_worker_idle(self, timeout_s: float) -> None:
        """The worker runs nothing and holds no KV (as of its latest heartbeat)."""
        deadline = time.monotonic() + timeout_s
        while True:
            w = self.stats().workers[0]
            if (w.num_running, w.num_waiting, w.kv_usage) == (0, 0, 0.0):
                return
            assert time.monotonic() < deadline, f"worker still busy: {w}"
            time.sleep(0.2)

    def requests_by_code(self) -> Counter[str]:
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read().decode()
        out: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("kvrelay_requests_total{"):
                code = line.split('code="', 1)[1].split('"', 1)[0]
                out[code] += int(float(line.rsplit(" ", 1)[1]))
        return out


def logged(p: ServeProcess, prefix: str, then: str = "") -> str:
    """What follows prefix in the first log line with both (stderr is read by a thread: wait)."""
    deadline = time.monotonic() + 10
    while True:
        for line in list(p.stderr):
            if prefix in line and then in line.split(prefix, 1)[1]:
                return line.split(prefix, 1)[1]
        assert time.monotonic() < deadline, f"no {prefix!r} in the log"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("routers") / "kvrelay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    p = ServeProcess(["--config", str(config), "--host", "127.0.0.1"])
    try:
        address = p.wait_ready(180)
        p.http = f"http://{p.http_address()}"
        health = logged(p, "gRPC health (plaintext) on ").split()[0]
        metrics = logged(p, "metrics of 2 routers on http://").split("/metrics")[0]
        yield Server(p, address, health, metrics)
    finally:
        p.kill()


def expected_tokens(max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return make_engine(num_kv_blocks=64).generate([PROMPT], params)[0].token_ids


def request(max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, skip_text=True),
    )


def test_auto_rule() -> None:
    assert [resolve_router_processes("auto", c) for c in (1, 2, 4, 5, 8, 16, 32, 64)] == [
        1,
        1,
        1,
        1,
        2,
        4,
        8,
        8,
    ]
    assert resolve_router_processes(3, 2) == 3
    for bad in (0, 65, "many", True):
        with pytest.raises(
            ValueError, match=f"router_processes must be 'auto' or an integer in \\[1, 64\\], got {bad!r}"
        ):
            ServerConfig(router_processes=bad)
    assert split_budget(ServerConfig(max_queued_requests=1000, max_queued_tokens=7), 3) == ServerConfig(
        max_queued_requests=333, max_queued_tokens=2
    )


def test_both_routers_stream_and_one_endpoint_counts_them(server: Server) -> None:
    server.wait_serving(30)
    assert len(server.routers()) == 2
    before = server.requests_by_code()
    expected = expected_tokens(6)
    chans: list[grpc.Channel] = []
    try:
        for _ in range(64):
            ch = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
            chans.append(ch)
            tokens = [
                t for r in pb_grpc.GenerationStub(ch).Generate(request(6), timeout=30) for t in r.token_ids
            ]
            assert tokens == expected
            if len(chans) >= 4 and len(set(server.router_of_port().values())) == 2:
                break
        assert len(set(server.router_of_port().values())) == 2, "64 connections all landed on one router"
    finally:
        for ch in chans:
            ch.close()
    after = server.requests_by_code()
    assert after["OK"] - before["OK"] == len(chans)  # both processes' counters, summed
    # The HTTP API shares its port the same way: each request on a new connection.
    text = (
        make_engine(num_kv_blocks=64)
        .generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0]
        .text
    )
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    for _ in range(4):
        resp = httpx.post(f"{server.proc.http}/v1/completions", json=body, timeout=30)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == text
    assert Path(f"/proc/{server.proc.proc.pid}").exists()


def test_killed_router_fails_only_its_streams_and_comes_back(server: Server) -> None:
    server.wait_serving(30)
    ok_before = server.requests_by_code()["OK"]
    expected = expected_tokens(200)
    chans = []
    results: dict[int, tuple[str, list[int]]] = {}
    started = [threading.Event() for _ in range(8)]

    def run(i: int, ch: grpc.Channel) -> None:
        tokens: list[int] = []
        try:
            for r in pb_grpc.GenerationStub(ch).Generate(request(200), timeout=60):
                tokens += r.token_ids
                started[i].set()
            results[i] = ("OK", tokens)
        except grpc.RpcError as e:
            results[i] = (e.code().name, tokens)
        started[i].set()

    try:
        owner: dict[int, int] = {}
        for i in range(8):
            ch = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
            seen = set(server.router_of_port())
            grpc.channel_ready_future(ch).result(timeout=10)
            new = set(server.router_of_port()) - seen
            assert len(new) == 1, new
            owner[i] = server.router_of_port()[new.pop()]
            chans.append(ch)
        if len(set(owner.values())) < 2:
            pytest.skip("all 8 connections landed on one router (probability 2**-7)")
        threads = [threading.Thread(target=run, args=(i, ch)) for i, ch in enumerate(chans)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(30)
        assert not results, results  # every stream is still running
        victim = owner[0]
        psutil.Process(victim).kill()
        for t in threads:
            t.join(60)
    finally:
        for ch in chans:
            ch.close()
    for i, pid in owner.items():
        code, tokens = results[i]
        if pid == victim:
            assert code == "UNAVAILABLE", (i, code, len(tokens))
            assert tokens == expected[: len(tokens)]
        else:
            assert (code, tokens) == ("OK", expected), (i, code, len(tokens))
    # The slot is refilled by a new process, and the server serves through both again.
    deadline = time.monotonic() + 60
    while not (len(server.routers()) == 2 and victim not in {r.pid for r in server.routers()}):
        assert time.monotonic() < deadline, "the killed router was not restarted"
        time.sleep(0.2)
    server.wait_serving(60)
    assert "exited with -9: restarting it (1/5)" in logged(server.proc, "router process ", "restarting")
    # The worker aborted the dead router's requests (it stopped sending keepalives) and freed their KV.
    server.wait_worker_idle(30)
    # The dead router's counters stay in the sum (its files outlive it).
    ok_survivors = sum(1 for i, pid in owner.items() if pid != victim)
    assert server.requests_by_code()["OK"] >= ok_before + ok_survivors


def test_soak_every_stream_ends_once(server: Server) -> None:
    """Mixed complete / cancelled / deadline streams over 8 connections: one terminal status each,
    the exact tokens for the completed ones, and the router counters agree with the client."""
    server.wait_serving(60)
    expected = expected_tokens(24)
    rng = random.Random(14)
    kinds = [rng.choice(("ok", "ok", "cancel", "deadline")) for _ in range(96)]
    chans = [grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) for _ in range(8)]
    before = server.requests_by_code()
    outcomes: list[list[str]] = [[] for _ in kinds]

    def run(i: int) -> None:
        stub = pb_grpc.GenerationStub(chans[i % len(chans)])
        kind = kinds[i]
        timeout = 0.05 if kind == "deadline" else 60
        call = stub.Generate(request(24 if kind != "deadline" else 400), timeout=timeout)
        tokens: list[int] = []
        try:
            for r in call:
                tokens += r.token_ids
                if kind == "cancel":
                    call.cancel()
            outcomes[i].append("OK")
            assert tokens == expected
        except grpc.RpcError as e:
            outcomes[i].append(e.code().name)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        for ch in chans:
            ch.close()
    allowed = {"ok": {"OK"}, "cancel": {"CANCELLED", "OK"}, "deadline": {"DEADLINE_EXCEEDED"}}
    for kind, got in zip(kinds, outcomes, strict=True):
        assert len(got) == 1 and got[0] in allowed[kind], (kind, got)
    server.wait_worker_idle(30)
    after = server.requests_by_code()
    # The router counted one end per call; a cancel that crossed the stream's last message reads
    # OK on one side and CANCELLED on the other.
    # A deadline that passes before the router sees the call's first message reads CANCELLED there.
    assert sum(after.values()) - sum(before.values()) == len(kinds)
    assert set((after - before).keys()) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, after - before


def test_sigterm_drains_every_router_then_exits_0(server: Server) -> None:
    server.wait_serving(60)
    expected = expected_tokens(120)
    chans = [grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) for _ in range(4)]
    try:
        calls = [pb_grpc.GenerationStub(ch).Generate(request(120), timeout=60) for ch in chans]
        firsts = [list(next(c).token_ids) for c in calls]
        server.proc.proc.send_signal(15)
        rests = [[t for r in c for t in r.token_ids] for c in calls]
    finally:
        for ch in chans:
            ch.close()
    assert [f + r for f, r in zip(firsts, rests, strict=True)] == [expected] * 4
    assert server.proc.proc.wait(60) == 0
    assert server.proc.stdout.qsize() == 0
    # After the kill, the soak and the drain: every worker's engine invariants hold.
    assert logged(server.proc, "KV block integrity after drain: ") == "ok on every healthy worker\n"
