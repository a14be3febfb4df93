"""The capture skeleton both graph runners share (worker/graph_capture.py), on the CPU.

CUDA graphs need a GPU, so torch.cuda's capture calls are replaced by a recorder and each
runner's forward by one that records which bucket ran and whether the static inputs were in
that bucket's all-padding layout. What is checked is the order the skeleton promises: the
prefill graphs first and their pool handed to the decode graphs, largest bucket first, each
bucket's padding laid out before its two warm-ups on the side stream, then one capture into the
shared pool; and the time and memory accounting that EngineStats reports. The GPU tests
(test_gpu_engine.py, test_gpu_prefill_graph.py) check that the captured graphs replay to the
eager result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from engine_helpers import make_engine

from kvrelay.worker.cuda_graph import CudaGraphRunner
from kvrelay.worker.engine import Engine
from kvrelay.worker.prefill_graph import PrefillGraphRunner

Event = tuple[Any, ...]


class FakeCuda:
    """torch.cuda's capture API under its own names (CamelCase ones too), recording each call in
    order; free device memory comes from a list, one value per mem_get_info call."""

    def __init__(self, free_bytes: list[int]) -> None:
        self.events: list[Event] = []
        self.free = iter(free_bytes)
        self.num_pools = 0

    def synchronize(self, device: torch.device | None = None) -> None:
        self.events.append(("sync",))

    def mem_get_info(self, device: torch.device | None = None) -> tuple[int, int]:
        return next(self.free), 1 << 40

    def graph_pool_handle(self) -> tuple[str, int]:
        self.num_pools += 1
        return ("pool", self.num_pools)

    def current_stream(self, device: torch.device | None = None) -> str:
        return "current"

    def Stream(self, device: torch.device | None = None) -> FakeStream:
        return FakeStream(self)

    @contextmanager
    def stream(self, s: FakeStream) -> Iterator[None]:
        self.events.append(("side stream",))
        yield
        self.events.append(("current stream",))

    def CUDAGraph(self) -> object:
        return object()

    @contextmanager
    def graph(self, graph: object, *, pool: object, stream: FakeStream) -> Iterator[None]:
        self.events.append(("capture", pool))
        yield
        self.events.append(("captured",))


class FakeStream:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def wait_stream(self, other: str) -> None:
        self.cuda.events.append(("wait", other))

    def synchronize(self) -> None:
        self.cuda.events.append(("side sync",))


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    # Free memory: 1000 before the prefill capture, 900 after; 900 before the decode one, 860 after.
    fake = FakeCuda([1000, 900, 900, 860])
    for name in ("synchronize", "mem_get_info", "graph_pool_handle", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    for name in ("Stream", "stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))

    def decode_forward(self: CudaGraphRunner, bs: int) -> None:
        n = self.max_bucket  # decode padding: every row of the largest bucket, laid out once
        padded = bool((self.slot_mapping[:n] == -1).all() and (self.seq_lens[:n] == 0).all())
        fake.events.append(("decode forward", bs, padded))

    def prefill_forward(self: PrefillGraphRunner, bucket: int) -> None:
        sg = self.graph_seqs(bucket)  # prefill padding: sequence 0 owns the bucket's rows
        padded = bool((self.query_start_loc[1 : sg + 1] == bucket).all())
        fake.events.append(("prefill forward", bucket, padded))

    monkeypatch.setattr(CudaGraphRunner, "_forward", decode_forward)
    monkeypatch.setattr(PrefillGraphRunner, "_forward", prefill_forward)
    return fake


def bucket_events(kind: str, bucket: int, *, fill: bool) -> list[Event]:
    """What capturing one bucket records: its layout (prefill), two warm-ups, one capture."""
    waited: list[Event] = [("wait", "current")] if fill else []
    forward = (f"{kind} forward", bucket, True)
    return [
        *waited,
        ("side stream",),
        forward,
        forward,
        ("current stream",),
        ("side sync",),
        ("capture", ("pool", 1)),
        forward,
        ("captured",),
    ]


def small_engine() -> Engine:
    return make_engine(max_num_seqs=8, max_num_batched_tokens=64)


def test_prefill_then_decode_largest_first_into_one_pool(fake_cuda: FakeCuda) -> None:
    engine = small_engine()
    runner = engine.runner
    hidden, dtype = engine.model_config.hidden_size, engine.dtype
    # 16 is past max_num_seqs (dropped), 128 past max_num_batched_tokens (dropped).
    decode = runner.capture_cuda_graphs(
        [4, 1, 2, 16], hidden_size=hidden, dtype=dtype, token_buckets=[32, 16, 128], progress=False
    )
    assert decode is runner.graphs and decode is not None
    prefill = runner.prefill_graphs
    assert prefill is not None
    assert fake_cuda.events == [
        ("sync",),
        *bucket_events("prefill", 32, fill=True),
        *bucket_events("prefill", 16, fill=True),
        ("sync",),
        ("sync",),
        *bucket_events("decode", 4, fill=False),
        *bucket_events("decode", 2, fill=False),
        *bucket_events("decode", 1, fill=False),
        ("sync",),
    ]
    assert fake_cuda.num_pools == 1  # the decode graphs went into the prefill graphs' pool
    assert (prefill.pool, decode.pool) == (("pool", 1), ("pool", 1))
    assert (sorted(prefill.graphs), sorted(decode.graphs)) == ([16, 32], [1, 2, 4])
    assert (prefill.graph_memory_bytes, decode.graph_memory_bytes) == (100, 40)
    assert runner.graph_memory_bytes == 140
    assert runner.graph_capture_seconds == prefill.capture_seconds + decode.capture_seconds > 0
    stats = engine.stats()
    assert (stats.graph_memory_bytes, stats.graph_capture_s) == (140, runner.graph_capture_seconds)
    assert (decode.bucket_for(1), decode.bucket_for(3), decode.bucket_for(5)) == (1, 4, None)
    assert (prefill.bucket_for(1), prefill.bucket_for(17), prefill.bucket_for(33)) == (16, 32, None)


def test_decode_graphs_alone_get_a_pool_of_their_own(fake_cuda: FakeCuda) -> None:
    engine = small_engine()
    hidden, dtype = engine.model_config.hidden_size, engine.dtype
    decode = engine.runner.capture_cuda_graphs([2], hidden_size=hidden, dtype=dtype, progress=False)
    assert decode is not None and engine.runner.prefill_graphs is None
    assert fake_cuda.events == [("sync",), *bucket_events("decode", 2, fill=False), ("sync",)]
    assert (decode.pool, decode.graph_memory_bytes) == (("pool", 1), 100)


def test_capture_counts_no_memory_when_free_memory_grew(fake_cuda: FakeCuda) -> None:
    engine = small_engine()
    fake_cuda.free = iter([500, 600])  # another allocation freed during the capture
    hidden, dtype = engine.model_config.hidden_size, engine.dtype
    decode = engine.runner.capture_cuda_graphs([1], hidden_size=hidden, dtype=dtype, progress=False)
    assert decode is not None and decode.graph_memory_bytes == 0


def test_a_prefill_runner_without_graphs_refuses_to_capture() -> None:
    engine = small_engine()
    hidden, dtype = engine.model_config.hidden_size, engine.dtype
    pg = engine.runner.attach_prefill_graphs([16], hidden_size=hidden, dtype=dtype, capture=False)
    with pytest.raises(AssertionError, match="use_graphs=False"):
        pg.capture()
