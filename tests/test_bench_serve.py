"""`kvrelay bench serve` against a real `kvrelay serve` subprocess (tiny model, one CPU worker,
max_model_len 128), shared by the whole module: each workload, each arrival mode, a sweep through
the CLI with every output, failed requests counted by status, and the one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_serve import ServeProcess

from kvrelay import cli
from kvrelay.cluster.bench.metrics import BenchMetrics, Slo
from kvrelay.cluster.bench.report import BenchRun
from kvrelay.cluster.bench.serve import (
    BenchServeConfig,
    add_bench_serve_args,
    config_from_args,
    drive,
    run,
    send_one,
)
from kvrelay.cluster.bench.workloads import BenchRequest
from kvrelay.cluster.client import build_request

MAX_MODEL_LEN = 128
CONFIG = f"""\
port: 0
workers: 1
device: cpu
drain_grace_s: 1
metrics_port: 0
engine:
  num_kv_blocks: 256
  dtype: float32
  max_model_len: {MAX_MODEL_LEN}
"""


@dataclass(frozen=True)
class Server:
    address: str
    metrics_url: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("bench") / "kvrelay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    p = ServeProcess(["--config", str(config), "--host", "127.0.0.1"])
    try:
        address = p.wait_ready(180)
        deadline = time.monotonic() + 10
        while not (found := re.search(r"metrics on (http://\S+/metrics)", "".join(p.stderr))):
            assert time.monotonic() < deadline, "no metrics line on the server's stderr"
            time.sleep(0.05)
        yield Server(address, found.group(1))
    finally:
        p.kill()


def config(server: Server, *argv: str) -> BenchServeConfig:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    return config_from_args(parser.parse_args(["--server", server.address, "--no-progress", *argv]))


def bench(server: Server, *argv: str) -> BenchRun:
    return asyncio.run(run(config(server, *argv)))


def only(result: BenchRun) -> BenchMetrics:
    assert len(result.points) == 1
    return result.points[0].metrics


def assert_all_ok(m: BenchMetrics, n: int, output_tokens: int) -> None:
    assert (m.completed, m.failed, m.errors) == (n, 0, {})
    assert m.output_tokens == output_tokens  # ignore_eos: exactly max_tokens each
    assert (m.ttft.count, m.e2e.count) == (n, n)
    assert 0 < m.ttft.p50 <= m.e2e.p50 and m.request_throughput > 0


def test_random_workload_all_at_once(server: Server) -> None:
    m = only(bench(server, "--num-requests", "6", "--input-len", "8:16", "--output-len", "4"))
    assert_all_ok(m, 6, 24)
    assert 6 * 8 <= m.prompt_tokens <= 6 * 16
    assert m.tpot.count == 6 and m.itl.count == 6 * 3  # 3 gaps after the first token, per request


def test_poisson_rate_and_gamma_burstiness(server: Server) -> None:
    for burstiness in ("1.0", "0.5"):
        args = ["--num-requests", "5", "--input-len", "8", "--output-len", "3", "--request-rate", "50"]
        result = bench(server, *args, "--burstiness", burstiness)
        assert_all_ok(only(result), 5, 15)
        assert result.points[0].rate == 50.0


def test_fixed_concurrency_and_time_bound(server: Server) -> None:
    m = only(
        bench(
            server, "--num-requests", "6", "--input-len", "8", "--output-len", "3", "--max-concurrency", "2"
        )
    )
    assert_all_ok(m, 6, 18)
    # 1000 requests at 20 req/s, but sending stops after 0.3 s: only the first few are sent
    m = only(
        bench(
            server,
            "--num-requests",
            "1000",
            "--input-len",
            "8",
            "--output-len",
            "2",
            "--request-rate",
            "20",
            "--duration",
            "0.3",
        )
    )
    assert 1 <= m.completed <= 15 and m.failed == 0


def test_sharegpt_lengths_fit_the_servers_context(server: Server) -> None:
    result = bench(server, "--workload", "sharegpt", "--num-requests", "3", "--max-concurrency", "3")
    m = only(result)
    assert (m.completed, m.failed) == (3, 0)
    assert m.prompt_tokens + m.output_tokens <= 3 * MAX_MODEL_LEN
    assert result.server["max_model_len"] == MAX_MODEL_LEN


def test_text_prompts_are_sized_with_the_servers_tokens_per_word(server: Server) -> None:
    m = only(
        bench(
            server, "--prompt-kind", "text", "--num-requests", "3", "--input-len", "40", "--output-len", "2"
        )
    )
    assert_all_ok(m, 3, 6)
    # the tiny model's byte-level tokenizer makes several tokens of a word: without calibration
    # 40 words would be far more than 40 tokens
    assert 3 * 25 <= m.prompt_tokens <= 3 * 55


def test_shared_prefix_hits_the_cache_and_server_figures_are_deltas(server: Server) -> None:
    args = ["--workload", "shared-prefix", "--num-prefixes", "2", "--prefix-len", "48", "--suffix-len", "4"]
    args += ["--output-len", "2", "--num-requests", "8", "--max-concurrency", "1", "--warmup-requests", "2"]
    m = only(bench(server, *args, "--metrics-url", server.metrics_url))
    assert_all_ok(m, 8, 16)
    assert m.server is not None
    # every measured prompt token was looked up once; the warm-up's were not counted
    assert m.server.prefix_cache_queries == m.prompt_tokens == 8 * 52
    # 8 sequential requests over 2 prefixes warmed up (at most) twice: most prefix blocks hit
    assert m.server.prefix_cache_hits >= 6 * 48 - 6 * 16
    assert m.server.preemptions == 0


def test_failed_requests_are_counted_by_status_and_the_run_goes_on(server: Server) -> None:
    cfg = config(server, "--request-timeout", "30")
    good = BenchRequest((5, 6, 7), 3, 2)
    too_big_id = BenchRequest((5, 10**6), 2, 2)  # beyond the vocabulary: INVALID_ARGUMENT
    too_long = BenchRequest((5,) * 10, 10, MAX_MODEL_LEN)  # past max_model_len: INVALID_ARGUMENT

    async def go() -> list[str | None]:
        from kvrelay.cluster.client import AsyncKvrelayClient

        async with AsyncKvrelayClient(server.address) as client:
            recs = await drive(client, [good, too_big_id, too_long, good], [0.0] * 4, None, cfg)
            slow = await send_one(
                client, BenchRequest((5,) * 8, 8, 100), config(server, "--request-timeout", "0.001")
            )
        return [r.error for r in recs] + [slow.error]

    errors = asyncio.run(go())
    assert errors == [None, "INVALID_ARGUMENT", "INVALID_ARGUMENT", None, "DEADLINE_EXCEEDED"]


def test_cli_sweep_writes_table_json_report_and_plots(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--server", server.address, "--no-progress", "--num-requests", "4"]
    argv += ["--input-len", "8", "--output-len", "3", "--max-concurrency", "1,4", "--slo-tpot-ms", "off"]
    argv += ["--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.md")]
    assert cli.main([*argv, "--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert (
        "==== rate inf req/s, concurrency 1 ====" in out and "==== rate inf req/s, concurrency 4 ====" in out
    )
    assert "Goodput (req/s, TTFT <= 2000.00 ms)" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["sweep"] == "concurrency"
    assert [p["max_concurrency"] for p in doc["points"]] == [1, 4]
    assert [p["metrics"]["completed"] for p in doc["points"]] == [4, 4]
    first = doc["points"][0]["metrics"]
    assert first["output_tokens"] == 4 * 3
    # One ITL sample per token after a request's first message: 2 per request when every token
    # comes in a message of its own, fewer when the router merged two steps into one message
    # (a loaded machine), never more.
    assert 0 < len(first["samples"]["itl"]) <= 4 * 2
    assert all(x > 0 for x in first["samples"]["itl"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_cdf.png",
        "sweep_concurrency.png",
    ]
    assert "![sweep_concurrency](plots/sweep_concurrency.png)" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--request-rate", "0"], "--request-rate must be > 0 (inf: all at once), got 0"),
        (["--workload", "chat"], "--workload must be one of random, sharegpt, shared-prefix, got 'chat'"),
        (
            ["--input-len", "100", "--output-len", "64"],
            f"--input-len/--output-len: 100 + 64 tokens exceed the server's max_model_len {MAX_MODEL_LEN}",
        ),
        (
            ["--workload", "shared-prefix", "--prefix-len", "120"],
            "--prefix-len/--suffix-len/--output-len: 120 + 32 + 128 tokens exceed",
        ),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1, got 0"),
        (["--slo-tpot-ms", "fast"], "--slo-tpot-ms: expected milliseconds or 'off', got 'fast'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    server: Server, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "serve", "--server", server.address, "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvrelay: error: {message}"), err
    assert err.count("\n") == 1


def test_slo_flags_reach_the_config(server: Server) -> None:
    cfg = config(server, "--slo-ttft-ms", "500", "--slo-tpot-ms", "off", "--slo-e2e-ms", "2500")
    assert cfg.slo == Slo(ttft_s=0.5, tpot_s=None, e2e_s=2.5)


def test_id_prompts_ask_for_no_text_unless_want_text() -> None:
    """Token-id prompts set skip_text (the router then does not detokenize them); --want-text and
    text prompts keep the text. A capturing stand-in for the client: no server needed."""
    seen: list[tuple[str, bool, float | None]] = []

    class Capture:
        async def stream(self, prompt: Any, *, timeout: float | None, **kw: Any) -> AsyncIterator[object]:
            request = build_request(prompt, **kw)  # what the real client puts on the wire
            seen.append((request.WhichOneof("prompt") or "", request.sampling.skip_text, timeout))
            return
            yield

    nowhere = Server("127.0.0.1:1", "")
    ids, text = BenchRequest((5, 6, 7), 3, 2), BenchRequest("five six", 2, 2)
    default, want = config(nowhere, "--request-timeout", "7"), config(nowhere, "--want-text")
    for req, cfg in [(ids, default), (text, default), (ids, want)]:
        rec = asyncio.run(send_one(Capture(), req, cfg))
        assert rec.error is None
    assert seen == [("token_ids", True, 7.0), ("text", False, 7.0), ("token_ids", False, 600.0)]
