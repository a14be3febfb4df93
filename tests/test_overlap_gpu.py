"""Overlapped scheduling and the packed one-copy upload on a GPU, with CUDA graphs on."""

from __future__ import annotations

from typing import Any

import pytest
from engine_helpers import make_engine
from overlap_helpers import assert_same_outputs, check_every_prepare, mixed_workload

from kvrelay.worker.engine import Engine

pytestmark = pytest.mark.gpu
# Chunked prefill, preemption (a pool too small for every request at once), graph buckets up to 8.
PRESSURE: dict[str, Any] = {"max_num_batched_tokens": 32, "max_num_seqs": 8, "num_kv_blocks": 24}


def cuda_engine(**overrides: Any) -> Engine:
    return make_engine(device="cuda", **overrides)


def test_overlapped_equals_sync_on_cuda_with_graphs() -> None:
    prompts, params = mixed_workload(lambda: cuda_engine(async_scheduling=False, **PRESSURE))
    sync = cuda_engine(async_scheduling=False, **PRESSURE)
    overlapped = cuda_engine(async_scheduling=True, **PRESSURE)
    assert overlapped.runner.graphs is not None
    checked = check_every_prepare(overlapped)  # the packed upload, placeholders resolved on the device
    want = sync.generate(prompts, params)
    got = overlapped.generate(prompts, params)
    assert_same_outputs(got, want)
    assert len(checked) == overlapped.num_steps
    assert overlapped.scheduler.num_preemptions > 0
    assert overlapped.stats().num_graph_replays > 0 and sync.stats().num_graph_replays > 0
    for engine in (sync, overlapped):
        engine.check_integrity()
        assert engine.allocator.num_used_blocks == 0


def test_packed_upload_equals_rebuilt_inputs_on_cuda() -> None:
    prompts, params = mixed_workload(lambda: cuda_engine(async_scheduling=False, **PRESSURE))
    engine = cuda_engine(async_scheduling=False, **PRESSURE)
    checked = check_every_prepare(engine)
    outs = engine.generate(prompts, params)
    assert sum(len(o.token_ids) for o in outs) > 100
    assert len(checked) == engine.num_steps > 20
    assert engine.scheduler.num_preemptions > 0
    engine.check_integrity()
