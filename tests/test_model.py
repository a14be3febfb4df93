"""Our LlamaForCausalLM (loaded by our loader, run through the paged cache) against the
transformers implementation of the same checkpoint, in float32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import (
    LLAMA3_SCALING,
    VOCAB,
    assign_blocks,
    hf_logits,
    hf_reference,
    make_checkpoint,
    make_kv_caches,
    make_metadata,
    make_positions,
)

from kvrelay.worker.attention.torch_backend import TorchPagedAttention
from kvrelay.worker.model.config import ModelConfig
from kvrelay.worker.model.llama import LlamaForCausalLM
from kvrelay.worker.model.loader import load_model, resolve_model

ATOL = 1e-4

# (id, arch, make_checkpoint kwargs). 4 query heads: kv 4 = MHA, 2 = GQA, 1 = MQA.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-gqa", "llama", {"num_kv_heads": 2}),
    ("llama-mha-tied", "llama", {"num_kv_heads": 4, "tie": True}),
    ("llama-mqa-sharded", "llama", {"num_kv_heads": 1, "shards": 3}),
    ("llama-llama3-rope", "llama", {"num_kv_heads": 2, "rope_scaling": LLAMA3_SCALING}),
    (
        "llama-linear-rope-tied",
        "llama",
        {"tie": True, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    ("llama-biases", "llama", {"attention_bias": True, "mlp_bias": True, "rope_theta": 500000.0}),
    ("mistral-gqa", "mistral", {"num_kv_heads": 2, "seed": 1}),
    ("mistral-mha-tied-sharded", "mistral", {"num_kv_heads": 4, "tie": True, "shards": 2}),
    ("qwen2-gqa-tied", "qwen2", {"num_kv_heads": 2, "tie": True}),
    ("qwen2-mqa-sharded", "qwen2", {"num_kv_heads": 1, "shards": 2}),
    ("qwen3-gqa-tied", "qwen3", {"num_kv_heads": 2, "tie": True}),
    ("qwen3-mha-wide-head", "qwen3", {"num_kv_heads": 4, "head_dim": 32}),  # head_dim != hidden / heads
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LlamaForCausalLM, ModelConfig, torch.nn.Module]:
    name, arch, kwargs = request.param
    model_dir = make_checkpoint(tmp_path_factory.mktemp(name), arch, **kwargs)
    model, config = load_model(model_dir, torch.float32, torch.device("cpu"), TorchPagedAttention())
    return model, config, hf_reference(model_dir)


def _tokens(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _run_step(
    model: LlamaForCausalLM,
    seqs: list[list[int]],
    step: list[tuple[int, int]],
    block_size: int,
    tables: list[list[int]],
    caches: list[torch.Tensor],
) -> torch.Tensor:
    """Runs one packed step where sequence s adds tokens [cached, cached + new) -> logits [T, V]."""
    ids = torch.tensor([t for s, (c, n) in zip(seqs, step, strict=True) for t in s[c : c + n]])
    meta = make_metadata(step, block_size, tables)
    with torch.no_grad():
        hidden = model(ids, make_positions(step), caches, meta)
        return model.compute_logits(hidden)


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda message: f"{prefix}: {message}"


def test_packed_prefill_matches_transformers(
    pair: tuple[LlamaForCausalLM, ModelConfig, torch.nn.Module],
) -> None:
    model, config, ref = pair
    prompts = _tokens([7, 19, 1], seed=0)
    step = [(0, len(p)) for p in prompts]
    tables = assign_blocks([len(p) for p in prompts], block_size=4, shuffle_seed=0)
    caches = make_kv_caches(config, num_blocks=16, block_size=4)
    logits = _run_step(model, prompts, step, 4, tables, caches)
    assert logits.dtype == torch.float32 and logits.shape == (27, config.vocab_size)
    expected = torch.cat([hf_logits(ref, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode_matches_transformers(
    pair: tuple[LlamaForCausalLM, ModelConfig, torch.nn.Module],
) -> None:
    model, config, ref = pair
    # New tokens per step for each sequence: chunked prefills, a prefill mixed with a
    # decode, decode-only steps, and a sequence that leaves the batch early.
    schedule = [[6, 5, 1, 1, 1, 1], [10, 8, 1, 1, 1, 1], [5, 1, 1]]
    seqs = _tokens([sum(s) for s in schedule], seed=1)
    block_size = 4
    tables = assign_blocks([len(s) for s in seqs], block_size, shuffle_seed=1)
    caches = make_kv_caches(config, num_blocks=16, block_size=block_size)
    expected = [hf_logits(ref, s) for s in seqs]  # [len, V]: position p sees tokens 0..p only
    cached = [0, 0, 0]
    for i in range(len(schedule[0])):
        live = [s for s in range(len(seqs)) if i < len(schedule[s])]
        step = [(cached[s], schedule[s][i]) for s in live]
        logits = _run_step(
            model, [seqs[s] for s in live], step, block_size, [tables[s] for s in live], caches
        )
        want = torch.cat([expected[s][c : c + n] for s, (c, n) in zip(live, step, strict=True)])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0, msg=_prefixed(f"step {i}"))
        for s, (_, n) in zip(live, step, strict=True):
            cached[s] += n
    assert cached == [len(s) for s in seqs]


def test_logits_only_for_requested_rows(pair: tuple[LlamaForCausalLM, ModelConfig, torch.nn.Module]) -> None:
    model, config, ref = pair
    prompts = _tokens([9, 4], seed=2)
    step = [(0, 9), (0, 4)]
    caches = make_kv_caches(config, num_blocks=8, block_size=4)
    meta = make_metadata(step, 4)
    with torch.no_grad():
        hidden = model(torch.tensor(prompts[0] + prompts[1]), make_positions(step), caches, meta)
        last = model.compute_logits(hidden[torch.tensor([8, 12])])  # each prompt's last token
    assert hidden.shape == (13, config.hidden_size)
    expected = torch.stack([hf_logits(ref, prompts[0])[-1], hf_logits(ref, prompts[1])[-1]])
    torch.testing.assert_close(last, expected, atol=ATOL, rtol=0)


def test_rope_cache_spans_max_model_len(pair: tuple[LlamaForCausalLM, ModelConfig, torch.nn.Module]) -> None:
    model, config, _ = pair
    cache = model.model.rotary_emb.cos_sin_cache
    assert cache.dtype == torch.float32
    assert cache.shape == (config.max_model_len, config.head_dim)
    assert torch.equal(
        cache[0], torch.cat([torch.ones(config.head_dim // 2), torch.zeros(config.head_dim // 2)])
    )


def test_tied_embeddings_share_storage(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path, "qwen2", tie=True)
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"), TorchPagedAttention())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


# ---- on a GPU (skipped without one) ----


def _greedy_steps(model: LlamaForCausalLM, config: ModelConfig, device: torch.device) -> torch.Tensor:
    """Logits of the last token of a 30-token prefill then 20 decode steps -> [21, V] on the CPU."""
    ids = list(range(40, 90))
    dtype = next(model.parameters()).dtype
    caches = [c.to(device) for c in make_kv_caches(config, num_blocks=16, block_size=16, dtype=dtype)]
    steps = [[(0, 30)]] + [[(29 + i, 1)] for i in range(1, 21)]
    rows = []
    with torch.inference_mode():
        for step in steps:
            cached, n = step[0]
            meta = make_metadata(step, 16, [[3, 1, 7, 5]], device=device)
            tokens = torch.tensor(ids[cached : cached + n], device=device)
            hidden = model(tokens, make_positions(step, device), caches, meta)
            rows.append(model.compute_logits(hidden[-1:]).cpu())
    return torch.cat(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_cuda_tracks_float32_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path))
    model_dir = resolve_model("tiny")
    cuda = torch.device("cuda")
    ref, config = load_model(model_dir, torch.float32, torch.device("cpu"), TorchPagedAttention())
    model, _ = load_model(model_dir, torch.bfloat16, cuda, TorchPagedAttention())
    assert model.lm_head.weight.device.type == "cuda" and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    expected, got = _greedy_steps(ref, config, torch.device("cpu")), _greedy_steps(model, config, cuda)
    # bf16 keeps ~3 significant digits through every layer: bound the error by the logits' scale
    # (the tiny model's output rows are scaled up), and the mean error much tighter than the max.
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=0.02 * scale, rtol=0.05)
    assert (got - expected).abs().mean().item() < 0.002 * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_replays_as_cuda_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The model itself must be capturable: no host syncs, no data-dependent shapes. The
    # torch backend's decode path happens to be capturable too, for a fixed max_seq_len.
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path))
    cuda = torch.device("cuda")
    model, config = load_model(resolve_model("tiny"), torch.bfloat16, cuda, TorchPagedAttention())
    step = [(100 + 7 * s, 1) for s in range(8)]
    meta = make_metadata(step, 16, [[1 + 10 * s + j for j in range(10)] for s in range(8)], device=cuda)
    caches = [c.to(cuda).normal_() for c in make_kv_caches(config, 81, 16, torch.bfloat16)]
    tokens = torch.randint(0, 256, (8,), device=cuda)
    positions = make_positions(step, cuda)
    with torch.inference_mode():
        eager = model.compute_logits(model(tokens, positions, caches, meta))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(tokens, positions, caches, meta)  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model.compute_logits(model(tokens, positions, caches, meta))
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager)
