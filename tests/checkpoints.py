"""Test factories: small random Hugging Face checkpoints, their reference models, and the
paged-attention inputs (block tables, metadata, caches) of a batch.

Checkpoints are built with transformers itself so that our loader reads exactly what real
tools write (config layout, shard index, tied-weight elision).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvrelay.worker.attention.metadata import AttentionMetadata
from kvrelay.worker.model.config import ModelConfig
from kvrelay.worker.model.tiny import BOS_ID, EOS_ID, write_tokenizer_files

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
HIDDEN, HEADS, VOCAB = 64, 4, 320  # vocab covers the byte tokenizer's 258 ids
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that tests' short sequences already span the smoothed band.
    "original_max_position_embeddings": 16,
}


def hf_config(
    arch: str, *, tie: bool, num_kv_heads: int, rope_scaling: dict[str, Any] | None, **overrides: Any
) -> Any:
    """The transformers config of a 2-layer model, hidden 64, 4 heads, float32."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
    }
    if arch in ("mistral", "qwen3"):
        kwargs["head_dim"] = HIDDEN // HEADS
    if rope_scaling is not None:
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def make_checkpoint(
    tmp_dir: Path,
    arch: str,
    *,
    tie: bool = False,
    num_kv_heads: int = 2,
    shards: int = 1,
    rope_scaling: dict[str, Any] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Writes a random ``arch`` model dir (config, weights, tokenizer) into ``tmp_dir`` and
    returns it. ``shards`` > 1 splits the weights into about that many files plus an index
    (transformers picks the exact count). ``overrides`` go to the transformers config."""
    from transformers import AutoModelForCausalLM

    config = hf_config(arch, tie=tie, num_kv_heads=num_kv_heads, rope_scaling=rope_scaling, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # The largest tensor caps how small shards can get; a shard holds at least one tensor.
    max_shard = total if shards == 1 else max(total // shards, max(p.nbytes for p in model.parameters()))
    model.save_pretrained(tmp_dir, max_shard_size=max_shard)
    written = list(tmp_dir.glob("*.safetensors"))
    assert (len(written) == 1) == (shards == 1), (shards, written)
    write_tokenizer_files(tmp_dir, model_max_length=config.max_position_embeddings)
    return tmp_dir


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises with std 0.02, zero biases and unit norms: with those, logits
    # barely depend on the input and a missing bias or norm goes unnoticed. Make all of
    # them count, while keeping activations O(1).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.3 * noise)  # also the tied lm_head: keeps logits O(1)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def hf_reference(model_dir: Path) -> torch.nn.Module:
    """The transformers model of ``model_dir`` in float32 eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32: the reference's logits at every position of one sequence."""
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)]))
    return out.logits[0].float()


def assign_blocks(
    max_seq_lens: Sequence[int], block_size: int, *, shuffle_seed: int | None = None, first_block: int = 1
) -> list[list[int]]:
    """Disjoint block ids per sequence, enough for ``max_seq_lens``. Ids start at
    ``first_block`` (block 0 is the padding entry of block tables) and, with a seed, are
    shuffled so that a sequence's blocks are neither contiguous nor in order."""
    counts = [-(-n // block_size) for n in max_seq_lens]
    ids = list(range(first_block, first_block + sum(counts)))
    if shuffle_seed is not None:
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(shuffle_seed))
        ids = [ids[i] for i in perm.tolist()]
    tables, at = [], 0
    for c in counts:
        tables.append(ids[at : at + c])
        at += c
    return tables


def num_blocks_needed(block_tables: Sequence[Sequence[int]]) -> int:
    return max((max(t) for t in block_tables if t), default=0) + 1


def make_metadata(
    seqs: Sequence[tuple[int, int]],
    block_size: int,
    block_tables: Sequence[Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata of one step where sequence s has ``seqs[s] = (cached_len, query_len)``.

    ``block_tables`` default: ``assign_blocks`` of the sequences' lengths after this step.
    """
    seq_lens = [c + q for c, q in seqs]
    query_lens = [q for _, q in seqs]
    if block_tables is None:
        block_tables = assign_blocks(seq_lens, block_size)
    assert all(len(t) * block_size >= n for t, n in zip(block_tables, seq_lens, strict=True)), (
        block_tables,
        seq_lens,
    )
    width = max(len(t) for t in block_tables)
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    for s, t in enumerate(block_tables):
        table[s, : len(t)] = torch.tensor(t, dtype=torch.int32)
    slots = [
        block_tables[s][p // block_size] * block_size + p % block_size
        for s, (cached, q) in enumerate(seqs)
        for p in range(cached, cached + q)
    ]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        num_seqs=len(seqs),
        num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def make_positions(seqs: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """[T] int64: the absolute positions of a step's packed tokens."""
    return torch.tensor([p for c, q in seqs for p in range(c, c + q)], dtype=torch.int64, device=device)


def make_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks, block_size, Hkv, D] cache per layer."""
    shape = (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]


def edit_json(path: Path, **changes: Any) -> None:
    """Rewrites a JSON file with top-level keys set (a value of None deletes the key)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))
