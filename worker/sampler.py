"""Turns one batch of next-token logits into token ids (penalties, then greedy or temperature,
top-k/top-p/min-p) and logprobs, as one batch of device ops.

Determinism contract: a row's token depends only on its own logits, its own params, its own token
history (through the penalties, worker/penalties.py), its seed and its counter (the number of
tokens the request generated before this one). The noise is a pure function of (seed, counter,
token id) (worker/sampling_race.py), so a seeded request gets the same tokens whatever else is in
the batch, in whatever order, and again after a preemption or a KV handoff. Greedy rows
(temperature 0) take the argmax of the (penalized) logits.

One batch, one path. The per-row params (temperature, top_k, top_p, min_p, seed, counter) travel
to the device in one copy; the op sequence then depends only on the batch's shape and on a small
flag set (does any row sample, use top-k, top-p, min-p). Greedy rows ride along with neutral
filters and are resolved in the same launch. Without filters the draw is one fused kernel on a GPU
(`sampling_race.race`); with filters, one sort of the batch serves all three, then the same draw.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .host_copy import PendingCopy, to_device
from .model.fused_ops import FusedImpl
from .penalties import PenaltyBatch, apply_penalties
from .protocol import TokenLogprobs
from .sampling_params import SamplingParams
from .sampling_race import argmax_rows, race


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64, on CPU
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs == 0


@dataclass(frozen=True)
class LogprobTensors:
    """Logprobs of the R rows that ask for them, still on the device."""

    rows: list[int]  # R indices into the batch's N rows
    counts: list[int]  # per row: how many top logprobs it asked for (<= the width of top_*)
    chosen_ids: torch.Tensor  # [R] int64: the sampled token
    chosen: torch.Tensor  # [R] float32: its logprob
    top_ids: torch.Tensor  # [R, max_n] int64, highest first
    top_values: torch.Tensor  # [R, max_n] float32


@dataclass(frozen=True)
class DeviceSample:
    """One batch's sampled tokens on the logits' device, before the host has them."""

    token_ids: torch.Tensor  # [N] int64, on the device: the next step may read it directly
    logprobs: LogprobTensors | None  # None when no row asks

    def to_host(self) -> PendingSample:
        """Start the device-to-host copy (non-blocking on a GPU); PendingSample.wait() has the result."""
        lp = self.logprobs
        extra = [] if lp is None else [lp.chosen_ids, lp.chosen, lp.top_ids, lp.top_values]
        return PendingSample(self.token_ids.shape[0], lp, PendingCopy([self.token_ids, *extra]))


class PendingSample:
    """A DeviceSample on its way to the host."""

    def __init__(self, n: int, logprobs: LogprobTensors | None, copy: PendingCopy) -> None:
        self._n, self._logprobs, self._copy = n, logprobs, copy

    def wait(self) -> SamplerOutput:
        """Block until the copy landed (only this batch's copy, not later work); the host result."""
        host = self._copy.wait()
        out: list[TokenLogprobs | None] = [None] * self._n
        lp = self._logprobs
        if lp is not None:
            chosen_ids, chosen, top_ids, top_values = (t.tolist() for t in host[1:])
            for r, (i, k) in enumerate(zip(lp.rows, lp.counts, strict=True)):
                out[i] = TokenLogprobs(
                    token_id=chosen_ids[r],
                    logprob=chosen[r],
                    top=tuple(zip(top_ids[r][:k], top_values[r][:k], strict=True)),
                )
        return SamplerOutput(token_ids=host[0], logprobs=out)


@dataclass(frozen=True)
class BatchFlags:
    """Which filters a batch that samples needs, known on the host from its params: the op sequence
    depends on this and on the batch's shape only (a CUDA graph of the sampler would be captured
    per flag set). A batch with no sampled row is one argmax and uploads nothing."""

    top_k: bool  # any sampled row with 0 < top_k < V
    top_p: bool  # any sampled row with top_p < 1
    min_p: bool  # any sampled row with min_p > 0

    @property
    def filters(self) -> bool:
        return self.top_k or self.top_p or self.min_p


@dataclass(frozen=True)
class HostRows:
    """The batch's per-row params on the host, [N] numpy arrays, greedy rows and rows without a
    filter carrying its neutral value (top_k = V, top_p = 1, min_p = 0), so every row can take the
    same ops. Built with numpy rather than per-field Python loops: this is on the step's critical
    path."""

    temperature: np.ndarray  # [N] float32; 0 = greedy
    top_k: np.ndarray  # [N] int64 in [1, V]
    top_p: np.ndarray  # [N] float32 in (0, 1]
    min_p: np.ndarray  # [N] float32 in [0, 1]

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int) -> HostRows:
        n = len(params)
        temperature = np.fromiter((p.temperature for p in params), np.float32, n)
        greedy = temperature == 0
        top_k = np.fromiter((p.top_k for p in params), np.int64, n)
        top_k[greedy | (top_k <= 0) | (top_k >= vocab)] = vocab
        top_p = np.fromiter((p.top_p for p in params), np.float32, n)
        top_p[greedy] = 1.0
        min_p = np.fromiter((p.min_p for p in params), np.float32, n)
        min_p[greedy] = 0.0
        return cls(temperature, top_k, top_p, min_p)

    def flags(self, vocab: int) -> BatchFlags:
        return BatchFlags(
            top_k=bool((self.top_k < vocab).any()),
            top_p=bool((self.top_p < 1.0).any()),
            min_p=bool((self.min_p > 0.0).any()),
        )

    def upload(self, seeds: Sequence[int], counters: Sequence[int], device: torch.device) -> RowTensors:
        """The rows and their seeds and counters in one host buffer (pinned on a GPU), copied in one
        non-blocking copy. Layout (bytes): int64 [3, N] (seed, counter, top_k), then float32 [3, N]
        (temperature, top_p, min_p); both regions are aligned for their dtype."""
        n = self.temperature.shape[0]
        host = torch.empty(36 * n, dtype=torch.uint8, pin_memory=device.type == "cuda")
        buf = host.numpy()
        ints = buf[: 24 * n].view(np.int64).reshape(3, n)
        ints[0] = np.array(seeds, dtype=np.uint64).view(np.int64)  # a seed >= 2**63 reads negative
        ints[1] = counters
        ints[2] = self.top_k
        floats = buf[24 * n :].view(np.float32).reshape(3, n)
        floats[0], floats[1], floats[2] = self.temperature, self.top_p, self.min_p
        dev = host.to(device, non_blocking=True)  # on the CPU: host itself, fresh per call
        i64 = dev[: 24 * n].view(torch.int64).view(3, n)
        f32 = dev[24 * n :].view(torch.float32).view(3, n)
        return RowTensors(f32[0], i64[2], f32[1], f32[2], seed=i64[0], counter=i64[1])


