"""bench serve's pure parts: metrics on synthetic timestamps with known answers (times are
multiples of 1/4 s so every expected value is exact), the workload and arrival generators with
a seed, the server-counter deltas, and the report writers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvrelay.cluster.bench.metrics import (
    Distribution,
    RequestRecord,
    ServerDelta,
    Slo,
    compute_metrics,
    parse_prometheus,
    server_delta,
)
from kvrelay.cluster.bench.report import (
    BenchPoint,
    BenchRun,
    format_table,
    from_json,
    markdown,
    to_json,
    write_plots,
)
from kvrelay.cluster.bench.workloads import (
    SHAREGPT_INPUT,
    LengthRange,
    arrival_offsets,
    calibration_text,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
    to_text,
    tokens_per_word,
)


def record(
    sent: float, messages: list[tuple[float, int]], ended: float | None = None, error: str | None = None
) -> RequestRecord:
    end = ended if ended is not None else (messages[-1][0] if messages else sent)
    return RequestRecord(sent=sent, messages=list(messages), ended=end, prompt_tokens=10, error=error)


# --- per-request definitions ---


def test_tpot_excludes_the_first_token() -> None:
    r = record(0.0, [(2.0, 1), (2.5, 1), (3.0, 1), (3.5, 1)])
    assert r.ttft() == 2.0
    assert r.e2e() == 3.5
    # (E2E - TTFT) / (n - 1), not E2E / n (0.875) nor (E2E - TTFT) / n (0.375)
    assert r.tpot() == 0.5


def test_itl_is_not_inflated_by_ttft_and_splits_multi_token_messages() -> None:
    # a 2-token first message after a long TTFT, then a 1-token and a 2-token message
    r = record(0.0, [(4.0, 2), (4.5, 1), (5.5, 2)])
    assert r.itls() == [0.5, 0.5, 0.5]  # 0.5 / 1, then 1.0 / 2 twice; the 4 s TTFT is in none
    assert r.output_tokens == 5
    assert r.tpot() == (5.5 - 4.0) / 4


def test_messages_without_tokens_are_not_itl_samples_nor_the_first_token() -> None:
    r = record(1.0, [(1.5, 0), (2.0, 1), (2.25, 0), (3.0, 1)], ended=3.25)
    assert r.ttft() == 1.0  # the first message carrying a token
    assert r.itls() == [1.0]
    assert r.e2e() == 2.25  # the stream's end, after the last token
    assert r.tpot() == 1.25


def test_one_token_request_has_no_tpot_and_no_itl() -> None:
    r = record(0.0, [(0.75, 1)])
    assert (r.ttft(), r.tpot(), r.itls()) == (0.75, None, [])


# --- run-level figures ---


def test_goodput_throughput_and_errors() -> None:
    records = [
        record(0.0, [(0.5, 1), (0.75, 1), (1.0, 1)]),  # TTFT 0.5, TPOT 0.25: meets both
        record(0.0, [(3.0, 1), (3.25, 1)]),  # TTFT 3 > 2: misses
        record(1.0, [(1.5, 1), (2.5, 1)]),  # TPOT 1.0 > 0.5: misses
        record(2.0, [(2.25, 1)]),  # one token: TTFT only
        record(0.0, [(0.5, 1)], ended=4.0, error="UNAVAILABLE"),  # failed: its end sets the duration
        record(1.0, [], ended=1.25, error="INVALID_ARGUMENT"),
        record(1.0, [], ended=1.25, error="INVALID_ARGUMENT"),
    ]
    m = compute_metrics(records, Slo(ttft_s=2.0, tpot_s=0.5))
    assert m.duration_s == 4.0
    assert (m.completed, m.failed) == (4, 3)
    assert m.errors == {"INVALID_ARGUMENT": 2, "UNAVAILABLE": 1}
    assert m.output_tokens == 3 + 2 + 2 + 1
    assert m.prompt_tokens == 40
    assert m.request_throughput == 1.0
    assert m.output_throughput == 2.0
    assert m.total_token_throughput == 12.0
    assert m.goodput == 2 / 4  # the first and the one-token request
    assert sorted(m.samples["ttft"]) == [0.25, 0.5, 0.5, 3.0]
    assert sorted(m.samples["tpot"]) == [0.25, 0.25, 1.0]
    assert m.ttft.count == 4 and m.ttft.mean == 4.25 / 4
    assert compute_metrics(records, Slo(ttft_s=None, tpot_s=None)).goodput == 1.0


def test_e2e_slo_and_no_records() -> None:
    records = [record(0.0, [(0.5, 1), (1.0, 1)]), record(0.0, [(0.5, 1), (2.0, 1)])]
    assert compute_metrics(records, Slo(ttft_s=None, tpot_s=None, e2e_s=1.0)).goodput == 0.5
    empty = compute_metrics([], Slo())
    assert (empty.completed, empty.duration_s) == (0, 0.0)
    assert math.isnan(empty.request_throughput) and math.isnan(empty.ttft.p99)


def test_percentiles_match_a_rank_interpolation_reference() -> None:
    assert Distribution.of([float(x) for x in range(101)]) == Distribution(101, 50.0, 50.0, 90.0, 99.0)
    d = Distribution.of([4.0, 1.0, 3.0, 2.0])
    assert (d.p50, d.p90, d.p99) == (2.5, 3.7, pytest.approx(3.97))

    def reference(xs: list[float], p: float) -> float:  # rank p/100 * (n-1), linear between neighbours
        s = sorted(xs)
        k = p / 100 * (len(s) - 1)
        lo = math.floor(k)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)

    xs = list(np.random.default_rng(3).exponential(size=257))
    d = Distribution.of(xs)
    assert (d.p50, d.p90, d.p99) == pytest.approx([reference(xs, p) for p in (50, 90, 99)], rel=1e-12)


def test_slo_rejects_non_positive_limits() -> None:
    with pytest.raises(ValueError, match="slo tpot_s must be > 0 seconds or None, got 0"):
        Slo(tpot_s=0)


# --- arrivals ---


@pytest.mark.parametrize(("burstiness", "cv"), [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_gamma_arrivals_have_the_asked_rate_and_burstiness(burstiness: float, cv: float) -> None:
    t = arrival_offsets(20000, rate=10.0, burstiness=burstiness, seed=7)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)  # CV = 1 / sqrt(shape)
    assert np.array_equal(t, arrival_offsets(20000, 10.0, burstiness, seed=7))
    assert not np.array_equal(t, arrival_offsets(20000, 10.0, burstiness, seed=8))


def test_infinite_rate_sends_everything_at_once_and_bad_rates_are_refused() -> None:
    assert arrival_offsets(5, math.inf, 1.0, seed=0).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="request rate must be > 0"):
        arrival_offsets(5, 0.0, 1.0, seed=0)
    with pytest.raises(ValueError, match="burstiness must be a finite number > 0, got -1"):
        arrival_offsets(5, 1.0, -1.0, seed=0)


# --- workloads ---


def test_random_workload_lengths_and_ids() -> None:
    reqs = random_requests(200, LengthRange(5, 9), LengthRange(3, 3), vocab_size=50, seed=1)
    assert {r.prompt_len for r in reqs} == set(range(5, 10))
    assert all(len(r.prompt) == r.prompt_len and r.output_len == 3 for r in reqs)
    ids = [t for r in reqs for t in r.prompt]
    assert all(isinstance(t, int) and 3 <= t < 50 for t in ids)
    assert reqs == random_requests(200, LengthRange(5, 9), LengthRange(3, 3), vocab_size=50, seed=1)


def test_sharegpt_lengths_follow_the_lognormal_and_fit_the_context() -> None:
    wide = sharegpt_requests(20000, vocab_size=1000, max_model_len=1_000_000, seed=2)
    assert np.mean([r.prompt_len for r in wide]) == pytest.approx(SHAREGPT_INPUT.mean, rel=0.04)
    assert np.median([r.output_len for r in wide]) == pytest.approx(337.99 * math.exp(-0.32), rel=0.04)
    tight = sharegpt_requests(500, vocab_size=1000, max_model_len=128, seed=2)
    assert all(r.prompt_len >= 4 and r.output_len >= 1 for r in tight)
    assert max(r.prompt_len + r.output_len for r in tight) == 128
    with pytest.raises(ValueError, match="max_model_len 4 is below the shortest sharegpt request"):
        sharegpt_requests(1, vocab_size=1000, max_model_len=4, seed=0)


def test_shared_prefix_requests_share_exactly_their_group_prefix() -> None:
    reqs = shared_prefix_requests(60, 3, 16, LengthRange(2, 4), LengthRange(5, 5), vocab_size=300, seed=4)
    prefixes = {r.prefix_group: r.prompt[:16] for r in reqs}
    assert set(prefixes) == {0, 1, 2} and len(set(prefixes.values())) == 3
    assert all(r.prompt[:16] == prefixes[r.prefix_group] for r in reqs)
    assert all(len(r.prompt) == r.prompt_len and 18 <= r.prompt_len <= 20 for r in reqs)
    texts = to_text(reqs)
    group0 = [t.prompt for t, r in zip(texts, reqs, strict=True) if r.prefix_group == 0]
    assert isinstance(group0[0], str) and len(group0[0].split(" ")) == group0[0].count(" ") + 1
    head = " ".join(str(group0[0]).split(" ")[:16])
    assert all(str(p).startswith(head + " ") for p in group0)


def test_text_prompts_scale_with_tokens_per_word() -> None:
    text = calibration_text(128)
    assert len(text.split(" ")) == 21  # (128 - 2) // 6 words of at most 6 tokens each
    assert tokens_per_word(text, 84) == 4.0
    req = random_requests(1, LengthRange(40, 40), LengthRange(1, 1), vocab_size=300, seed=0)
    (half,) = to_text(req, tokens_per_word=2.0)
    assert isinstance(half.prompt, str) and len(half.prompt.split(" ")) == 20
    assert (half.prompt_len, half.output_len) == (40, 1)
    with pytest.raises(ValueError, match="max_model_len 7 is too short for text prompts"):
        calibration_text(7)


@pytest.mark.parametrize(
    ("text", "message"), [("0", "1 <= LO <= HI"), ("9:3", "got '9:3'"), ("x", "integers")]
)
def test_length_range_parse_errors_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--input-len: .*{message}"):
        LengthRange.parse(text, "--input-len")
    assert LengthRange.parse("7", "--x") == LengthRange(7, 7)
    assert LengthRange.parse("2:9", "--x") == LengthRange(2, 9)


# --- server counters ---

_BEFORE = """\
# TYPE kvrelay_worker_prefix_cache_queries counter
kvrelay_worker_prefix_cache_queries_total{worker="0"} 100.0
kvrelay_worker_prefix_cache_queries_total{worker="1"} 50.0
# TYPE kvrelay_worker_prefix_cache_hits counter
kvrelay_worker_prefix_cache_hits_total{worker="0"} 10.0
# TYPE kvrelay_worker_graph_replays counter
kvrelay_worker_graph_replays_total{worker="0"} 5.0
# TYPE kvrelay_worker_eager_steps counter
kvrelay_worker_eager_steps_total{worker="0"} 5.0
# TYPE kvrelay_worker_preemptions counter
kvrelay_worker_preemptions_total{worker="0"} 9.0
"""


def test_server_delta_from_two_scrapes() -> None:
    before = parse_prometheus(_BEFORE)
    assert before["kvrelay_worker_prefix_cache_queries_total"] == 150.0
    after = dict(before)
    after.update(
        {
            "kvrelay_worker_prefix_cache_queries_total": 350.0,
            "kvrelay_worker_prefix_cache_hits_total": 160.0,
            "kvrelay_worker_graph_replays_total": 35.0,
            "kvrelay_worker_eager_steps_total": 15.0,
            "kvrelay_worker_preemptions_total": 2.0,  # a worker restarted: its counter reset
        }
    )
    d = server_delta(before, after)
    assert (d.prefix_cache_queries, d.prefix_cache_hits, d.preemptions) == (200.0, 150.0, 0.0)
    assert d.prefix_cache_hit_rate == 0.75
    assert d.graph_replay_share == 0.75
    assert math.isnan(server_delta(before, before).graph_replay_share)


# --- report ---


def _run(sweep: str | None) -> BenchRun:
    recs = [record(0.0, [(0.5, 1), (0.75, 1)]), record(0.0, [], ended=1.0, error="UNAVAILABLE")]
    m = compute_metrics(recs, Slo())
    points = [BenchPoint(r, 4, m) for r in ((1.0, 2.0, math.inf) if sweep else (math.inf,))]
    return BenchRun({"workload": "random"}, {"model": "tiny", "max_model_len": 128}, points, sweep)


def test_report_writers(tmp_path: Path) -> None:
    run = _run("rate")
    table = format_table(run)
    assert "Goodput (req/s, TTFT <= 2000.00 ms, TPOT <= 100.00 ms)" in table
    assert "Errors UNAVAILABLE" in table and "TPOT mean / p50 / p90 / p99 (ms)" in table
    assert table.splitlines()[-1].split() == [
        "inf",
        "4",
        "1",
        "1",
        "1.00",
        "2.00",
        "0.00",
        "500.00",
        "250.00",
    ]
    doc = to_json(run)
    text = json.dumps(doc, allow_nan=False)  # NaN and inf made JSON-safe
    assert json.loads(text)["points"][2]["rate"] == "inf"
    assert doc["points"][0]["metrics"]["errors"] == {"UNAVAILABLE": 1}
    assert doc["points"][0]["metrics"]["samples"]["ttft"] == [0.5]
    plots = write_plots(tmp_path / "plots", run)
    assert [p.name for p in plots] == ["latency_cdf.png", "sweep_rate.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    md = markdown(run, [Path("plots/latency_cdf.png")])
    assert "## Sweep over rate" in md and "![latency_cdf](plots/latency_cdf.png)" in md
    assert "p99 TTFT ms" not in format_table(_run(None))  # no sweep summary for a single run


def test_json_round_trip_for_plotting_elsewhere() -> None:
    """A result written on the GPU machine (no matplotlib there) is plotted here from its JSON."""
    run = _run("rate")
    server = ServerDelta(
        prefix_cache_queries=10, prefix_cache_hits=4, preemptions=0, graph_replays=3, eager_steps=1
    )
    run = BenchRun(
        run.settings,
        run.server,
        [
            BenchPoint(p.rate, p.max_concurrency, dataclasses.replace(p.metrics, server=server))
            for p in run.points
        ],
        run.sweep,
    )
    data = json.loads(json.dumps(to_json(run)))
    back = from_json(data)
    assert to_json(back) == data
    assert back.points[-1].rate == math.inf and back.points[0].metrics.server.prefix_cache_hit_rate == 0.4
    assert back.points[0].metrics.samples == run.points[0].metrics.samples
    assert format_table(back) == format_table(run)
