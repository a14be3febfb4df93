"""The model runner's per-step inputs, packed so one host-to-device copy carries a whole step.

Layout of one packed buffer (bytes; every region starts on a 256-byte boundary so each typed
view is aligned for any kernel, and a CUDA graph captured over the views keeps reading the
same addresses forever):

    input_ids        int64 [T]       token ids (a negative id is a placeholder, see below)
    positions        int64 [T]
    slot_mapping     int64 [T]       -1: padding row, no KV write
    sample_rows      int64 [B]       rows of T whose logits are sampled (eager steps)
    query_start_loc  int32 [B + 1]
    seq_lens         int32 [B]
    table_updates    int32 [U, 2]    (flat index into block_tables, block id) pairs

T = max_num_batched_tokens, B = max_num_seqs, U = B * max_blocks_per_seq (every entry at once,
the worst case). The host writes a step into one of two pinned copies of this layout (double
buffering: while step N's copy may still be reading one copy, the host fills the other for
step N+1; an event recorded after each copy is waited on before its copy is written again).
`upload` copies bytes [0, end of the used table updates) in one `copy_` into the device
buffer, whose typed regions are the static tensors the model and the graphs read. The
fixed regions (~50 KB at T = 2048) always travel whole: one copy of them costs a couple of
microseconds, far less than six separate copies' launch latency.

The block table ([B, max_blocks_per_seq] int32) is not in the copy: a full row is
max_model_len / block_size wide, so it stays on the device and only the entries that changed
since the last step travel, as table_updates, applied by one scatter after the copy. The host
keeps a mirror of what the device holds (`np_block_tables`) to compute slot mappings and diffs.

Placeholders (overlapped scheduling, worker/overlap.py): a token id -(1 + j) in input_ids means
"row j of the previous step's sampled tokens", still on the device and unknown to the host.
`resolve_placeholders` replaces those rows on the device after the copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 256


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _HostViews:
    """One host half's regions as numpy arrays (the same memory as the pinned tensor)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    sample_rows: np.ndarray  # [B] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    updates: np.ndarray  # [U, 2] int32
    mv_updates: memoryview  # `updates` as a memoryview: cheaper scalar writes


