"""Turns a SchedulerOutput into model inputs, runs the forward pass, returns the logits to sample.

Inputs are written into persistent buffers (worker/step_inputs.py: packed host staging, pinned
and double-buffered on a GPU, uploaded with one copy per step) sized once for the largest step,
so a step allocates no new input tensors and the decode path can be replayed by a CUDA graph
that reads the same device buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .attention.metadata import AttentionMetadata
from .cuda_graph import CudaGraphRunner
from .graph_capture import GraphTarget
from .kv_cache.block_allocator import BlockAllocator
from .model.llama import LlamaForCausalLM
from .prefill_graph import PrefillGraphRunner
from .request import Request
from .scheduler import ScheduledRequest, SchedulerOutput
from .step_inputs import InputBuffers

if TYPE_CHECKING:  # torch's pool-handle type; not importable at runtime in every torch version
    from torch.cuda import _POOL_HANDLE as GraphPool


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    # [S] int64 indices into the T rows: the last row of every sequence that samples this step.
    sample_rows: torch.Tensor
    # The CUDA graph bucket this decode step replays (rows num_seqs.. are padding), or None: eager.
    graph_bucket: int | None = None


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: Sequence[torch.Tensor],
        *,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = list(kv_caches)
        self.block_size = block_size
        self.device = device
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.max_num_seqs = max_num_seqs
        # One sequence row more than a step uses: the padding sequence of the prefill graphs.
        self.buffers = InputBuffers(max_num_batched_tokens, max_num_seqs + 1, self.max_blocks_per_seq, device)
        self.graphs: CudaGraphRunner | None = None  # decode-only steps
        self.prefill_graphs: PrefillGraphRunner | None = None  # steps with prefill chunks
        # (request, its preemption count, blocks written) per host block-table row; None = unknown.
        self._row_owner: list[tuple[Request, int, int] | None] = [None] * max_num_seqs
        self._row_of: dict[Request, int] = {}  # each request's row in the last step (_stable_rows)
        self._graph_rows = torch.empty(0, dtype=torch.int64, device=device)  # unused: graphs sample every row
        self.num_eager_steps = 0

    def capture_cuda_graphs(
        self,
        buckets: list[int],
        *,
        hidden_size: int,
        dtype: torch.dtype,
        token_buckets: Sequence[int] = (),
        progress: bool = True,
    ) -> CudaGraphRunner | None:
        """Capture decode graphs over this runner's static buffers (buckets past max_num_seqs dropped;
        none given: none captured) and, given token_buckets, prefill graphs first (the largest
        graphs) into the same pool."""
        pool = None
        if token_buckets:
            pool = self.attach_prefill_graphs(
                token_buckets, hidden_size=hidden_size, dtype=dtype, capture=True, progress=progress
            ).pool
        if not buckets:
            return None
        usable = [b for b in buckets if b <= self.max_num_seqs]
        assert usable, f"no CUDA graph bucket fits max_num_seqs={self.max_num_seqs}"
        self.graphs = CudaGraphRunner(self._graph_target(hidden_size, dtype), usable)
        self.graphs.capture(progress=progress, pool=pool)
        return self.graphs

    def attach_prefill_graphs(
        self,
        token_buckets: Sequence[int],
        *,
        hidden_size: int,
        dtype: torch.dtype,
        capture: bool,
        progress: bool = True,
        pool: GraphPool | None = None,
    ) -> PrefillGraphRunner:
        """Route steps with prefill chunks of <= max(token_buckets) tokens through padded token
        buckets: captured graphs (capture=True, CUDA), or the same padded forward run eagerly
        (capture=False: what the CPU tests check). Buckets past max_num_batched_tokens are dropped.
        ``pool``: capture into an existing graph pool (graphs of one runner never replay at once)."""
        max_tokens = self.buffers.input_ids.shape[0]
        usable = [b for b in token_buckets if b <= max_tokens]
        assert usable, f"no token bucket fits max_num_batched_tokens={max_tokens}"
        runner = PrefillGraphRunner(
            self._graph_target(hidden_size, dtype),
            usable,
            max_num_seqs=self.max_num_seqs,
            use_graphs=capture,
        )
        if capture:
            runner.capture(progress=progress, pool=pool)
        self.prefill_graphs = runner
        return runner

    def _graph_target(self, hidden_size: int, dtype: torch.dtype) -> GraphTarget:
        """What every graph of this runner (decode and prefill) runs over: the static buffers."""
        buf = self.buffers
        return GraphTarget(
            model=self.model,
            kv_caches=tuple(self.kv_caches),
            input_ids=buf.input_ids,
            positions=buf.positions,
            slot_mapping=buf.slot_mapping,
            query_start_loc=buf.query_start_loc,
            seq_lens=buf.seq_lens,
            block_tables=buf.block_tables,
            hidden_size=hidden_size,
            dtype=dtype,
        )

    @property
    def graph_memory_bytes(self) -> int:
        """Device memory the captured graphs took (decode and prefill, one shared pool)."""
        return sum(g.graph_memory_bytes for g in (self.graphs, self.prefill_graphs) if g is not None)

    @property
    def graph_capture_seconds(self) -> float:
        return sum(g.capture_seconds for g in (self.graphs, self.prefill_graphs) if g is not None)

    def prepare(
        self,
        sched: SchedulerOutput,
        allocator: BlockAllocator,
        prev_sampled: torch.Tensor | None = None,
    ) -> ModelInput:
        """Fill this step's inputs and upload them (one copy).

        prev_sampled: [S] int64 on the device, the previous step's sampled tokens, when some
        scheduled token is still a placeholder -(1 + j) on the host (overlapped scheduling):
        those input rows are filled from it on the device."""
        buf = self.buffers
        buf.begin_step()
        # The step's rows in the order that keeps each request in last step's row: what the
        # sampler, launch and resolve read from here on (they follow sched.scheduled).
        sched.scheduled = scheduled = self._stable_rows(sched.scheduled)
        num_seqs = len(scheduled)
        for req in sched.preempted:  # its blocks were freed: rows it owned are stale
            self._row_owner = [o if o is None or o[0] is not req else None for o in self._row_owner]
        self._write_block_tables(sched, allocator)
        query_lens = [s.num_new_tokens for s in scheduled]
        t = sum(query_lens)
        if t == num_seqs:  # decode only: vectorized over the batch
            seq_lens, sample_rows = self._fill_decode(scheduled)
        else:
            seq_lens, sample_rows = self._fill_tokens(scheduled)
        has_placeholders = t > 0 and int(buf.np_input_ids[:t].min()) < 0
        bucket = None
        if self.graphs is not None and t == num_seqs:  # decode only: one token per sequence
            bucket = self.graphs.bucket_for(num_seqs)
        if bucket is not None:
            self._pad_rows(num_seqs, bucket)
        else:
            buf.np_sample_rows[: len(sample_rows)] = sample_rows
        buf.upload()
        if has_placeholders:
            if prev_sampled is None:
                raise RuntimeError(
                    "a scheduled token is a placeholder but no previous step's tokens were given"
                )
            buf.resolve_placeholders(t, prev_sampled)
        meta = AttentionMetadata(
            num_seqs=num_seqs,
            num_tokens=t,
            query_start_loc=buf.query_start_loc[: num_seqs + 1],
            seq_lens=buf.seq_lens[:num_seqs],
            block_tables=buf.block_tables[:num_seqs],
            slot_mapping=buf.slot_mapping[:t],
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )
        if bucket is not None:  # every decode row samples: no index tensor needed
            return ModelInput(buf.input_ids[:t], buf.positions[:t], meta, self._graph_rows, bucket)
        rows = buf.sample_rows[: len(sample_rows)]
        return ModelInput(buf.input_ids[:t], buf.positions[:t], meta, rows)

    def _stable_rows(self, scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
        """The step's requests by row: each keeps the row it had in the last step when that row is
        still in range; the others (arrivals, and requests whose row is past the shrunk batch)
        fill the free rows in scheduling order.

        The scheduler's order is its running list, so a request that finishes shifts every later
        request up one row, and each shifted row's block table had to be rewritten and uploaded:
        in a served batch, where requests finish a few at a time, most rows every few steps. Kept
        rows leave one row moved per finish (the last row's request fills the hole), as vLLM's
        persistent batch does. The order of rows changes nothing a row computes."""
        n = len(scheduled)
        row_of = self._row_of
        rows: list[ScheduledRequest | None] = [None] * n
        movers: list[ScheduledRequest] = []
        for s in scheduled:
            r = row_of.get(s.request)
            if r is not None and r < n and rows[r] is None:
                rows[r] = s
            else:
                movers.append(s)
        if movers:
            it = iter(movers)
            for i in range(n):
                if rows[i] is None:
                    rows[i] = next(it)
        ordered: list[ScheduledRequest] = rows  # type: ignore[assignment]  # every row is filled
        self._row_of = {s.request: i for i, s in enumerate(ordered)}
        return ordered

    def _write_block_tables(self, sched: SchedulerOutput, allocator: BlockAllocator) -> None:
        """Row i of the block table is rewritten only when its request or block count changed:
        a decode step appends a block every block_size tokens, so most rows stay as they were,
        and of a rewritten row only the entries that changed travel (InputBuffers.set_block_rows)."""
        owners, bs, view = self._row_owner, self.block_size, allocator.block_ids_view
        changed: list[tuple[int, list[int]]] = []
        for i, s in enumerate(sched.scheduled):
            req = s.request
            blocks = view(req.request_id)
            num_blocks = len(blocks)
            assert num_blocks * bs >= s.start + s.num_new_tokens, (req.request_id, num_blocks)
            owner = owners[i]
            # Field by field rather than a key tuple built per row: the same test, cheaper.
            if (
                owner is not None
                and owner[0] is req
                and owner[2] == num_blocks
                and owner[1] == req.num_preemptions
            ):
                continue
            changed.append((i, list(blocks)))
            owners[i] = (req, req.num_preemptions, num_blocks)
        if changed:
            self.buffers.set_block_rows(changed)

    def _fill_decode(self, scheduled: list[ScheduledRequest]) -> tuple[list[int], list[int]]:
        """Token-level inputs of a step of one token per sequence; -> (seq_lens, sample_rows).

        One Python pass over the rows (the per-row work of a batch-256 decode step is most of
        the host's cost), then numpy over the batch."""
        buf, bs = self.buffers, self.block_size
        num_seqs = len(scheduled)
        starts: list[int] = []
        ids: list[int] = []
        sample_rows: list[int] = []
        for i, s in enumerate(scheduled):
            start, tokens = s.start, s.request.all_token_ids
            starts.append(start)
            ids.append(tokens[start])
            if start + 1 == len(tokens):  # ScheduledRequest.samples, with num_new_tokens == 1
                sample_rows.append(i)
        pos = np.array(starts, dtype=np.int64)  # [S]
        buf.np_input_ids[:num_seqs] = ids
        buf.np_positions[:num_seqs] = pos
        buf.np_slot_mapping[:num_seqs] = buf.np_block_tables[np.arange(num_seqs), pos // bs] * bs + pos % bs
        buf.np_seq_lens[:num_seqs] = pos + 1
        buf.np_query_start_loc[: num_seqs + 1] = np.arange(num_seqs + 1)
        return [start + 1 for start in starts], sample_rows

    def _fill_tokens(self, scheduled: list[ScheduledRequest]) -> tuple[list[int], list[int]]:
        """Token-level inputs of a step with prefill chunks; -> (seq_lens, sample_rows).

        A served worker's usual step (decodes plus an arriving prompt's chunk): one Python pass
        over the rows gathers ids and lengths, numpy then expands them to the T token rows."""
        buf, bs = self.buffers, self.block_size
        num_seqs = len(scheduled)
        ids: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        t = 0
        for s in scheduled:
            n, start, tokens = s.num_new_tokens, s.start, s.request.all_token_ids
            end = start + n
            ids += tokens[start:end]
            starts.append(start)
            query_lens.append(n)
            seq_lens.append(end)
            t += n
            if end == len(tokens):  # ScheduledRequest.samples
                sample_rows.append(t - 1)
        lens = np.array(query_lens, dtype=np.int64)  # [S]
        ends = np.cumsum(lens)  # [S]: query_start_loc[1:]
        # Token row j of sequence i sits at position starts[i] + (j - query_start_loc[i]).
        pos = np.arange(t, dtype=np.int64) + np.repeat(np.array(starts, dtype=np.int64) - (ends - lens), lens)
        seq_of_row = np.repeat(np.arange(num_seqs), lens)  # [T]
        buf.np_input_ids[:t] = ids
        buf.np_positions[:t] = pos
        buf.np_slot_mapping[:t] = buf.np_block_tables[seq_of_row, pos // bs] * bs + pos % bs
        buf.np_seq_lens[:num_seqs] = seq_lens
        buf.np_query_start_loc[0] = 0
        buf.np_query_start_loc[1 : num_seqs + 1] = ends
        return seq_lens, sample_rows

    def _pad_rows(self, start: int, end: int) -> None:
        """Host rows start..end-1 become padding a graph can run: no KV write, empty context.

        Their block-table rows keep whatever they held: a sequence of length 0 reads none of it."""
        buf = self.buffers
        buf.np_input_ids[start:end] = 0
        buf.np_positions[start:end] = 0
        buf.np_slot_mapping[start:end] = -1
        buf.np_seq_lens[start:end] = 0
        buf.np_query_start_loc[start + 1 : end + 1] = np.arange(start + 1, end + 1)

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> torch.Tensor:
        """Run the model; returns [S, vocab] logits of the sampling rows, in the model's dtype (the
        sampler reads them as float32 where its math needs it).

        A decode-only step replays its batch bucket's graph (prepared in ``prepare``); a step with
        prefill chunks replays its token bucket's graph; a step that fits no graph runs eagerly."""
        meta = inp.meta
        if inp.graph_bucket is not None:
            assert self.graphs is not None
            hidden = self.graphs.replay(meta.num_seqs, inp.graph_bucket)  # [B, hidden]
            return self.model.compute_logits(hidden, upcast=False)
        pg = self.prefill_graphs
        bucket = None if pg is None or meta.is_decode_only else pg.bucket_for(meta.num_tokens)
        if bucket is not None:
            assert pg is not None
            hidden = pg.run(meta.num_tokens, meta.num_seqs, bucket)  # [bucket, hidden]
            return self.model.compute_logits(hidden[inp.sample_rows], upcast=False)
        self.num_eager_steps += 1
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, meta)  # [T, hidden]
        return self.model.compute_logits(hidden[inp.sample_rows], upcast=False)
