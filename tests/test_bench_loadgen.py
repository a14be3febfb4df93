"""The load generator of `kvrelay bench serve`: the schedule split across client processes, the
client-CPU warning, several processes merged against one, and the HTTP protocol mode, against an
in-process server (router + gRPC + HTTP over a `FakePool` of real tiny engines, no Ray)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fake_pool import FakePool
from http_helpers import HttpServed, start_http, stop_http
from ray_helpers import LoopThread

from kvrelay.cluster.bench.connections import GrpcConnections
from kvrelay.cluster.bench.http_client import HttpBenchClient, base_url
from kvrelay.cluster.bench.loadgen import auto_client_processes, split_schedule
from kvrelay.cluster.bench.metrics import Slo, compute_metrics
from kvrelay.cluster.bench.report import BenchPoint, BenchRun, client_cpu_warning, format_table, to_json
from kvrelay.cluster.bench.serve import BenchServeConfig, add_bench_serve_args, config_from_args, drive, run
from kvrelay.cluster.bench.workloads import BenchRequest

INPUT_LEN, OUTPUT_LEN, NUM_REQUESTS = 8, 6, 12


@pytest.fixture(scope="module")
def served() -> Iterator[HttpServed]:
    lt = LoopThread()
    s = start_http(lt, FakePool(2, num_kv_blocks=256))
    yield s
    stop_http(s)
    lt.close()


def config(server: str, *argv: str) -> BenchServeConfig:
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    base = ["--server", server, "--no-progress", "--input-len", str(INPUT_LEN)]
    base += ["--output-len", str(OUTPUT_LEN), "--num-requests", str(NUM_REQUESTS)]
    return config_from_args(p.parse_args([*base, *argv]))


def request(i: int) -> BenchRequest:
    return BenchRequest(prompt=(i,), prompt_len=1, output_len=1)


# ---- units ---------------------------------------------------------------------------------------
def test_split_is_round_robin_with_original_offsets_and_split_concurrency() -> None:
    reqs = [request(i) for i in range(7)]
    offsets = [0.1 * i for i in range(7)]
    shares = split_schedule(reqs, offsets, 5, 3)
    assert [[r.prompt for r in s.requests] for s in shares] == [
        [(0,), (3,), (6,)],
        [(1,), (4,)],
        [(2,), (5,)],
    ]
    assert [s.offsets for s in shares] == [
        [0.0, 0.30000000000000004, 0.6000000000000001],
        [0.1, 0.4],
        [0.2, 0.5],
    ]
    assert [s.max_concurrency for s in shares] == [2, 2, 1]  # 5 slots: 2 + 2 + 1
    # fewer slots than processes: only as many processes as slots take part
    assert [len(s.requests) for s in split_schedule(reqs, offsets, 2, 3)] == [4, 3]
    assert [s.max_concurrency for s in split_schedule(reqs, offsets, None, 2)] == [None, None]
    assert (
        auto_client_processes(2) == 1 and auto_client_processes(16) == 4 and auto_client_processes(128) == 8
    )


def test_cpu_warning_fires_only_for_a_saturated_process() -> None:
    assert client_cpu_warning((0.5, 0.89)) is None
    warning = client_cpu_warning((0.5, 0.95))
    assert warning is not None and "process 1: 0.95" in warning and "process 0" not in warning
    # the warning reaches the table and the JSON of a point whose reading says so
    m = compute_metrics([], Slo())
    hot = BenchRun({}, {"model": "m"}, [BenchPoint(math.inf, None, m, (0.97,))], None)
    assert "WARNING" in format_table(hot) and "process 0: 0.97" in format_table(hot)
    doc = to_json(hot)["points"][0]
    assert doc["client_cpu"] == [0.97] and "process 0: 0.97" in doc["client_cpu_warning"]
    cool = BenchRun({}, {"model": "m"}, [BenchPoint(math.inf, None, m, (0.3,))], None)
    assert "WARNING" not in format_table(cool) and to_json(cool)["points"][0]["client_cpu_warning"] is None


def test_base_url_and_bad_flags() -> None:
    assert base_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert base_url("https://h:1/v1/") == "https://h:1"
    with pytest.raises(ValueError, match="--protocol must be grpc or http, got 'udp'"):
        config("x:1", "--protocol", "udp")
    with pytest.raises(ValueError, match="--client-processes: expected an integer or auto, got 'many'"):
        config("x:1", "--client-processes", "many")
    with pytest.raises(ValueError, match="--client-processes must be 1 to 256"):
        config("x:1", "--client-processes", "0")


# ---- against the in-process server -----------------------------------------------------------------
def test_two_client_processes_merge_to_what_one_process_measures(served: HttpServed) -> None:
    one = asyncio.run(run(config(served.grpc_address, "--max-concurrency", "4"))).points[0]
    t0 = time.perf_counter()
    two = asyncio.run(run(config(served.grpc_address, "--max-concurrency", "4", "--client-processes", "2")))
    wall = time.perf_counter() - t0
    (merged,) = two.points
    for p in (one, merged):
        assert p.metrics.completed == NUM_REQUESTS and p.metrics.failed == 0
        assert p.metrics.output_tokens == NUM_REQUESTS * OUTPUT_LEN  # ignore_eos: exactly max_tokens
        assert p.metrics.prompt_tokens == NUM_REQUESTS * INPUT_LEN
        assert p.metrics.ttft.count == NUM_REQUESTS
    assert len(one.client_cpu) == 1 and len(merged.client_cpu) == 2
    assert all(0.0 < c < 2.0 for c in (*one.client_cpu, *merged.client_cpu))
    # One clock for every process: the merged run spans at least its longest request and at most
    # the time this test waited for it (spawning the processes included).
    assert merged.metrics.e2e.p99 * 0.99 <= merged.metrics.duration_s <= wall


def test_connections_are_separate_tcp_connections_and_carry_the_streams_in_turn(served: HttpServed) -> None:
    """--connections 3: three TCP connections from this process to the server (one shared
    connection would load a single router process of a SO_REUSEPORT server), every request served."""
    psutil = pytest.importorskip("psutil")
    port = int(served.grpc_address.rsplit(":", 1)[1])

    async def go() -> tuple[int, Any]:
        async with GrpcConnections(served.grpc_address, 3) as conns:
            await conns.wait_ready(10.0)
            results = await asyncio.gather(*(conns.generate([1, 2, 3], max_tokens=2) for _ in range(6)))
            mine = [
                c
                for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
            ]
            return len({c.laddr.port for c in mine}), results

    n_conns, results = asyncio.run(go())
    assert n_conns == 3
    assert [len(r.token_ids) for r in results] == [2] * 6
    cfg = config(served.grpc_address, "--connections", "3", "--max-concurrency", "4")
    m = asyncio.run(run(cfg)).points[0].metrics
    assert m.completed == NUM_REQUESTS and m.failed == 0 and m.output_tokens == NUM_REQUESTS * OUTPUT_LEN
    with pytest.raises(ValueError, match="--connections must be 1 to 1024, got 0"):
        config("x:1", "--connections", "0")
    with pytest.raises(ValueError, match="--connections is for --protocol grpc"):
        config("x:1", "--connections", "2", "--protocol", "http")


def test_http_mode_counts_every_token_and_times_it(served: HttpServed) -> None:
    result = asyncio.run(run(config(served.base_url, "--protocol", "http", "--max-concurrency", "4")))
    assert result.server["max_model_len"] > 0 and result.server["model"] == "tiny"
    m = result.points[0].metrics
    assert m.completed == NUM_REQUESTS and m.failed == 0 and m.errors == {}
    assert m.output_tokens == NUM_REQUESTS * OUTPUT_LEN
    assert m.prompt_tokens == NUM_REQUESTS * INPUT_LEN  # the usage chunk's count
    assert m.ttft.count == NUM_REQUESTS and m.ttft.p50 > 0
    # one ITL sample per token after each request's first message
    assert 0 < m.itl.count <= NUM_REQUESTS * (OUTPUT_LEN - 1) and m.itl.p50 > 0


def test_http_records_tokens_per_event_and_failures_by_status(served: HttpServed) -> None:
    cfg = config(served.base_url, "--protocol", "http")

    async def records() -> list[Any]:
        async with HttpBenchClient(served.base_url, 4) as client:
            await client.wait_ready(10)
            info = await client.model_info(10)
            ok = BenchRequest(prompt=(5, 6, 7), prompt_len=3, output_len=OUTPUT_LEN)
            too_long = BenchRequest(prompt=(5,), prompt_len=1, output_len=info.max_model_len + 1)
            return await drive(client, [ok, too_long], [0.0, 0.0], None, cfg)

    good, bad = asyncio.run(records())
    assert good.ok and good.output_tokens == OUTPUT_LEN and good.prompt_tokens == 3
    assert all(n >= 1 for _, n in good.messages)
    assert bad.error == "HTTP_400" and bad.messages == []

    late = config(served.base_url, "--protocol", "http", "--request-timeout", "0.001")

    async def timed_out() -> Any:
        async with HttpBenchClient(served.base_url, 1) as client:
            await client.model_info(10)
            req = BenchRequest(prompt=(5, 6, 7), prompt_len=3, output_len=OUTPUT_LEN)
            return (await drive(client, [req], [0.0], None, late))[0]

    assert asyncio.run(timed_out()).error == "DEADLINE_EXCEEDED"


def test_continuous_usage_stats_match_the_streamed_tokens(served: HttpServed) -> None:
    """Every chunk's cumulative completion_tokens equals the tokens streamed so far, counted
    independently from each chunk's logprobs entries (one per token)."""
    body = {
        "model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 9, "temperature": 0, "ignore_eos": True,
        "logprobs": 1, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    counted, usages, final = 0, [], None
    with (
        httpx.Client(base_url=served.base_url, timeout=60) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk["choices"]:
                counted += len(chunk["choices"][0]["logprobs"]["tokens"])
                usages.append((counted, chunk["usage"]))
            else:
                final = chunk["usage"]
    assert usages and all(u["completion_tokens"] == n and u["prompt_tokens"] == 4 for n, u in usages)
    assert all(u["total_tokens"] == 4 + n for n, u in usages)
    assert final is not None and final["completion_tokens"] == counted == 9
    # without the option, chunks keep OpenAI's null usage
    body["stream_options"] = {"include_usage": True}
    with (
        httpx.Client(base_url=served.base_url, timeout=60) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert all(ch["usage"] is None for ch in chunks if ch["choices"])