class InputBuffers:
    """Packed static per-step inputs: two host staging copies and the device buffer they go to."""

    def __init__(
        self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device
    ) -> None:
        t, b = max_num_tokens, max_num_seqs
        self.device = device
        self.max_updates = b * max_blocks_per_seq
        fields = (
            ("input_ids", t, torch.int64),
            ("positions", t, torch.int64),
            ("slot_mapping", t, torch.int64),
            ("sample_rows", b, torch.int64),
            ("query_start_loc", b + 1, torch.int32),
            ("seq_lens", b, torch.int32),
            ("table_updates", 2 * self.max_updates, torch.int32),
        )
        self._regions: dict[str, tuple[int, int, torch.dtype]] = {}  # name -> (offset, count, dtype)
        offset = 0
        for name, count, dtype in fields:
            self._regions[name] = (offset, count, dtype)
            offset = _align(offset + count * dtype.itemsize)
        self.nbytes = offset
        pin = device.type == "cuda"
        # The device buffer is a separate tensor on the CPU too, so the CPU runs the same pack,
        # copy and scatter as the GPU (the copy is then a memcpy).
        self._dev = torch.zeros(offset, dtype=torch.uint8, device=device)
        self._host = [torch.zeros(offset, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]  # per half: its last copy's end
        self._half = 1
        # Static device tensors (views of _dev): what the model and the CUDA graphs read.
        self.input_ids = self._view(self._dev, "input_ids")  # [T] int64
        self.positions = self._view(self._dev, "positions")  # [T] int64
        self.slot_mapping = self._view(self._dev, "slot_mapping")  # [T] int64
        self.sample_rows = self._view(self._dev, "sample_rows")  # [B] int64
        self.query_start_loc = self._view(self._dev, "query_start_loc")  # [B+1] int32
        self.seq_lens = self._view(self._dev, "seq_lens")  # [B] int32
        self._dev_updates = self._view(self._dev, "table_updates").view(-1, 2)  # [U, 2] int32
        self.block_tables = torch.zeros((b, max_blocks_per_seq), dtype=torch.int32, device=device)
        # Host mirror of the device block table, and per row how many leading columns may be nonzero.
        self.np_block_tables = np.zeros((b, max_blocks_per_seq), dtype=np.int32)
        # The same memory as memoryviews: a scalar write through one costs a fraction of numpy's.
        self._mv_block_tables = self.np_block_tables.data
        self._row_width = [0] * b
        self.num_updates = 0
        # Each half's numpy views, made once: making them per step cost ~20 µs of host time.
        self._halves = [self._host_views(host) for host in self._host]
        self.begin_step()

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        offset, count, dtype = self._regions[name]
        return buf[offset : offset + count * dtype.itemsize].view(dtype)

    def begin_step(self) -> None:
        """Switch to the other host half (waiting for its previous copy to finish reading it) and
        point the numpy views (np_input_ids, ...) at it; the step's table updates start empty."""
        self._half ^= 1
        event = self._copied[self._half]
        if event is not None:
            event.synchronize()  # two steps old: normally long done, so this does not wait
        views = self._halves[self._half]
        self.np_input_ids = views.input_ids
        self.np_positions = views.positions
        self.np_slot_mapping = views.slot_mapping
        self.np_sample_rows = views.sample_rows
        self.np_query_start_loc = views.query_start_loc
        self.np_seq_lens = views.seq_lens
        self._np_updates = views.updates
        self._mv_updates = views.mv_updates
        self.num_updates = 0

    def _host_views(self, host: torch.Tensor) -> _HostViews:
        updates = self._view(host, "table_updates").numpy().reshape(-1, 2)
        return _HostViews(
            input_ids=self._view(host, "input_ids").numpy(),
            positions=self._view(host, "positions").numpy(),
            slot_mapping=self._view(host, "slot_mapping").numpy(),
            sample_rows=self._view(host, "sample_rows").numpy(),
            query_start_loc=self._view(host, "query_start_loc").numpy(),
            seq_lens=self._view(host, "seq_lens").numpy(),
            updates=updates,
            mv_updates=updates.data,
        )

    def set_block_row(self, row: int, blocks: list[int]) -> None:
        """Row `row` of the block table becomes `blocks` (entries after them 0); only the entries
        that differ from what the device holds are queued for this step's upload."""
        self.set_block_rows([(row, blocks)])

    def set_block_rows(self, rows: Sequence[tuple[int, list[int]]]) -> None:
        """set_block_row for each (row, blocks), each row at most once: the same mirror, device
        table and set of queued updates (the order of updates can differ: one per entry, so the
        scatter does not depend on it).

        A row that only gained entries (a decode step: a request's new block) queues them in
        pure Python; rows rewritten otherwise (another request moved into the row: in a served
        batch, every row after a finished request shifts up) are diffed in one numpy pass."""
        rewritten: list[tuple[int, list[int], int]] = []
        widths, tables, mirror = self._row_width, self.np_block_tables, self._mv_block_tables
        for row, blocks in rows:
            n = len(blocks)
            width = widths[row]
            # Kept entries unchanged? The last one first: a row that another request moved into
            # differs there (even one that shares its prefix blocks), so it skips the full compare.
            if width <= n and (
                width == 0
                or (
                    mirror[row, width - 1] == blocks[width - 1]
                    and tables[row, :width].tolist() == blocks[:width]
                )
            ):
                self._append_to_row(row, blocks, width)
            else:
                rewritten.append((row, blocks, max(n, width)))
            widths[row] = n
        if rewritten:
            self._diff_rows(rewritten)

    def _append_to_row(self, row: int, blocks: list[int], width: int) -> None:
        """The first `width` entries are unchanged, so only blocks[width:] can differ. No numpy
        temporaries; the same updates, in the same order, as a diff of the row would queue."""
        mirror, upd = self._mv_block_tables, self._mv_updates
        base = row * self.np_block_tables.shape[1]
        u = self.num_updates
        for col in range(width, len(blocks)):
            block = blocks[col]
            if block != 0:  # the mirror holds 0 past `width`: an appended block 0 changes nothing
                upd[u, 0] = base + col
                upd[u, 1] = block
                mirror[row, col] = block
                u += 1
        self.num_updates = u

    def _diff_rows(self, rewritten: list[tuple[int, list[int], int]]) -> None:
        """One numpy diff of R rows against the mirror over their widest span W: (row, blocks,
        width) with width >= len(blocks) and >= the row's old width. Past either width both
        sides hold 0, so the wider span adds no update."""
        span = max(width for _, _, width in rewritten)
        padded: list[int] = []
        for _, blocks, _ in rewritten:
            padded += blocks
            padded += [0] * (span - len(blocks))
        new = np.array(padded, dtype=np.int32).reshape(len(rewritten), span)  # [R, W]
        rows = np.array([row for row, _, _ in rewritten], dtype=np.int64)  # [R]
        assert len(set(rows.tolist())) == len(rows), "set_block_rows: a row given twice"
        tables = self.np_block_tables
        r, c = np.nonzero(tables[rows, :span] != new)  # [K] each, row-major
        k = r.shape[0]
        if k:
            upd = self._np_updates[self.num_updates : self.num_updates + k]
            upd[:, 0] = rows[r] * tables.shape[1] + c
            upd[:, 1] = new[r, c]
            self.num_updates += k
            tables[rows, :span] = new

    def upload(self) -> None:
        """One copy of this step's packed inputs to the device, then the block-table scatter."""
        offset = self._regions["table_updates"][0]
        span = offset + 8 * self.num_updates  # 8 bytes per (index, id) pair
        self._dev[:span].copy_(self._host[self._half][:span], non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[self._half] = event
        if self.num_updates:
            upd = self._dev_updates[: self.num_updates]  # [K, 2] int32
            self.block_tables.view(-1).index_put_((upd[:, 0].long(),), upd[:, 1])

    def resolve_placeholders(self, num_tokens: int, prev_sampled: torch.Tensor) -> None:
        """Rows of input_ids[:num_tokens] holding -(1 + j) take prev_sampled[j] (device-side, no sync).

        prev_sampled: [S] int64 on the device, the previous step's sampled token ids."""
        ids = self.input_ids[:num_tokens]  # [T] int64
        src = (-1 - ids).clamp_min_(0)  # [T]: j on placeholder rows, 0 elsewhere
        ids.copy_(torch.where(ids < 0, prev_sampled.index_select(0, src), ids))
