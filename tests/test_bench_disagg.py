"""`kvrelay bench disagg` end to end on the CPU: two real servers (2 colocated workers, then
1 prefill + 1 decode), the harness driving both, a table and JSON with both runs and ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvrelay.cli import main


def test_bench_disagg_runs_both_setups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "disagg.json"
    argv = ["bench", "disagg", "--device", "cpu", "--ttft-input-len", "48", "--ttft-requests", "3"]
    argv += ["--throughput-requests", "6", "--serve-arg=--max-model-len=512", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "colocated x2" in table and "disaggregated 1P+1D" in table
    doc = json.loads(out.read_text())
    colocated, disaggregated = doc["results"].values()
    for r in (colocated, disaggregated):
        assert r["failed"] == 0 and r["ttft_mean_ms"] > 0 and r["output_tok_s"] > 0
    assert set(doc["ratios"]) == set(colocated) - {"failed"}
    assert math.isclose(
        doc["ratios"]["ttft_mean_ms"], disaggregated["ttft_mean_ms"] / colocated["ttft_mean_ms"]
    )


def test_bench_disagg_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "disagg", "--prefill-workers", "0"]) == 2
    assert "--prefill-workers and --decode-workers must be >= 1" in capsys.readouterr().err
