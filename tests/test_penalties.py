"""Sampling penalties (worker/penalties.py and the sampler) against a plain reference of vLLM's formula."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
import torch

from kvrelay.worker.penalties import PenaltyBatch, PenaltyState, apply_penalties, token_counts
from kvrelay.worker.request import Request
from kvrelay.worker.sampler import Sampler
from kvrelay.worker.sampling_params import SamplingParams

VOCAB = 64
CPU = torch.device("cpu")


def reference_penalize(
    logits: list[float], prompt: list[int], output: list[int], p: SamplingParams
) -> list[float]:
    """vLLM's apply_penalties, one token at a time: repetition on tokens seen in the prompt or the
    output (divide a positive logit, multiply a non-positive one), then frequency * count and
    presence * (count > 0) subtracted, counts taken over the output only."""
    counts = Counter(output)
    seen = set(prompt) | set(output)
    out = []
    for tok, x in enumerate(logits):
        if tok in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= p.frequency_penalty * counts[tok]
        x -= p.presence_penalty * (1 if counts[tok] > 0 else 0)
        out.append(x)
    return out


def _ids(rng: random.Random, n: int, pool: int = 12) -> list[int]:
    """n ids from a small pool, so repeats (counts > 1) and prompt/output overlaps are common."""
    return [rng.randrange(pool) * 5 % VOCAB for _ in range(n)]


def _request(rid: str, prompt: list[int], output: list[int], **params: float | int) -> Request:
    req = Request(rid, prompt, SamplingParams(max_tokens=64, **params))  # type: ignore[arg-type]
    req.all_token_ids += output
    return req


# One row per case: negative logits under repetition, tokens only in the prompt, negative
# presence/frequency (which reward repeats), repetition < 1, and rows without penalties.
CASES: list[dict[str, float | int]] = [
    {"repetition_penalty": 1.7},
    {"repetition_penalty": 0.6, "presence_penalty": -1.5},
    {"frequency_penalty": 2.0},
    {"frequency_penalty": -0.7, "presence_penalty": 0.4},
    {},
    {"repetition_penalty": 1.3, "presence_penalty": 2.0, "frequency_penalty": 0.5},
    {"temperature": 0.8, "seed": 11},
    {"temperature": 0.9, "seed": 12, "repetition_penalty": 2.0, "frequency_penalty": 1.0},
    {"temperature": 1.1, "seed": 13, "top_k": 9, "presence_penalty": -2.0, "logprobs": 3},
    {"repetition_penalty": 1.2, "logprobs": 2},
]


def _batch(seed: int) -> tuple[torch.Tensor, list[Request]]:
    """Random logits and one request per case whose history holds the row's likeliest tokens (so the
    penalties change the outcome): the top token in the prompt only, the 2nd twice and the 3rd once
    in the output, a negative-logit token in both, plus random repeats."""
    rng = random.Random(seed)
    logits = torch.randn(len(CASES), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3.0
    reqs = []
    for i, case in enumerate(CASES):
        order = logits[i].argsort(descending=True).tolist()
        top, neg = order[:3], order[-1]
        noise = [t for t in _ids(rng, 10) if t != top[0]]
        prompt = [top[0], neg, *noise[:4]]
        output = [top[1], neg, top[1], top[2], *noise[4:]]
        rng.shuffle(output)
        reqs.append(_request(f"r{i}", prompt, output, **case))
    return logits, reqs


def _reference_logits(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    rows = [
        reference_penalize(row, r.prompt_token_ids, r.output_token_ids, r.params)
        for row, r in zip(logits.tolist(), reqs, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32)


def _unpenalized(p: SamplingParams) -> SamplingParams:
    return dataclasses.replace(p, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)


def test_token_counts_match_counter() -> None:
    ids = [[3, 3, 7], [], [63, 0, 63, 63, 5]]
    counts = token_counts(ids, VOCAB, CPU)
    assert counts.shape == (3, VOCAB) and counts.dtype == torch.int32
    for row, expected in zip(counts.tolist(), ids, strict=True):
        assert row == [Counter(expected)[t] for t in range(VOCAB)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalized_logits_match_reference(seed: int) -> None:
    logits, reqs = _batch(seed)
    batch = PenaltyState(VOCAB, CPU).batch(reqs)
    assert batch is not None
    expected_rows = [i for i, r in enumerate(reqs) if r.params.has_penalties]
    assert batch.rows.tolist() == expected_rows
    got = apply_penalties(
        logits[batch.rows].clone(),
        batch.prompt_mask,
        batch.output_counts,
        batch.repetition,
        batch.presence,
        batch.frequency,
    )
    torch.testing.assert_close(got, _reference_logits(logits, reqs)[batch.rows])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_mixed_batch_matches_penalize_then_sample(seed: int) -> None:
    """Greedy rows: argmax of the reference logits. Sampled rows: the token the sampler draws from the
    reference-penalized logits with no penalty asked (same seed). Logprobs: the raw distribution."""
    logits, reqs = _batch(seed)
    raw = logits.clone()
    params = [r.params for r in reqs]
    out = Sampler(seed=0)(logits, params, penalties=PenaltyState(VOCAB, CPU).batch(reqs))
    assert torch.equal(logits, raw)  # the caller's logits are left as they were
    ref = _reference_logits(logits, reqs)
    for i, r in enumerate(reqs):
        if r.params.is_greedy:
            expected = int(ref[i].argmax())
        else:
            # Every sampled case is seeded: the same noise, whatever the batch.
            expected = int(Sampler(seed=0)(ref[i : i + 1], [_unpenalized(r.params)]).token_ids[0])
        assert int(out.token_ids[i]) == expected, (i, r.params)
        lp = out.logprobs[i]
        if r.params.logprobs:
            assert lp is not None
            raw_lp = raw[i].log_softmax(-1)
            assert math.isclose(lp.logprob, float(raw_lp[expected]), abs_tol=1e-5)
            assert [t for t, _ in lp.top] == raw_lp.topk(r.params.logprobs).indices.tolist()
    # The penalties change several rows' tokens here, so the equalities above are not vacuous.
    plain = Sampler(seed=0)(raw, params).token_ids.tolist()
    changed = [i for i, r in enumerate(reqs) if r.params.has_penalties and plain[i] != int(out.token_ids[i])]
    assert len(changed) >= 3


def test_seeded_penalized_row_is_independent_of_batch() -> None:
    logits, reqs = _batch(3)
    target = 7  # sampled, seeded, penalized
    alone = Sampler(seed=0)(
        logits[target : target + 1],
        [reqs[target].params],
        penalties=PenaltyState(VOCAB, CPU).batch([reqs[target]]),
    )
    order = [9, 7, 2, 4, 0]  # other rows in another order, the target second
    batch = Sampler(seed=5)(
        logits[order], [reqs[i].params for i in order],
        penalties=PenaltyState(VOCAB, CPU).batch([reqs[i] for i in order]),
    )  # fmt: skip
    assert int(batch.token_ids[1]) == int(alone.token_ids[0])


def test_batch_without_penalties_costs_nothing() -> None:
    _, reqs = _batch(0)
    state = PenaltyState(VOCAB, CPU)
    plain = [r for r in reqs if not r.params.has_penalties]
    assert state.batch(plain) is None
    assert state.capacity == 0 and state.num_slots == 0


def _check_state(batch: PenaltyBatch | None, reqs: list[Request]) -> None:
    rows = [i for i, r in enumerate(reqs) if r.params.has_penalties]
    assert batch is not None and batch.rows.tolist() == rows
    for j, i in enumerate(rows):
        counts = Counter(reqs[i].output_token_ids)
        assert batch.output_counts[j].tolist() == [counts[t] for t in range(VOCAB)]
        assert batch.prompt_mask[j].tolist() == [t in reqs[i].prompt_token_ids for t in range(VOCAB)]


def test_state_counts_stay_exact_across_steps_preemption_and_reuse() -> None:
    """Counts are kept incrementally; a request that skips steps (preempted) catches up, a request
    that arrives with output already (a handed-off first token) starts counted, slots are reused."""
    rng = random.Random(4)
    state = PenaltyState(VOCAB, CPU)
    live = [_request(f"a{i}", _ids(rng, 5), [], frequency_penalty=1.0 + 0.1 * i) for i in range(3)] + [
        _request("plain", _ids(rng, 4), [])
    ]
    live.append(_request("handed-off", _ids(rng, 6), [17], repetition_penalty=1.3))
    next_id = 0
    for step in range(12):
        scheduled = [r for j, r in enumerate(live) if (step + j) % 4 != 0]  # each sits out now and then
        _check_state(state.batch(scheduled), scheduled)
        for r in scheduled:
            r.all_token_ids.append(_ids(rng, 1)[0])
        if step % 3 == 2:  # one finishes, a new one (more than the first slab holds) arrives
            state.release(live.pop(0).request_id)
            live += [_request(f"n{next_id + k}", _ids(rng, 3), [], presence_penalty=0.5) for k in range(2)]
            next_id += 2
    _check_state(state.batch(live), live)
    assert state.num_slots == sum(r.params.has_penalties for r in live)
    assert state.capacity >= 8  # grew past the first slab
    for r in live:
        state.release(r.request_id)
    assert state.num_slots == 0 and state.capacity == 0  # the memory went back


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_penalized_sampler_on_cuda_matches_cpu_reference(seed: int) -> None:
    cuda = torch.device("cuda")
    logits, reqs = _batch(seed)
    greedy = [i for i, r in enumerate(reqs) if r.params.is_greedy]
    state = PenaltyState(VOCAB, cuda)
    batch = state.batch(reqs)
    assert batch is not None and batch.output_counts.device.type == "cuda"
    out = Sampler(seed=0)(logits.to(cuda), [r.params for r in reqs], penalties=batch)
    ref = _reference_logits(logits, reqs)
    got = apply_penalties(
        logits.to(cuda)[batch.rows],
        batch.prompt_mask,
        batch.output_counts,
        batch.repetition,
        batch.presence,
        batch.frequency,
    )
    torch.testing.assert_close(got.cpu(), ref[batch.rows.cpu()])
    assert [int(out.token_ids[i]) for i in greedy] == [int(ref[i].argmax()) for i in greedy]
    # The noise is a function of (seed, counter, token), the same on both devices: sampled rows too
    # match the CPU path (the fused kernel against the torch one, up to float near-ties: none here).
    on_cpu = Sampler(seed=0)(logits, [r.params for r in reqs], penalties=PenaltyState(VOCAB, CPU).batch(reqs))
    assert out.token_ids.tolist() == on_cpu.token_ids.tolist()
