"""End-to-end engine behaviour on the CPU: parity with transformers, prefix caching, preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from engine_helpers import hf_greedy, make_engine, random_prompts

from kvrelay.worker.request import FinishReason
from kvrelay.worker.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_parity_with_transformers(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path, arch)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    engine = make_engine(ckpt)
    prompts = random_prompts(5, [1, 7, 16, 33, 50], engine.model_config.vocab_size, seed=1)
    outs = engine.generate(prompts, GREEDY)  # submitted together: they batch
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
        assert out.finish_reason is FinishReason.LENGTH
        assert out.prompt_tokens == len(prompt)
    engine.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_chunked_prefill_matches_unchunked() -> None:
    prompts = random_prompts(4, [300, 5, 120, 64], 256, seed=2)
    whole = make_engine(max_num_batched_tokens=2048).generate(prompts, GREEDY)
    chunked_engine = make_engine(max_num_batched_tokens=32, max_num_seqs=8)
    chunked = chunked_engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    chunked_engine.check_integrity()


def test_prefix_cache_hit_gives_identical_tokens() -> None:
    shared = random_prompts(1, [130], 256, seed=3)[0]
    first, second = [*shared, 10, 11, 12], [*shared, 20, 21]
    engine = make_engine()
    a = engine.generate([first], GREEDY)[0]
    b = engine.generate([second], GREEDY)[0]
    assert a.cached_prompt_tokens == 0
    # 130 shared tokens = 8 full blocks of 16; the ninth block differs.
    assert b.cached_prompt_tokens == 128
    reference = make_engine(enable_prefix_caching=False).generate([second], GREEDY)[0]
    assert b.token_ids == reference.token_ids
    assert reference.cached_prompt_tokens == 0
    stats = engine.stats()
    assert stats.prefix_cache_hits == 128
    engine.check_integrity()


SAMPLED = [
    SamplingParams(max_tokens=40, temperature=0.9, seed=21, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=1.2, top_p=0.8, top_k=30, seed=2**64 - 1, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True),  # seeded at admission (config.seed)
    SamplingParams(
        max_tokens=40, temperature=0.7, min_p=0.1, repetition_penalty=1.2, seed=5, ignore_eos=True
    ),
]


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_preemption_under_memory_pressure_keeps_outputs(sampling: str) -> None:
    """A preempted request is recomputed and continues with the same tokens: for sampled requests
    because their noise is a function of (seed, tokens generated so far), nothing that the
    recompute could leave behind."""
    prompts = random_prompts(8, [40, 23, 57, 31], 256, seed=4)
    params: SamplingParams | list[SamplingParams] = (
        SamplingParams(max_tokens=40, ignore_eos=True) if sampling == "greedy" else SAMPLED * 2
    )
    reference = make_engine().generate(prompts, params)
    if sampling == "sampled":  # distinct random streams, so the equality below is not vacuous
        assert len({tuple(o.token_ids) for o in reference}) == 8
    # Each request needs up to 7 blocks; 8 of them at once need ~50. Give the pool 16.
    engine = make_engine(num_kv_blocks=16)
    outs = engine.generate(prompts, params)
    assert engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    engine.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_seeded_sampling_is_independent_of_batch() -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    prompt = random_prompts(1, [20], 256, seed=5)[0]
    alone = make_engine().generate([prompt], params)[0]
    others = random_prompts(6, [3, 40, 17], 256, seed=6)
    mixed_params = [SamplingParams(max_tokens=12, temperature=0.8, seed=i) for i in range(6)]
    batch = make_engine().generate(
        [*others[:3], prompt, *others[3:]], [*mixed_params[:3], params, *mixed_params[3:]]
    )
    assert batch[3].token_ids == alone.token_ids
    unseeded = make_engine().generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=99))[0]
    assert unseeded.token_ids != alone.token_ids


def test_unseeded_sampling_follows_the_engine_seed() -> None:
    """Requests without a seed get one at admission from the engine's sampler (EngineConfig.seed):
    the same config reproduces them, another seed does not, and in one engine they differ."""
    prompt = random_prompts(1, [20], 256, seed=5)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    first = [o.token_ids for o in make_engine(seed=3).generate([prompt] * 3, params)]
    assert [o.token_ids for o in make_engine(seed=3).generate([prompt] * 3, params)] == first
    assert [o.token_ids for o in make_engine(seed=4).generate([prompt] * 3, params)] != first
    assert len({tuple(t) for t in first}) == 3


def test_stop_conditions() -> None:
    engine = make_engine()
    prompt = random_prompts(1, [12], 256, seed=7)[0]
    free_run = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    stop_tok = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_tok)
    by_token = engine.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=(stop_tok,)))[0]
    assert by_token.token_ids == free_run.token_ids[: first + 1]
    assert by_token.finish_reason is FinishReason.STOP
    # A stop string taken from the generated text: output ends right before it.
    text = free_run.text
    assert len(text) >= 6, text
    stop = text[3:6]
    by_text = engine.generate([prompt], SamplingParams(max_tokens=20, stop=(stop,)))[0]
    assert by_text.finish_reason is FinishReason.STOP
    assert by_text.text == text[: text.index(stop)]
    engine.check_integrity()


def test_eos_stops_unless_ignored() -> None:
    engine = make_engine()
    prompt = random_prompts(1, [9], 256, seed=8)[0]
    free_run = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    # Make the model's 3rd token its EOS: generation must stop there, unless ignore_eos.
    eos = free_run.token_ids[2]
    engine.eos_token_ids = frozenset({eos})
    stopped = engine.generate([prompt], SamplingParams(max_tokens=8))[0]
    assert stopped.token_ids == free_run.token_ids[: free_run.token_ids.index(eos) + 1]
    assert stopped.finish_reason is FinishReason.STOP
    ignored = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert ignored.token_ids == free_run.token_ids
    assert ignored.finish_reason is FinishReason.LENGTH


def test_logprobs_match_log_softmax() -> None:
    engine = make_engine()
    prompt = random_prompts(1, [10], 256, seed=9)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=3, logprobs=5, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 5
        assert lp.top[0][0] == tok  # greedy: the sampled token is the most likely
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt: must hold at least 1 token"),
        ([1, 99999], SamplingParams(), "token id 99999 is outside the vocabulary"),
        ([1] * 4000, SamplingParams(max_tokens=200), "exceeds max_model_len 4096"),
        ([1, 2], SamplingParams(top_k=100000), "top_k must be <= the vocabulary size"),
    ],
)
def test_add_request_rejects_bad_input(prompt: list[int], params: SamplingParams, message: str) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request("r", prompt, params)
    assert not engine.has_unfinished_requests()


def test_request_larger_than_pool_is_refused() -> None:
    engine = make_engine(num_kv_blocks=4)  # 64 tokens
    with pytest.raises(ValueError, match="exceeds the KV cache capacity of 64 tokens"):
        engine.add_request("r", [1] * 60, SamplingParams(max_tokens=10))


def test_abort_frees_blocks_within_one_step() -> None:
    engine = make_engine()
    engine.add_request("a", random_prompts(1, [70], 256)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request(
        "b", random_prompts(1, [20], 256, seed=1)[0], SamplingParams(max_tokens=5, ignore_eos=True)
    )
    engine.step()
    engine.step()
    assert engine.allocator.num_used_blocks > 0
    final = engine.abort_request("a")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert engine.abort_request("a") is None
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    assert engine.allocator.num_used_blocks == 0


def test_expired_deadline_never_starts() -> None:
    import time

    engine = make_engine()
    engine.add_request("late", [5, 6, 7], SamplingParams(max_tokens=4), deadline=time.monotonic() - 1)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("late", FinishReason.ABORT)]
    assert engine.num_steps == 0
    engine.check_integrity()
