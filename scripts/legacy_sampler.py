"""The sampler as it was before counter-based noise (commit 8e7e101's worker/sampler.py), kept
only so scripts/bench_sampler.py can time old and new side by side in one run. Not used by kvrelay.

Turns one batch of next-token logits into token ids (penalties, then greedy or temperature,
top-k/top-p/min-p) and logprobs.

Determinism contract: a row's token depends only on its own logits, its own params, its own token
history (through the penalties, worker/penalties.py) and the state of its own generator. Every sampled row draws exactly V exponentials per step from its generator (seeded rows
from the request's, unseeded rows from a sampler-owned one) and picks `argmax(probs / q)` (the exponential
race, equivalent to drawing from `probs`), so a seeded request gets the same tokens whatever else is in
the batch and in whatever order. Greedy rows draw nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrelay.worker.host_copy import PendingCopy, to_device
from kvrelay.worker.penalties import PenaltyBatch, apply_penalties
from kvrelay.worker.protocol import TokenLogprobs
from kvrelay.worker.sampling_params import SamplingParams


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


class Sampler:
    """Stateless apart from the default generators used for unseeded rows (one per device)."""

    def __init__(self, seed: int | None = None) -> None:
        # seed=None: the default generators are seeded from the OS entropy source.
        self._seed = seed
        self._default_generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        penalties: PenaltyBatch | None = None,
    ) -> SamplerOutput:
        """logits: [N, V] raw next-token logits (left unmodified); penalties: the rows that have any
        (PenaltyState.batch), applied before greedy argmax and before temperature and the filters.
        Waits for the tokens: `sample` is the same without waiting."""
        return self.sample(logits, params, generators, penalties).to_host().wait()

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        penalties: PenaltyBatch | None = None,
    ) -> DeviceSample:
        """As `__call__`, but the tokens (and logprobs) stay on the logits' device: nothing here
        waits for the GPU, so the host can queue the next step before they are known."""
        n, _ = _check_inputs(logits, params, generators)
        x = logits if penalties is None else _penalized(logits, penalties)
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(sampled_rows) == n:
            token_ids = self._sample(x, params, generators)
        else:
            token_ids = x.argmax(dim=-1)  # [N]; the common all-greedy batch stops here
            if sampled_rows:
                rows = to_device(sampled_rows, torch.int64, logits.device)
                token_ids[rows] = self._sample(
                    x[rows], [params[i] for i in sampled_rows], [generators[i] for i in sampled_rows]
                )
        return DeviceSample(token_ids.to(torch.int64), _logprob_tensors(logits, params, token_ids))

    def _sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """logits: [M, V] rows that all sample (temperature > 0). Returns [M] token ids on logits.device."""
        temps = to_device([p.temperature for p in params], torch.float32, logits.device)
        x = logits.float() / temps.unsqueeze(1)  # [M, V], a fresh tensor the filters may overwrite
        x = _apply_filters(x, params)
        probs = x.softmax(dim=-1)  # [M, V]; filtered tokens are exp(-inf) = exactly 0
        q = self._exponential_noise(probs, generators)
        return probs.div_(q).argmax(dim=-1)

    def _exponential_noise(
        self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """[M, V] Exp(1) noise; row i comes from generators[i] (or the default generator when None)."""
        q = torch.empty_like(probs)
        default = self._default_generator(probs.device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == len(generators):
            q.exponential_(generator=default)
        else:
            if unseeded:
                rows = to_device(unseeded, torch.int64, probs.device)
                noise = torch.empty((len(unseeded), probs.shape[1]), device=probs.device)
                q[rows] = noise.exponential_(generator=default)
            for i, g in enumerate(generators):
                if g is None:
                    continue
                if g.device == q.device:
                    q[i].exponential_(generator=g)
                else:  # generators are device-bound: draw where the generator lives, then move
                    q[i] = torch.empty(probs.shape[1], device=g.device).exponential_(generator=g)
        # exponential_ may return exactly 0; 0/0 would be NaN, which argmax prefers over every real
        # value and could pick a filtered-out token.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    def _default_generator(self, device: torch.device) -> torch.Generator:
        g = self._default_generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(self._seed)
            self._default_generators[device] = g
        return g


def _check_inputs(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> tuple[int, int]:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor [N, V], got {tuple(logits.shape)} {logits.dtype}"
        )
    n, vocab = logits.shape
    if len(params) != n or len(generators) != n:
        raise ValueError(f"logits has {n} rows but got {len(params)} params and {len(generators)} generators")
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


def _apply_filters(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then min-p, each on the distribution the previous one left (the order of
    vLLM's v0 sampler and of HF generate). x: [M, V] temperature-scaled logits, overwritten; filtered
    tokens become -inf. One ascending sort serves all three filters for the whole batch."""
    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    need_k = any(k < vocab for k in top_k)
    need_p = any(p.top_p < 1.0 for p in params)
    need_min_p = any(p.min_p > 0.0 for p in params)
    if not (need_k or need_p or need_min_p):
        return x
    device = x.device
    sorted_x, order = torch.sort(x, dim=-1)  # [M, V] ascending: the most likely token is last
    if need_k:
        k = to_device(top_k, torch.int64, device)
        kth_largest = sorted_x.gather(1, (vocab - k).unsqueeze(1))  # [M, 1]
        # Compare by value, so tokens tied with the k-th largest all stay (as vLLM does).
        sorted_x.masked_fill_(sorted_x < kth_largest, float("-inf"))
    if need_p:
        top_p = to_device([p.top_p for p in params], torch.float32, device)
        # Ascending cumsum: drop the least likely tokens while their total mass is <= 1 - top_p, i.e. keep
        # the smallest most-likely set whose mass reaches top_p. Summing from the small end keeps the tail
        # accurate, so top_p = 1 drops nothing with nonzero probability.
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # [M, V]
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the top token always survives
        sorted_x.masked_fill_(drop, float("-inf"))
    if need_min_p:
        min_p = to_device([p.min_p for p in params], torch.float32, device)
        probs = sorted_x.softmax(dim=-1)  # [M, V]
        sorted_x.masked_fill_(probs < probs[:, -1:] * min_p.unsqueeze(1), float("-inf"))
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
