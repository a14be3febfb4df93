from __future__ import annotations

import math

import pytest
import torch

from kvrelay.worker.sampler import Sampler
from kvrelay.worker.sampling_params import SamplingParams

# Distinct, well-spread logits for a vocab of 8: no filter threshold lands near a tie (checked by
# _reference_probs), so float32 and the float64 reference pick the same allowed set.
SMALL_LOGITS = [2.0, 1.5, 1.1, 0.6, 0.0, -0.7, -1.3, -3.0]


def _params(**kw: float | int | None) -> SamplingParams:
    return SamplingParams(**kw)  # type: ignore[arg-type]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(n, vocab, generator=_gen(seed)) * 3.0


def _reference_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """The filtered, renormalized distribution in float64, written independently of the sampler:
    temperature, then top-k, then top-p (smallest most-likely set with mass >= top_p), then min-p."""
    z = [x / p.temperature for x in logits]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    keep = set(range(len(z)))
    by_prob = sorted(keep, key=lambda i: -z[i])
    if 0 < p.top_k < len(z):
        keep = set(by_prob[: p.top_k])

    def renorm() -> dict[int, float]:
        total = sum(w[i] for i in keep)
        return {i: w[i] / total for i in keep}

    if p.top_p < 1.0:
        probs, mass, nucleus = renorm(), 0.0, set()
        for i in (i for i in by_prob if i in keep):
            nucleus.add(i)
            mass += probs[i]
            if mass >= p.top_p:
                assert mass - p.top_p > 1e-4, "test logits put top_p on a boundary"
                break
            assert p.top_p - mass > 1e-4, "test logits put top_p on a boundary"
        keep = nucleus
    if p.min_p > 0.0:
        probs = renorm()
        threshold = p.min_p * max(probs.values())
        assert all(abs(q - threshold) > 1e-4 for q in probs.values()), "min_p on a boundary"
        keep = {i for i in keep if probs[i] >= threshold}
    final = renorm()
    return [final.get(i, 0.0) for i in range(len(z))]


def test_greedy_is_argmax_and_draws_no_noise() -> None:
    logits = _random_logits(6, 50, seed=0)
    gens = [_gen(i) for i in range(6)]
    states = [g.get_state().clone() for g in gens]
    out = Sampler(seed=0)(logits, [_params()] * 6, gens)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == "cpu"
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states, strict=True))


