"""The sampler (worker/sampler.py, worker/sampling_race.py) on the CPU: its counter-based noise
against a plain-integer splitmix64, its distributions against float64 references, and the
determinism contract. The Triton kernel against this path: tests/test_sampling_race.py."""

from __future__ import annotations

import math

import pytest
import torch

from kvrelay.worker.sampler import Sampler
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.sampling_race import race_torch, uniform_noise

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15

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


def _mix64_ref(z: int) -> int:
    """splitmix64's finalizer on plain Python integers (unbounded, so shifts are logical and every
    product is reduced mod 2**64 explicitly): independent of the int64 tensor code it checks."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _uniform_ref(seed: int, counter: int, token: int) -> float:
    key = _mix64_ref((_mix64_ref(seed) + counter * GAMMA) & MASK64)
    h = _mix64_ref((key + (token + 1) * GAMMA) & MASK64)
    return ((h >> 41) + 0.5) / 2**23


def _ints(values: list[int]) -> torch.Tensor:
    """uint64 values as the int64 tensor that holds their bits."""
    return torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)


def test_mix64_is_splitmix64() -> None:
    # Vigna's splitmix64.c from state 1234567: output k is mix64(state + k * GAMMA).
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert [_mix64_ref((1234567 + k * GAMMA) & MASK64) for k in (1, 2, 3)] == expected


def test_uniform_noise_is_bit_identical_to_plain_integer_splitmix() -> None:
    seeds = [0, 1, 42, 2**63 - 1, 2**63, 2**64 - 1, 0xDEADBEEFCAFEF00D]
    counters = [0, 7, 1, 4095, 3, 0, 2**40]
    vocab = 300
    got = uniform_noise(_ints(seeds), torch.tensor(counters), vocab)
    assert got.dtype == torch.float32 and got.shape == (len(seeds), vocab)
    expected = torch.tensor(
        [[_uniform_ref(s, c, v) for v in range(vocab)] for s, c in zip(seeds, counters, strict=True)],
        dtype=torch.float64,
    )
    assert torch.equal(got.double(), expected)  # the float mapping is exact: no rounding anywhere
    assert got.min().item() > 0.0 and got.max().item() < 1.0


def test_race_picks_argmax_of_gumbel_perturbed_logits_in_float64() -> None:
    """race_torch against the Gumbel-max rule written out in float64 from the reference noise."""
    n, vocab = 24, 50
    logits = _random_logits(n, vocab, seed=21)
    temps = torch.tensor([0.0 if i % 5 == 0 else 0.3 + 0.1 * i for i in range(n)])
    seeds, counters = [1000 + 7 * i for i in range(n)], [i % 4 for i in range(n)]
    got = race_torch(logits, temps, _ints(seeds), torch.tensor(counters), scaled=False).tolist()
    for i in range(n):
        if temps[i] == 0:
            assert got[i] == int(logits[i].argmax())
            continue
        u = torch.tensor([_uniform_ref(seeds[i], counters[i], v) for v in range(vocab)], dtype=torch.float64)
        score = logits[i].double() / float(temps[i]) - torch.log(-torch.log(u))
        top2 = score.topk(2).values
        assert top2[0] - top2[1] > 1e-4  # no near-tie, so float32 and float64 must agree
        assert got[i] == int(score.argmax()), i


def test_greedy_is_argmax_with_or_without_sampled_rows() -> None:
    logits = _random_logits(6, 50, seed=0)
    out = Sampler(seed=0)(logits, [_params()] * 6)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == "cpu"
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    # The same greedy rows in a batch that samples (with and without filters) keep their argmax.
    for other in (_params(temperature=1.5), _params(temperature=1.5, top_p=0.5, min_p=0.1)):
        mixed = Sampler(seed=0)(logits, [_params(), other] * 3).token_ids.tolist()
        assert mixed[0::2] == logits[0::2].argmax(dim=-1).tolist()


def test_filters_skipped_when_no_row_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_sort = torch.sort

    def spy_sort(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_sort(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "sort", spy_sort)
    logits = _random_logits(4, 30, seed=1)
    sampler = Sampler(seed=0)
    sampler(logits, [_params()] * 4)
    sampler(logits, [_params(temperature=0.8)] * 4)
    sampler(logits, [_params(temperature=0.8), _params(top_k=3), _params(top_p=0.5), _params()])
    assert calls == []  # greedy rows' filters are ignored
    sampler(logits, [_params(temperature=0.8), _params(temperature=0.8, top_k=3), _params(), _params()])
    assert calls == [1]  # one sort for the whole batch


def test_seeded_row_independent_of_batch_composition_and_order() -> None:
    vocab, steps = 64, 4
    target = _params(temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    target_logits = _random_logits(steps, vocab, seed=7)  # one row of logits per step

    def run_alone() -> list[int]:
        sampler = Sampler(seed=0)
        return [
            int(sampler(target_logits[s : s + 1], [target], counters=[s]).token_ids[0]) for s in range(steps)
        ]

    def run_in_batch(position: int, seed: int) -> list[int]:
        sampler = Sampler(seed=seed)
        others = [_params(temperature=0.7, min_p=0.05), _params(), _params(temperature=1.3, top_k=5)]
        other_params = [others[i % 3] for i in range(5)]
        other_seeds = [None, 99, None, 5, 1234]  # the last: the same seed at another counter
        tokens = []
        for s in range(steps):
            logits = _random_logits(5, vocab, seed=100 * seed + s)
            logits = torch.cat([logits[:position], target_logits[s : s + 1], logits[position:]])
            params = [*other_params[:position], target, *other_params[position:]]
            seeds = [*other_seeds[:position], None, *other_seeds[position:]]
            counters = [3 * s + i for i in range(6)]
            counters[position] = s
            tokens.append(int(sampler(logits, params, seeds=seeds, counters=counters).token_ids[position]))
        return tokens

    alone = run_alone()
    assert len(set(alone)) > 1  # the draw really is random, so equality below means something
    assert run_in_batch(0, seed=1) == alone
    assert run_in_batch(3, seed=2) == alone
    assert run_in_batch(5, seed=3) == alone


def test_noise_depends_on_seed_and_counter_only() -> None:
    """Same (seed, counter): the same token, from a fresh sampler; another counter or seed: another
    draw. seeds= overrides params.seed (the engine passes the seed it holds for the request)."""
    vocab = 1000
    logits = torch.zeros(1, vocab)  # uniform: the token is the argmax of the noise alone
    p = _params(temperature=1.0, seed=77)

    def draw(sampler: Sampler, **kw: object) -> int:
        return int(sampler(logits, [p], **kw).token_ids[0])  # type: ignore[arg-type]

    first = [draw(Sampler(seed=s), counters=[c]) for s, c in ((0, 0), (1, 0), (2, 3), (3, 3))]
    assert first[0] == first[1] and first[2] == first[3]
    assert first[0] != first[2]
    assert draw(Sampler(), seeds=[77], counters=[3]) == first[2]
    assert draw(Sampler(), seeds=[78], counters=[3]) != first[2]
    u = torch.tensor([_uniform_ref(77, 3, v) for v in range(vocab)])
    assert first[2] == int(u.argmax())


def test_unseeded_rows_draw_fresh_seeds_from_the_sampler_rng() -> None:
    logits = torch.zeros(8, 1000)
    params = [_params(temperature=1.0)] * 8
    a = Sampler(seed=5)(logits, params).token_ids.tolist()
    assert Sampler(seed=5)(logits, params).token_ids.tolist() == a  # reproducible from the sampler seed
    assert Sampler(seed=6)(logits, params).token_ids.tolist() != a
    assert len(set(a)) == 8  # rows of one batch get independent seeds
    seeds = [Sampler(seed=9).new_seed() for _ in range(2)]
    assert seeds[0] == seeds[1] and 0 <= seeds[0] < 2**63
    sampler = Sampler(seed=9)
    assert sampler.new_seed() != sampler.new_seed()


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
@pytest.mark.parametrize("stream", ["many-seeds", "one-seed-many-counters"])
def test_empirical_distribution_matches_reference(params: SamplingParams, stream: str) -> None:
    """Rows with fresh seeds (unseeded requests), or one seed over 20000 steps (one request's
    stream): both must be independent draws from the filtered distribution."""
    draws = 20000
    reference = _reference_probs(SMALL_LOGITS, params)
    logits = torch.tensor([SMALL_LOGITS] * draws)
    if stream == "many-seeds":
        tokens = Sampler(seed=0)(logits, [params] * draws).token_ids
    else:
        tokens = Sampler()(logits, [params] * draws, seeds=[31337] * draws, counters=range(draws)).token_ids
    counts = torch.bincount(tokens, minlength=len(SMALL_LOGITS)).tolist()
    chi2 = 0.0
    for token, (count, p) in enumerate(zip(counts, reference, strict=True)):
        if p == 0.0:
            assert count == 0, f"token {token} is filtered out but was drawn {count} times"
            continue
        # The frequency of one token has std sqrt(p(1-p)/n) <= 0.0036 at n=20000; 5 std over 8 tokens
        # fails a correct sampler with probability < 1e-5 (and the seed is fixed).
        bound = 5 * math.sqrt(p * (1 - p) / draws)
        assert abs(count / draws - p) <= bound, (token, count / draws, p)
        chi2 += (count - draws * p) ** 2 / (draws * p)
    # Pearson's statistic over the k allowed tokens has k - 1 <= 7 degrees of freedom: P(chi2 > 30)
    # < 1e-4 for a correct sampler, while a 2% bias on one token at n=20000 already scores > 30.
    assert chi2 < 30.0, chi2


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
    tokens = Sampler(seed=1)(torch.tensor([SMALL_LOGITS] * n), params).token_ids
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
    tokens = Sampler(seed=2)(logits, params).token_ids.tolist()
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
    out = Sampler(seed=0)(logits, params)
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
    tokens = Sampler(seed=0)(logits, params).token_ids.tolist()
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    assert tokens[1] == argmax[1]  # top_k=1 leaves only the argmax
    alone = Sampler(seed=7)(logits[3:4], [params[3]]).token_ids.item()
    assert tokens[3] == alone


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="logits has 3 rows but params has 2"):
        Sampler()(torch.zeros(3, 5), [_params()] * 2)
    with pytest.raises(ValueError, match="logits has 2 rows but counters has 3"):
        Sampler()(torch.zeros(2, 5), [_params()] * 2, counters=[0, 1, 2])
    with pytest.raises(ValueError, match="logits has 2 rows but seeds has 1"):
        Sampler()(torch.zeros(2, 5), [_params()] * 2, seeds=[4])
    with pytest.raises(ValueError, match="2-D"):
        Sampler()(torch.zeros(5), [_params()])
