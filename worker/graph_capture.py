"""The capture skeleton shared by the decode graphs (``cuda_graph.py``) and the prefill graphs
(``prefill_graph.py``): one graph per bucket, over a model runner's static buffers, in one pool.

Both runners capture the same way, and only what a bucket means differs (a batch size for
decode, a token count for prefill) and how its padding rows are laid out (each runner's
``_fill_padding`` and ``_meta``). Shared here:
- ``GraphTarget``: what every graph of one model runner runs over (the model, its KV pool, the
  static input buffers the graphs read in place, the width and dtype of the hidden output);
- ``BucketGraphs``: the per-runner state (buckets, the one hidden output buffer, the graphs,
  their pool, the replay, time and memory counters that EngineStats reports) and the lookup
  of a bucket;
- ``capture_buckets``: the CUDA-only capture loop: largest bucket first into one shared pool, on
  a side stream, two warm-ups outside the graph (Triton compile and autotune, cuBLAS
  workspaces), then the capture; the seconds it took and the device memory it took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from tqdm import tqdm

from .model.llama import LlamaForCausalLM

if TYPE_CHECKING:  # torch's pool-handle type; not importable at runtime in every torch version
    from torch.cuda import _POOL_HANDLE as GraphPool

log = logging.getLogger("kvrelay")


@dataclass(frozen=True)
class GraphTarget:
    """What the graphs of one model runner run over; every tensor is read (and the KV pool
    written) in place, so a replay needs only the input buffers refilled. T is the runner's
    max_num_batched_tokens, B its max_num_seqs + 1 sequence rows (one for prefill padding)."""

    model: LlamaForCausalLM
    kv_caches: tuple[torch.Tensor, ...]  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, -1: no KV write
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    hidden_size: int  # width of the graphs' hidden-state output
    dtype: torch.dtype  # the model's activation dtype


@dataclass(frozen=True)
class CapturedGraphs:
    graphs: dict[int, torch.cuda.CUDAGraph]  # bucket -> its graph
    pool: GraphPool
    seconds: float  # wall time of the whole capture, warm-ups included
    memory_bytes: int  # device memory the capture took (free memory before minus after)


@torch.inference_mode()
def capture_buckets(
    buckets: Sequence[int],
    forward: Callable[[int], None],
    device: torch.device,
    *,
    pool: GraphPool | None,
    fill: Callable[[int], None] | None = None,
    desc: str,
    progress: bool,
) -> CapturedGraphs:
    """Capture ``forward(bucket)`` for every bucket, largest first, into ``pool`` (a new one if None).

    fill, when given, lays out the static inputs for a bucket before its warm-ups (on the current
    stream; the side stream waits for it). Otherwise the inputs must already be in a state every
    bucket can run in. The largest bucket goes first: it needs the most activation memory, and
    the smaller ones reuse that memory from the shared pool."""
    torch.cuda.synchronize(device)
    free_before = torch.cuda.mem_get_info(device)[0]
    t0 = time.perf_counter()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    for bucket in tqdm(sorted(buckets, reverse=True), desc=desc, unit="graph", disable=not progress):
        if fill is not None:
            fill(bucket)
            stream.wait_stream(torch.cuda.current_stream(device))  # the fills run on the current stream
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compile and cuBLAS workspaces, outside the graph
                forward(bucket)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            forward(bucket)
        graphs[bucket] = graph
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    memory_bytes = max(0, free_before - torch.cuda.mem_get_info(device)[0])
    return CapturedGraphs(graphs, pool, seconds, memory_bytes)


class BucketGraphs:
    """One graph per bucket over a GraphTarget; subclasses say what a bucket runs (``_forward``)."""

    # For the progress bar and the log line: what these graphs are, and what a bucket counts.
    what: ClassVar[str]  # "CUDA graphs"
    bucket_unit: ClassVar[str]  # "batch"

    def __init__(self, target: GraphTarget, buckets: Sequence[int]) -> None:
        self.model = target.model
        self.kv_caches = list(target.kv_caches)
        self.buckets = sorted(set(buckets))
        assert self.buckets and self.buckets[0] >= 1, self.buckets
        self.max_bucket = self.buckets[-1]
        assert target.input_ids.shape[0] >= self.max_bucket, (target.input_ids.shape, self.max_bucket)
        self.input_ids, self.positions = target.input_ids, target.positions
        self.slot_mapping, self.query_start_loc = target.slot_mapping, target.query_start_loc
        self.seq_lens, self.block_tables = target.seq_lens, target.block_tables
        # [max bucket, hidden]: outside the graph pool, so no graph pins a per-bucket output.
        self.hidden = torch.zeros(
            self.max_bucket, target.hidden_size, dtype=target.dtype, device=target.input_ids.device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: GraphPool | None = None
        self.num_replays = 0
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket >= n, or None (the step runs eagerly)."""
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _forward(self, bucket: int) -> None:
        """The model over the bucket's rows of the static inputs, into ``hidden[:bucket]``."""
        raise NotImplementedError

    def _capture(
        self, *, pool: GraphPool | None, progress: bool, fill: Callable[[int], None] | None = None
    ) -> None:
        """Capture every bucket (``capture_buckets``), keep the graphs and their cost, log it."""
        captured = capture_buckets(
            self.buckets,
            self._forward,
            self.input_ids.device,
            pool=pool,
            fill=fill,
            desc=f"capturing {self.what}",
            progress=progress,
        )
        self.graphs, self.pool = captured.graphs, captured.pool
        self.capture_seconds, self.graph_memory_bytes = captured.seconds, captured.memory_bytes
        log.info(
            "captured %d %s (%s %d..%d) in %.1f s, %.0f MiB",
            len(self.graphs),
            self.what,
            self.bucket_unit,
            self.buckets[0],
            self.max_bucket,
            self.capture_seconds,
            self.graph_memory_bytes / 2**20,
        )
