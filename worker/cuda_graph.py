"""CUDA-graph decode: one graph per padded batch-size bucket, all in one shared memory pool.

A decode step launches a few hundred small kernels; at small batch the GPU idles between
them while Python issues the next. Capturing the step once per bucket and replaying it
removes that launch overhead. The graphs read the model runner's static input buffers
(token ids, positions, slot mapping, block tables, sequence lengths) in place, so a replay
needs only those buffers refilled. A batch of B sequences runs the graph of the smallest
bucket >= B; rows B.. are padding: slot -1 (the KV write skips it), sequence length 0 (the
attention kernel reads nothing and writes zeros), token 0 at position 0.

The graph ends at the final norm and copies the hidden states into one static buffer shared
by all buckets; the lm_head and the sampler run eagerly on the first B rows. Why: a graph's
output tensor stays alive with the graph, so per-bucket [B, vocab] logits would pin
gigabytes of the shared pool (sum over buckets of B x vocab x 4 bytes), while one hidden
buffer costs max_bucket x hidden.

Buckets are captured largest first: the largest needs the most activation memory and the
smaller ones reuse it from the shared pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .attention.metadata import AttentionMetadata
from .graph_capture import BucketGraphs, GraphTarget

if TYPE_CHECKING:  # torch's pool-handle type; not importable at runtime in every torch version
    from torch.cuda import _POOL_HANDLE as GraphPool


def default_buckets(max_bucket: int = 256) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to max_bucket (at most 512)."""
    if not 1 <= max_bucket <= 512:
        raise ValueError(f"max_graph_batch_size must be in [1, 512], got {max_bucket}")
    small = [b for b in (1, 2, 4) if b <= max_bucket]
    return small + list(range(8, max_bucket + 1, 8))


class CudaGraphRunner(BucketGraphs):
    """Decode graphs, one per batch-size bucket (capture skeleton: ``graph_capture.py``)."""

    what = "CUDA graphs"
    bucket_unit = "batch"

    def __init__(self, target: GraphTarget, buckets: Sequence[int]) -> None:
        super().__init__(target, buckets)
        assert self.block_tables.shape[0] >= self.max_bucket, (self.block_tables.shape, self.max_bucket)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_seqs=bs,
            num_tokens=bs,
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[0] * bs,  # eager-only field: unknown at capture, never read by the decode kernel
            max_query_len=1,
            max_seq_len=0,
        )

    def _forward(self, bs: int) -> None:
        h = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))
        self.hidden[:bs].copy_(h)

    def _fill_padding(self) -> None:
        """Every row a padding row: the state warm-up and capture run in (writes nothing to the cache)."""
        n = self.max_bucket
        self.input_ids[:n].zero_()
        self.positions[:n].zero_()
        self.slot_mapping[:n].fill_(-1)
        self.seq_lens[:n].zero_()
        self.block_tables[:n].zero_()
        self.query_start_loc[: n + 1].copy_(
            torch.arange(n + 1, dtype=torch.int32, device=self.input_ids.device)
        )

    @torch.inference_mode()
    def capture(self, progress: bool = True, pool: GraphPool | None = None) -> None:
        """Capture every bucket, largest first, into ``pool`` (a new one if None).

        Every bucket runs in the all-padding state, laid out once for the largest."""
        self._fill_padding()
        self._capture(pool=pool, progress=progress)

    def replay(self, num_seqs: int, bucket: int) -> torch.Tensor:
        """Replay the bucket's graph over the filled static inputs; returns [num_seqs, hidden]."""
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.hidden[:num_seqs]