@dataclass(frozen=True)
class RowTensors:
    """HostRows with each row's seed and counter, on the device: views of one uploaded buffer."""

    temperature: torch.Tensor  # [N] float32; 0 = greedy
    top_k: torch.Tensor  # [N] int64 in [1, V]; V = off
    top_p: torch.Tensor  # [N] float32 in (0, 1]; 1 = off
    min_p: torch.Tensor  # [N] float32 in [0, 1]; 0 = off
    seed: torch.Tensor  # [N] int64: the seed's 64 bits (a uint64 seed >= 2**63 reads negative)
    counter: torch.Tensor  # [N] int64: tokens the row's request generated before this one


class Sampler:
    """Holds no per-request state: the noise of a row is a function of its (seed, counter). The
    one state is the RNG that gives seeds to requests that bring none (`new_seed`), seeded from
    `seed` so that an engine's unseeded sampling is reproducible too (None: OS entropy)."""

    def __init__(self, seed: int | None = None, impl: FusedImpl = "auto") -> None:
        self._rng = random.Random(seed)
        self.impl: FusedImpl = impl

    def new_seed(self) -> int:
        """A fresh 63-bit seed (non-negative as an int64) for a request without one."""
        return self._rng.getrandbits(63)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        *,
        seeds: Sequence[int | None] | None = None,
        counters: Sequence[int] | None = None,
        penalties: PenaltyBatch | None = None,
    ) -> SamplerOutput:
        """logits: [N, V] raw next-token logits (left unmodified). seeds: each row's seed (None, or
        seeds None: the row's params.seed, else a fresh `new_seed()` for this call alone); counters:
        tokens each row's request generated before this one (None: all 0). penalties: the rows that
        have any (PenaltyState.batch), applied before greedy argmax and before temperature and the
        filters. Waits for the tokens: `sample` is the same without waiting."""
        return (
            self.sample(logits, params, seeds=seeds, counters=counters, penalties=penalties).to_host().wait()
        )

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        *,
        seeds: Sequence[int | None] | None = None,
        counters: Sequence[int] | None = None,
        penalties: PenaltyBatch | None = None,
    ) -> DeviceSample:
        """As `__call__`, but the tokens (and logprobs) stay on the logits' device: nothing here
        waits for the GPU, so the host can queue the next step before they are known."""
        n, vocab = _check_inputs(logits, params, seeds, counters)
        x = logits if penalties is None else _penalized(logits, penalties)
        if all(p.is_greedy for p in params):
            # [N]; the common all-greedy batch uploads nothing, and reads the logits in their own
            # dtype (an argmax of bf16 values is the argmax of their exact float32 copies)
            token_ids = argmax_rows(x, impl=self.impl)
        else:
            host = HostRows.of(params, vocab)
            rows = host.upload(self._seeds(params, seeds), counters or [0] * n, logits.device)
            token_ids = self._draw(x, rows, host.flags(vocab))
        return DeviceSample(token_ids.to(torch.int64), _logprob_tensors(logits, params, token_ids))

    def _seeds(self, params: Sequence[SamplingParams], seeds: Sequence[int | None] | None) -> list[int]:
        given = seeds if seeds is not None else [None] * len(params)
        out = []
        for p, s in zip(params, given, strict=True):
            if s is None:
                s = p.seed if p.seed is not None else self.new_seed()
            out.append(s)
        return out

    def _draw(self, x: torch.Tensor, rows: RowTensors, flags: BatchFlags) -> torch.Tensor:
        """[N] int64 tokens of every row: sampled rows race, greedy rows take the argmax."""
        if not flags.filters:  # the fused path: x / T and the noise never materialize on a GPU
            return race(x, rows.temperature, rows.seed, rows.counter, scaled=False, impl=self.impl)
        inv_t = 1.0 / torch.where(rows.temperature > 0, rows.temperature, 1.0)  # [N]; greedy: x * 1
        scaled = x.float() * inv_t.unsqueeze(1)  # [N, V] x / T as the fused kernel computes it; fresh
        scaled = _apply_filters(scaled, rows, flags)
        return race(scaled, rows.temperature, rows.seed, rows.counter, scaled=True, impl=self.impl)


