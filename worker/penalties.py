"""Repetition, presence and frequency penalties with vLLM's semantics, batched on the device.

For a row with prompt mask `m` ([V] bool: the token occurs in the prompt) and output counts `c`
([V] int: occurrences in the output so far):

    seen  = m | (c > 0)
    x     = where(seen, where(x > 0, x / repetition, x * repetition), x)
    x    -= frequency * c
    x    -= presence * (c > 0)

(`vllm/model_executor/layers/utils.py::apply_penalties`.) Only rows that ask for a penalty are
touched; the common batch without penalties costs nothing here (no kernel, no host-to-device copy).

The counts live on the device between steps (`PenaltyState`, one row per penalized request, the
form vLLM v1's GPU worker keeps too), so a decode step adds only the one new token per row
instead of rebuilding counts from every output token so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .host_copy import to_device
from .request import Request


@dataclass(frozen=True)
class PenaltyBatch:
    """The penalized rows of one sampler batch; P rows of its N, all tensors on the logits' device."""

    rows: torch.Tensor  # [P] int64 indices into the sampler's N rows, ascending
    prompt_mask: torch.Tensor  # [P, V] bool: the token occurs in the prompt
    output_counts: torch.Tensor  # [P, V] int32: occurrences in the output so far
    repetition: torch.Tensor  # [P, 1] float32, > 0 (1 = off)
    presence: torch.Tensor  # [P, 1] float32
    frequency: torch.Tensor  # [P, 1] float32


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """logits: [P, V] float, overwritten and returned; the other arguments as in PenaltyBatch."""
    output_mask = output_counts > 0  # [P, V]
    scale = torch.where(prompt_mask | output_mask, repetition, 1.0)  # [P, V]
    # Dividing (not multiplying by 1 / penalty) is vLLM v0's and transformers' arithmetic, exact
    # for penalty 1; a zero logit stays zero either way.
    logits.copy_(torch.where(logits > 0, logits / scale, logits * scale))
    logits.sub_(frequency * output_counts)
    logits.sub_(presence * output_mask)
    return logits


