"""CUDA graphs for steps with prefill chunks: one whole-forward graph per token-count bucket.

An eager step launches ~30 kernels per layer (~460 for a 16-layer 1B model), a fixed ~10 ms
of host time on an H200 whatever the prompt length: a 16-token prompt cost as much as a
2048-token one, and every step that mixes a prefill chunk into decodes paid it too. A step of
T tokens over S sequences instead replays the graph of the smallest token bucket Tb >= T
(16, 32, 48, ..., max_num_batched_tokens by default), captured over the model runner's static
input buffers, in one launch.

**Why one whole graph per bucket, not vLLM v1's piecewise graphs.** Piecewise capture
(everything but attention in graphs, attention eager between the pieces) exists because
FlashAttention's varlen launch sizes its grid from host-side lengths. Ours does not: the
Triton varlen kernel (``attention/triton_prefill.py``, ``prefill_attention``) has the grid
``(num_tokens // BLOCK_Q + num_seqs, num_kv_heads)`` and reads every length
(``query_start_loc``, ``seq_lens``, the block table) on the device, so with Tb tokens and a
fixed sequence count it is capturable as is, and the KV write already skips slot -1. A
whole graph then replays in one launch, where piecewise capture still pays two eager
attention launches plus a graph replay per layer (~50 launches for the 1B model) and
splits each layer's code at the attention call. Backends that read the host lists
(the torch backend, ``prefill_impl="sdpa"``) are not capturable
(``AttentionBackend.prefill_graph_safe``): the engine then runs these steps eagerly.

**Padding, inert by construction.** A bucket's graph runs ``Sg = min(max_num_seqs, Tb) + 1``
sequence rows (a step has at most min(max_num_seqs, T) sequences, so one row is always spare).
Real sequences fill rows 0..S-1 and token rows 0..T-1 exactly as eagerly. Then:
- token rows T..Tb-1: token 0 at position 0 (RoPE reads row 0 of its table), slot -1 (the KV
  write skips them);
- sequence row S owns those Tb - T rows with context length 0: the kernel attends over no
  key (its key range is clamped at 0), reads no KV and writes zeros for them;
- sequence rows S+1..Sg-1 own no rows (query_start_loc = Tb) and their programs return at once.
Every op besides attention is row-wise, so real rows compute exactly what they compute
eagerly; the attention kernel tiles each sequence from its own first row, so its output
for real rows is bit-identical too. Only the GEMMs see a taller M, which cuBLAS may serve
with another kernel (last-bit differences, as with the padded decode graphs).

**Memory.** The graphs end at the final norm and copy the hidden states into one static
buffer [max bucket, hidden] outside the pool (lm_head runs eagerly on the sampled rows, as
in ``cuda_graph.py``). All buckets share one pool, with the decode graphs, captured
largest first: the smaller graphs reuse its activations.

The padding is five small device fills before the replay (``_pad``): the step's upload wrote
only its real rows. Steps with more tokens than the largest bucket run eagerly and count in
``ModelRunner.num_eager_steps``; decode-only steps keep the decode graphs (``cuda_graph.py``).

On the CPU (``use_graphs=False``) the runner runs the same padded forward eagerly: that is
what a graph would record, so the tests check the padding and bucketing there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .attention.backend import AttentionBackend
from .attention.metadata import AttentionMetadata
from .config import EngineConfig
from .graph_capture import BucketGraphs, GraphTarget

if TYPE_CHECKING:  # torch's pool-handle type; not importable at runtime in every torch version
    from torch.cuda import _POOL_HANDLE as GraphPool

log = logging.getLogger("kvrelay")

_SMALLEST_BUCKET = 16


def default_token_buckets(max_num_batched_tokens: int) -> list[int]:
    """16 to 128 in steps of 16, then four steps per doubling (160, 192, 224, 256, 320, ...), then
    max_num_batched_tokens: a step pads by at most a quarter of a power of two (< 25% waste; the
    first H200 run with doubling buckets padded a 320-token mixed step to 512). 24 graphs for
    2048 tokens, captured in about a second into one shared pool."""
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    buckets = []
    b = _SMALLEST_BUCKET
    while b < max_num_batched_tokens:
        buckets.append(b)
        b += max(_SMALLEST_BUCKET, (1 << (b.bit_length() - 1)) // 4)
    return [*buckets, max_num_batched_tokens]


def prefill_token_buckets(config: EngineConfig, backend: AttentionBackend) -> list[int]:
    """The token buckets an engine captures: [] where prefill graphs are off, or where the
    attention backend cannot be captured with a prefill (it reads host lengths)."""
    if not config.prefill_graphs:
        return []
    if not backend.prefill_graph_safe:
        log.info("prefill CUDA graphs off: %s reads host lengths", type(backend).__name__)
        return []
    if config.prefill_graph_tokens:
        return sorted(set(config.prefill_graph_tokens))
    return default_token_buckets(config.max_num_batched_tokens)


class PrefillGraphRunner(BucketGraphs):
    """Graphs of steps with prefill chunks, one per token bucket, over the runner's static buffers
    (capture skeleton: ``graph_capture.py``)."""

    what = "prefill CUDA graphs"
    bucket_unit = "tokens"

    def __init__(
        self, target: GraphTarget, buckets: Sequence[int], *, max_num_seqs: int, use_graphs: bool = True
    ) -> None:
        # Sequence rows: target.seq_lens [>= max_num_seqs + 1], query_start_loc [>= max_num_seqs + 2].
        self.max_num_seqs = max_num_seqs
        self.use_graphs = use_graphs
        super().__init__(target, buckets)
        assert self.seq_lens.shape[0] >= self.graph_seqs(self.max_bucket), (self.seq_lens.shape, max_num_seqs)

    def graph_seqs(self, bucket: int) -> int:
        """Sequence rows of a bucket's graph: every real sequence of a step that fits, plus the
        padding sequence. A sequence has >= 1 token, so at most min(max_num_seqs, bucket)."""
        return min(self.max_num_seqs, bucket) + 1

    def _meta(self, bucket: int) -> AttentionMetadata:
        sg = self.graph_seqs(bucket)
        return AttentionMetadata(
            num_seqs=sg,
            num_tokens=bucket,
            query_start_loc=self.query_start_loc[: sg + 1],
            seq_lens=self.seq_lens[:sg],
            block_tables=self.block_tables[:sg],
            slot_mapping=self.slot_mapping[:bucket],
            # Host lists: unknown at capture, and never read by a prefill_graph_safe backend.
            query_lens_cpu=[],
            seq_lens_cpu=[],
            # > 1 selects the varlen kernel (decode-only steps never come here).
            max_query_len=bucket + 1,
            max_seq_len=0,
        )

    def _forward(self, bucket: int) -> None:
        h = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_caches, self._meta(bucket))
        self.hidden[:bucket].copy_(h)  # [bucket, hidden]

    def _pad(self, num_tokens: int, num_seqs: int, bucket: int) -> None:
        """Make rows past the step's real ones inert (see the module docstring), on the device.

        The step's upload wrote rows 0..num_tokens-1 and sequence rows 0..num_seqs-1; the rest
        hold an earlier step's values. Five small fills, in stream order before the replay."""
        t, s, sg = num_tokens, num_seqs, self.graph_seqs(bucket)
        assert 1 <= s < sg and t <= bucket, (t, s, sg, bucket)
        if t < bucket:
            self.input_ids[t:bucket].zero_()
            self.positions[t:bucket].zero_()
            self.slot_mapping[t:bucket].fill_(-1)
        self.seq_lens[s:sg].zero_()
        self.query_start_loc[s + 1 : sg + 1].fill_(bucket)

    def _fill_padding(self, bucket: int) -> None:
        """Every row a padding row of ``bucket``'s layout: sequence 0 owns all its token rows with
        context 0, the rest own none. Warm-up and capture run in this state: no KV is touched."""
        n, sg = self.max_bucket, self.graph_seqs(self.max_bucket)
        self.input_ids[:n].zero_()
        self.positions[:n].zero_()
        self.slot_mapping[:n].fill_(-1)
        self.seq_lens[:sg].zero_()
        self.block_tables[:sg].zero_()
        self.query_start_loc[:1].zero_()
        self.query_start_loc[1 : sg + 1].fill_(bucket)

    @torch.inference_mode()
    def capture(self, *, pool: GraphPool | None = None, progress: bool = True) -> None:
        """Capture every bucket, largest first, into ``pool`` (a new one if None); each bucket
        warms up and is captured in its own all-padding layout."""
        assert self.use_graphs, "capture() on a runner built with use_graphs=False"
        self._capture(pool=pool, progress=progress, fill=self._fill_padding)

    def run(self, num_tokens: int, num_seqs: int, bucket: int) -> torch.Tensor:
        """Pad, then replay the bucket's graph (or run its forward eagerly without graphs) over the
        uploaded inputs; returns [bucket, hidden], of which rows 0..num_tokens-1 are the step's."""
        self._pad(num_tokens, num_seqs, bucket)
        if self.use_graphs:
            self.graphs[bucket].replay()
        else:
            self._forward(bucket)
        self.num_replays += 1
        return self.hidden[:bucket]
