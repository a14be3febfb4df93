"""Synthetic requests and arrival times for `kvrelay bench serve`. Everything is seeded and pure:
the same arguments give the same requests and the same schedule.

Workloads (docs/BENCH_SERVE.md gives the parameters):
- `random_requests`: prompt and output lengths fixed, or uniform in [lo, hi].
- `sharegpt_requests`: lengths drawn from lognormals whose means match ShareGPT's published ones.
- `shared_prefix_requests`: N system prompts of L tokens, each shared by many requests, then a
  unique suffix: it exercises the prefix cache and prefix-aware routing.

Prompts are token ids by default (no tokenizer needed); `to_text` turns a workload into text
prompts of about the same length (one word of a fixed vocabulary per token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

WORKLOADS = ("random", "sharegpt", "shared-prefix")
# Token ids below this are left out of prompts: small ids are often special tokens (BOS, EOS,
# padding) that a server may treat differently from text.
_FIRST_PROMPT_ID = 3
# Words of `to_text` prompts: short, common English words that most BPE vocabularies hold as one
# token each (with the leading space), so a text prompt of n words is about n tokens.
_WORDS_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her"
)
_WORDS = tuple(_WORDS_TEXT.split(" "))


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `prompt_len` is the intended prompt length in tokens (exact for
    token-id prompts; for text the server's usage says how many tokens it became)."""

    prompt: tuple[int, ...] | str
    prompt_len: int
    output_len: int  # max_tokens; with ignore_eos, exactly the tokens generated
    prefix_group: int | None = None  # shared-prefix workload: which system prompt it starts with