def token_counts(ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] int32 occurrence counts of each row's ids: one scatter_add_ over a padded [B, L] tensor.

    Padding uses the id `vocab_size` (no real token), counted in an extra column that is dropped.
    """
    width = max((len(row) for row in ids), default=0)
    padded = torch.full((len(ids), width), vocab_size, dtype=torch.int64)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    padded = padded.to(device)
    counts = torch.zeros((len(ids), vocab_size + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


@dataclass
class _Slot:
    index: int  # row of PenaltyState's slabs
    num_counted: int  # output tokens already added to the row's counts


class PenaltyState:
    """Prompt masks and output-token counts of the live penalized requests, on the device.

    Invariant: for every request with a slot, `counts[slot] == bincount(output_token_ids[:num_counted])`
    and `prompt[slot]` marks its prompt ids. `batch()` first adds the output tokens appended since the
    last call (one per row after a decode step; all of them for a request seen for the first time,
    e.g. a decode worker's request whose first token came from the prefill worker). Counts depend on
    the request's token ids only, never on its KV, so preemption (recompute) and prefix-cache hits
    leave them right. Slabs are allocated at the first penalized request, grow by doubling, and are
    freed when the last one finishes: an engine that never sees penalties holds no memory for them.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)  # [C, V]
        self._prompt = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)  # [C, V]
        self._slots: dict[str, _Slot] = {}
        self._free: list[int] = []

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def capacity(self) -> int:
        return self._counts.shape[0]

    def batch(self, requests: Sequence[Request], pending: torch.Tensor | None = None) -> PenaltyBatch | None:
        """The penalized rows among `requests` (the sampler's rows, in order); None when there are none.

        pending: [S] int64 on the device, the previous step's sampled tokens, when a request's last
        output token is still a placeholder -(1 + j) on the host (overlapped scheduling,
        worker/overlap.py): its count is added on the device from pending[j], with no sync."""
        rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
        if not rows:
            return None
        vocab = self.vocab_size
        slots: list[int] = []
        opened: list[int] = []  # new slots, zeroed before use
        prompt_flat: list[int] = []  # slot * V + token: prompt bits to set
        output_flat: list[int] = []  # slot * V + token: output counts to add
        pending_base: list[int] = []  # slot * V of a placeholder token's count ...
        pending_src: list[int] = []  # ... and its row in `pending`
        for i in rows:
            req = requests[i]
            slot = self._slots.get(req.request_id)
            if slot is None:
                slot = self._open(req.request_id)
                opened.append(slot.index)
                prompt_flat += [slot.index * vocab + t for t in req.prompt_token_ids]
            done = req.num_output_tokens
            if slot.num_counted > done:
                raise RuntimeError(
                    f"request {req.request_id}: {slot.num_counted} output tokens counted but only {done} exist"
                )
            start = req.num_prompt_tokens + slot.num_counted
            for t in req.all_token_ids[start:]:
                if t >= 0:
                    output_flat.append(slot.index * vocab + t)
                else:  # a placeholder: the token is pending[-1 - t], on the device
                    pending_base.append(slot.index * vocab)
                    pending_src.append(-1 - t)
            slot.num_counted = done
            slots.append(slot.index)
        # One host-to-device copy for every index of this step (and one for the penalty values).
        sizes = [len(rows), len(slots), len(opened), len(prompt_flat), len(output_flat)]
        sizes += [len(pending_base), len(pending_src)]
        packed = to_device(
            rows + slots + opened + prompt_flat + output_flat + pending_base + pending_src,
            torch.int64,
            self.device,
        )
        row_t, slot_t, opened_t, prompt_t, output_t, base_t, src_t = packed.split(sizes)
        if pending_src:
            if pending is None:
                raise RuntimeError(
                    "a penalized request's token is a placeholder but no pending tokens were given"
                )
            output_t = torch.cat([output_t, base_t + pending.index_select(0, src_t)])
        if opened:
            self._counts[opened_t] = 0
            self._prompt[opened_t] = False
        if prompt_flat:
            self._prompt.view(-1)[prompt_t] = True
        if output_t.numel():
            # int32 atomics are exact, so the result does not depend on the order of the adds.
            self._counts.view(-1).index_add_(0, output_t, torch.ones_like(output_t, dtype=torch.int32))
        penalized = [requests[i].params for i in rows]
        values = to_device(
            [p.repetition_penalty for p in penalized]
            + [p.presence_penalty for p in penalized]
            + [p.frequency_penalty for p in penalized],
            torch.float32,
            self.device,
        ).view(3, -1, 1)  # [3, P, 1]
        return PenaltyBatch(
            rows=row_t,
            prompt_mask=self._prompt[slot_t],
            output_counts=self._counts[slot_t],
            repetition=values[0],
            presence=values[1],
            frequency=values[2],
        )

    def release(self, request_id: str) -> None:
        """The request finished (or was aborted): its slot is free; no-op if it never had one."""
        slot = self._slots.pop(request_id, None)
        if slot is None:
            return
        self._free.append(slot.index)
        if not self._slots:  # the last penalized request left: give the memory back
            self._counts = self._counts[:0].clone()
            self._prompt = self._prompt[:0].clone()
            self._free.clear()

    def _open(self, request_id: str) -> _Slot:
        if not self._free:
            self._grow(max(4, 2 * self.capacity))
        slot = _Slot(index=self._free.pop(), num_counted=0)
        self._slots[request_id] = slot
        return slot

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        counts = torch.zeros((capacity, self.vocab_size), dtype=torch.int32, device=self.device)
        prompt = torch.zeros((capacity, self.vocab_size), dtype=torch.bool, device=self.device)
        counts[:old] = self._counts
        prompt[:old] = self._prompt
        self._counts, self._prompt = counts, prompt
        # Popped from the end: the lowest new index first.
        self._free.extend(range(capacity - 1, old - 1, -1))