def test_filters_skipped_when_no_row_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_sort = torch.sort

    def spy_sort(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_sort(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "sort", spy_sort)
    logits = _random_logits(4, 30, seed=1)
    sampler = Sampler(seed=0)
    sampler(logits, [_params()] * 4, [None] * 4)
    sampler(logits, [_params(temperature=0.8)] * 4, [None] * 4)
    assert calls == []
    sampler(
        logits,
        [_params(temperature=0.8), _params(temperature=0.8, top_k=3), _params(), _params()],
        [None] * 4,
    )
    assert calls == [1]  # one sort for the whole batch


def test_seeded_row_independent_of_batch_composition_and_order() -> None:
    vocab, steps = 64, 4
    target = _params(temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    target_logits = _random_logits(steps, vocab, seed=7)  # one row of logits per step

    def run_alone() -> list[int]:
        g, sampler = _gen(1234), Sampler(seed=0)
        return [int(sampler(target_logits[s : s + 1], [target], [g]).token_ids[0]) for s in range(steps)]

    def run_in_batch(position: int, seed: int) -> list[int]:
        g, sampler = _gen(1234), Sampler(seed=seed)
        others = [_params(temperature=0.7, min_p=0.05), _params(), _params(temperature=1.3, top_k=5)]
        other_params = [others[i % 3] for i in range(5)]
        other_gens = [None, _gen(99), None, _gen(5), None]
        tokens = []
        for s in range(steps):
            logits = _random_logits(5, vocab, seed=100 * seed + s)
            logits = torch.cat([logits[:position], target_logits[s : s + 1], logits[position:]])
            params = [*other_params[:position], target, *other_params[position:]]
            gens = [*other_gens[:position], g, *other_gens[position:]]
            tokens.append(int(sampler(logits, params, gens).token_ids[position]))
        return tokens

    alone = run_alone()
    assert len(set(alone)) > 1  # the draw really is random, so equality below means something
    assert run_in_batch(0, seed=1) == alone
    assert run_in_batch(3, seed=2) == alone
    assert run_in_batch(5, seed=3) == alone


def test_seeded_row_draws_exactly_vocab_exponentials_per_step() -> None:
    vocab = 37
    g, expected = _gen(42), _gen(42)
    Sampler()(_random_logits(1, vocab, seed=3), [_params(temperature=0.9, seed=42)], [g])
    torch.empty(vocab).exponential_(generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())


@pytest.mark.parametrize(
    "params",
    [
        _params(temperature=0.7),
        _params(temperature=1.0, top_k=3),
        _params(temperature=1.0, top_p=0.8),
        _params(temperature=1.0, top_p=0.3),  # the top token alone already reaches top_p
        _params(temperature=1.5, min_p=0.2),
        _params(temperature=0.9, top_k=6, top_p=0.75, min_p=0.1),
    ],
)
def test_empirical_distribution_matches_reference(params: SamplingParams) -> None:
    draws = 20000
    reference = _reference_probs(SMALL_LOGITS, params)
    logits = torch.tensor([SMALL_LOGITS] * draws)
    tokens = Sampler(seed=0)(logits, [params] * draws, [None] * draws).token_ids
    counts = torch.bincount(tokens, minlength=len(SMALL_LOGITS)).tolist()
    for token, (count, p) in enumerate(zip(counts, reference, strict=True)):
        if p == 0.0:
            assert count == 0, f"token {token} is filtered out but was drawn {count} times"
            continue
        # The frequency of one token has std sqrt(p(1-p)/n) <= 0.0036 at n=20000; 5 std over 8 tokens
        # fails a correct sampler with probability < 1e-5 (and the seed is fixed).
        bound = 5 * math.sqrt(p * (1 - p) / draws)
        assert abs(count / draws - p) <= bound, (token, count / draws, p)


def test_mixed_params_in_one_batch_each_match_their_reference() -> None:
    """Per-row k/p/min-p tensors: four configurations interleaved row by row share one sort."""
    configs = [
        _params(temperature=1.0, top_k=2),
        _params(temperature=1.0, top_p=0.6),
        _params(temperature=1.2, min_p=0.3),
        _params(temperature=0.8),
    ]
    per_config = 5000
    n = per_config * len(configs)
    params = [configs[i % len(configs)] for i in range(n)]
    tokens = Sampler(seed=1)(torch.tensor([SMALL_LOGITS] * n), params, [None] * n).token_ids
    for c, config in enumerate(configs):
        reference = _reference_probs(SMALL_LOGITS, config)
        counts = torch.bincount(tokens[c :: len(configs)], minlength=len(SMALL_LOGITS)).tolist()
        for count, p in zip(counts, reference, strict=True):
            assert (
                (count == 0)
                if p == 0.0
                else abs(count / per_config - p) < 5 * math.sqrt(p * (1 - p) / per_config)
            )


def test_filters_never_emit_outside_allowed_set_large_vocab() -> None:
    n, vocab = 256, 1000
    logits = _random_logits(n, vocab, seed=11)
    params = [
        [
            _params(temperature=2.0, top_k=5),
            _params(temperature=3.0, top_p=0.3),
            _params(temperature=3.0, min_p=0.5),
        ][i % 3]
        for i in range(n)
    ]
    tokens = Sampler(seed=2)(logits, params, [None] * n).token_ids.tolist()
    probs = logits.double().softmax(dim=-1)
    for i, (p, t) in enumerate(zip(params, tokens, strict=True)):
        row = (logits[i].double() / p.temperature).softmax(dim=-1)
        if p.top_k:
            assert t in row.topk(p.top_k).indices.tolist()
        elif p.top_p < 1.0:
            # t must be in the smallest most-likely set reaching top_p: the mass strictly above it is < top_p.
            assert row[row > row[t]].sum().item() < p.top_p
        else:
            assert row[t].item() >= p.min_p * row.max().item()
        assert probs[i, t] > 0


def test_logprobs_match_log_softmax_of_raw_logits() -> None:
    logits = _random_logits(4, 40, seed=5)
    params = [
        _params(logprobs=3),
        _params(temperature=0.8, top_k=4, logprobs=5, seed=3),
        _params(temperature=0.8),
        _params(logprobs=1),
    ]
    out = Sampler(seed=0)(logits, params, [None, _gen(3), None, None])
    reference = logits.double().log_softmax(dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None
        token = int(out.token_ids[i])
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(reference[i, token].item(), abs=1e-5)
        ref_values, ref_ids = reference[i].topk(params[i].logprobs)
        assert [t for t, _ in lp.top] == ref_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref_values.tolist(), abs=1e-5)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.logprobs[0] is not None and out.logprobs[0].token_id == int(logits[0].argmax())


def test_batch_mixing_greedy_and_sampled_rows() -> None:
    logits = _random_logits(6, 30, seed=9)
    params = [_params(), _params(temperature=1.0, top_k=1), _params(), _params(temperature=1.0, seed=4)] + [
        _params(temperature=0.5, top_p=0.5)
    ] * 2
    gens = [None, None, None, _gen(4), None, None]
    tokens = Sampler(seed=0)(logits, params, gens).token_ids.tolist()
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    assert tokens[1] == argmax[1]  # top_k=1 leaves only the argmax
    alone = Sampler(seed=7)(logits[3:4], [params[3]], [_gen(4)]).token_ids.item()
    assert tokens[3] == alone


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="3 rows"):
        Sampler()(torch.zeros(3, 5), [_params()] * 2, [None] * 3)
    with pytest.raises(ValueError, match="2-D"):
        Sampler()(torch.zeros(5), [_params()], [None])