@dataclass(frozen=True)
class LengthRange:
    """Uniform integer lengths in [lo, hi]; lo == hi is a fixed length."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"length range must be 1 <= lo <= hi, got {self.lo}:{self.hi}")

    @staticmethod
    def parse(text: str, flag: str) -> LengthRange:
        """`N` or `LO:HI`; the error names the flag."""
        parts = text.split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            raise ValueError(f"{flag}: expected N or LO:HI with integers, got {text!r}") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"{flag}: expected N or LO:HI with 1 <= LO <= HI, got {text!r}")
        return LengthRange(lo, hi)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=n)


@dataclass(frozen=True)
class Lognormal:
    """A lognormal length distribution given by its mean (tokens) and the sigma of its log, so that
    mu = ln(mean) - sigma^2 / 2. Draws are rounded and clipped to [lo, hi]."""

    mean: float
    sigma: float
    lo: int = 1

    def __post_init__(self) -> None:
        if not self.mean > 0 or not self.sigma >= 0 or self.lo < 1:
            raise ValueError(f"lognormal needs mean > 0, sigma >= 0, lo >= 1, got {self}")

    @property
    def mu(self) -> float:
        return math.log(self.mean) - self.sigma**2 / 2

    def sample(self, rng: np.random.Generator, n: int, hi: int) -> np.ndarray:
        draws = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(np.rint(draws), self.lo, max(self.lo, hi)).astype(np.int64)


# ShareGPT's published means (Kwon et al., "Efficient Memory Management for Large Language Model
# Serving with PagedAttention", SOSP 2023, Fig. 11): 161.31 prompt tokens, 337.99 output tokens.
# The sigmas are not published; 1.0 and 0.8 give the long right tails of conversational data
# (medians of 98 and 245 tokens).
SHAREGPT_INPUT = Lognormal(mean=161.31, sigma=1.0, lo=4)
SHAREGPT_OUTPUT = Lognormal(mean=337.99, sigma=0.8, lo=1)


def _token_prompt(rng: np.random.Generator, n: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(_FIRST_PROMPT_ID, vocab_size, size=n))


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= _FIRST_PROMPT_ID:
        raise ValueError(f"vocab_size must be > {_FIRST_PROMPT_ID}, got {vocab_size}")


def random_requests(
    n: int, input_len: LengthRange, output_len: LengthRange, vocab_size: int, seed: int
) -> list[BenchRequest]:
    """n requests of uniformly random token ids, lengths uniform in the given ranges."""
    _check_vocab(vocab_size)
    rng = np.random.default_rng(seed)
    ins, outs = input_len.sample(rng, n), output_len.sample(rng, n)
    return [
        BenchRequest(_token_prompt(rng, int(i), vocab_size), int(i), int(o))
        for i, o in zip(ins, outs, strict=True)
    ]


def sharegpt_requests(
    n: int,
    vocab_size: int,
    max_model_len: int,
    seed: int,
    input_dist: Lognormal = SHAREGPT_INPUT,
    output_dist: Lognormal = SHAREGPT_OUTPUT,
) -> list[BenchRequest]:
    """n requests with ShareGPT-like lengths. The output is clipped first (to max_model_len -
    input_dist.lo), then the prompt to what is left, so prompt + output <= max_model_len."""
    _check_vocab(vocab_size)
    if max_model_len < input_dist.lo + output_dist.lo:
        raise ValueError(
            f"max_model_len {max_model_len} is below the shortest sharegpt request "
            f"({input_dist.lo} + {output_dist.lo} tokens)"
        )
    rng = np.random.default_rng(seed)
    outs = output_dist.sample(rng, n, max_model_len - input_dist.lo)
    ins = input_dist.sample(rng, n, max_model_len)
    ins = np.minimum(ins, max_model_len - outs)
    return [
        BenchRequest(_token_prompt(rng, int(i), vocab_size), int(i), int(o))
        for i, o in zip(ins, outs, strict=True)
    ]


def shared_prefix_requests(
    n: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: LengthRange,
    output_len: LengthRange,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """n requests, each a system prompt (one of num_prefixes, prefix_len tokens, chosen uniformly
    at random) followed by a unique random suffix."""
    _check_vocab(vocab_size)
    if num_prefixes < 1 or prefix_len < 1:
        raise ValueError(f"num_prefixes and prefix_len must be >= 1, got {num_prefixes}, {prefix_len}")
    rng = np.random.default_rng(seed)
    prefixes = [_token_prompt(rng, prefix_len, vocab_size) for _ in range(num_prefixes)]
    groups = rng.integers(0, num_prefixes, size=n)
    sufs, outs = suffix_len.sample(rng, n), output_len.sample(rng, n)
    return [
        BenchRequest(
            prefixes[int(g)] + _token_prompt(rng, int(s), vocab_size), prefix_len + int(s), int(o), int(g)
        )
        for g, s, o in zip(groups, sufs, outs, strict=True)
    ]


# The longest word is 5 letters: with its space, at most 6 tokens even for a byte-level tokenizer.
_MAX_TOKENS_PER_WORD = 6


def calibration_text(max_model_len: int) -> str:
    """Words whose token count, over their number, is the server's tokens per word; short enough
    (with one special token and one output token) to fit max_model_len whatever the tokenizer."""
    n = min(len(_WORDS), (max_model_len - 2) // _MAX_TOKENS_PER_WORD)
    if n < 1:
        raise ValueError(f"max_model_len {max_model_len} is too short for text prompts")
    return " ".join(_WORDS[:n])


def tokens_per_word(text: str, prompt_tokens: int) -> float:
    """The server's tokens per `to_text` word: prompt_tokens is what `text` became."""
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    return prompt_tokens / len(text.split(" "))


def to_text(requests: Sequence[BenchRequest], tokens_per_word: float = 1.0) -> list[BenchRequest]:
    """The same requests with text prompts of about the same token length: the first
    floor(prompt_len / tokens_per_word) token ids t become words _WORDS[t mod len(_WORDS)], so
    requests that share a token prefix share a text prefix too. Lengths are approximate (a word's
    tokens vary); the server's usage gives the real prompt length."""
    if not tokens_per_word > 0:
        raise ValueError(f"tokens_per_word must be > 0, got {tokens_per_word}")
    out = []
    for r in requests:
        if isinstance(r.prompt, str):
            out.append(r)
            continue
        n = max(1, int(len(r.prompt) / tokens_per_word))
        out.append(replace(r, prompt=" ".join(_WORDS[t % len(_WORDS)] for t in r.prompt[:n])))
    return out


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (seconds after the start) of n requests: 0 for all when rate is inf, else the
    cumulative sum of gamma inter-arrival gaps with shape = burstiness and mean 1 / rate.
    burstiness 1 is a Poisson process; below 1 is burstier, above 1 more regular (the gaps'
    coefficient of variation is 1 / sqrt(burstiness)). The first request goes at time 0."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)  # [n]
    gaps[0] = 0.0
    return np.cumsum(gaps)