def _check_inputs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int | None] | None,
    counters: Sequence[int] | None,
) -> tuple[int, int]:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor [N, V], got {tuple(logits.shape)} {logits.dtype}"
        )
    n, vocab = logits.shape
    for name, rows in (("params", params), ("seeds", seeds), ("counters", counters)):
        if rows is not None and len(rows) != n:
            raise ValueError(f"logits has {n} rows but {name} has {len(rows)}")
    return n, vocab


def _penalized(logits: torch.Tensor, p: PenaltyBatch) -> torch.Tensor:
    """[N, V] float32 copy of logits with p's rows penalized; the raw logits stay for the logprobs."""
    x = logits.float().clone()
    if p.rows.shape[0] == x.shape[0]:  # every row penalized: no gather / scatter
        return apply_penalties(x, p.prompt_mask, p.output_counts, p.repetition, p.presence, p.frequency)
    x[p.rows] = apply_penalties(
        x[p.rows], p.prompt_mask, p.output_counts, p.repetition, p.presence, p.frequency
    )
    return x


def _apply_filters(x: torch.Tensor, rows: RowTensors, flags: BatchFlags) -> torch.Tensor:
    """Top-k, then top-p, then min-p, each on the distribution the previous one left (the order of
    vLLM's v0 sampler and of HF generate). x: [N, V] temperature-scaled logits, overwritten; filtered
    tokens become -inf. One ascending sort serves all three filters for the whole batch; rows
    without a filter carry its neutral value (which drops at most zero-probability tokens)."""
    vocab = x.shape[1]
    sorted_x, order = torch.sort(x, dim=-1)  # [N, V] ascending: the most likely token is last
    if flags.top_k:
        kth_largest = sorted_x.gather(1, (vocab - rows.top_k).unsqueeze(1))  # [N, 1]
        # Compare by value, so tokens tied with the k-th largest all stay (as vLLM does).
        sorted_x.masked_fill_(sorted_x < kth_largest, float("-inf"))
    if flags.top_p:
        # Ascending cumsum: drop the least likely tokens while their total mass is <= 1 - top_p, i.e. keep
        # the smallest most-likely set whose mass reaches top_p. Summing from the small end keeps the tail
        # accurate, so top_p = 1 drops nothing with nonzero probability.
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        drop = cum <= (1.0 - rows.top_p).unsqueeze(1)
        drop[:, -1] = False  # the top token always survives
        sorted_x.masked_fill_(drop, float("-inf"))
    if flags.min_p:
        probs = sorted_x.softmax(dim=-1)  # [N, V]
        sorted_x.masked_fill_(probs < probs[:, -1:] * rows.min_p.unsqueeze(1), float("-inf"))
    return x.scatter_(1, order, sorted_x)


def _logprob_tensors(
    logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: torch.Tensor
) -> LogprobTensors | None:
    """Logprobs of the raw logits (before penalties, temperature and filters: vLLM v1's default),
    only for rows that ask; computed on the device, copied to the host with the tokens."""
    rows = [i for i, p in enumerate(params) if p.logprobs > 0]
    if not rows:
        return None
    index = to_device(rows, torch.int64, logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)  # [R, V]
    max_n = min(max(params[i].logprobs for i in rows), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_n, dim=-1)  # [R, max_n], sorted highest first
    chosen_ids = token_ids[index].to(torch.int64)  # [R]
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)  # [R]
    counts = [min(params[i].logprobs, max_n) for i in rows]
    return LogprobTensors(rows, counts, chosen_ids, chosen, top_ids, top_values)
