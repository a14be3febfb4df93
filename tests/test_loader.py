"""Checkpoint loading: error messages, dtypes, config parsing, and the built-in tiny model."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from checkpoints import edit_json, make_checkpoint, make_kv_caches, make_metadata, make_positions
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from kvrelay.worker.attention.torch_backend import TorchPagedAttention
from kvrelay.worker.model.config import ModelConfig
from kvrelay.worker.model.llama import LlamaForCausalLM
from kvrelay.worker.model.loader import load_model, resolve_model
from kvrelay.worker.model.tiny import BOS_ID, EOS_ID, TINY_NAME, tiny_model_dir, tiny_weights

CPU = torch.device("cpu")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _load(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, ModelConfig]:
    return load_model(model_dir, dtype, CPU, TorchPagedAttention())


def _rewrite(path: Path, **changes: torch.Tensor | None) -> None:
    """Rewrites a safetensors file with tensors replaced, added, or (None) removed."""
    tensors = load_file(path)
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "llama", "llama")


def _logits(model: LlamaForCausalLM, config: ModelConfig, ids: list[int]) -> torch.Tensor:
    step = [(0, len(ids))]
    caches = make_kv_caches(config, num_blocks=8, block_size=16, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return model.compute_logits(
            model(torch.tensor(ids), make_positions(step), caches, make_metadata(step, 16))
        )


# ---- weight errors: ValueError naming the file and the key ----


def test_missing_weight(llama_dir: Path) -> None:
    _rewrite(llama_dir / "model.safetensors", **{Q_PROJ: None, "lm_head.weight": None})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing weight key\(s\)") as e:
        _load(llama_dir)
    assert "lm_head.weight" in str(e.value) and Q_PROJ in str(e.value)


def test_unexpected_key(llama_dir: Path) -> None:
    _rewrite(llama_dir / "model.safetensors", **{"model.layers.0.self_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: unexpected weight key 'model\.layers\.0\.self_attn\.extra\.weight'",
    ):
        _load(llama_dir)


def test_shape_mismatch(llama_dir: Path) -> None:
    _rewrite(llama_dir / "model.safetensors", **{Q_PROJ: torch.zeros(64, 32)})
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: shape mismatch for key '.*q_proj\.weight': expected \[64, 64\], got \[64, 32\]",
    ):
        _load(llama_dir)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path, "llama", shards=2)
    index = model_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][Q_PROJ] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=rf"index\.json: key '{Q_PROJ}' names shard 'model-00009-of-00009\.safetensors'"
    ):
        _load(model_dir)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_safetensors(llama_dir: Path, damage: str) -> None:
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00\x01not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable"):
        _load(llama_dir)


def test_no_weights_file(llama_dir: Path) -> None:
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        _load(llama_dir)


def test_ignores_inv_freq_and_tied_lm_head_copy(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path, "llama", tie=True)
    weights = load_file(model_dir / "model.safetensors")
    _rewrite(
        model_dir / "model.safetensors",
        **{
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
            "lm_head.weight": weights["model.embed_tokens.weight"].clone(),
        },
    )
    model, _ = _load(model_dir)
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])


def test_fuses_projections_in_order(llama_dir: Path) -> None:
    w = load_file(llama_dir / "model.safetensors")
    ours = _load(llama_dir)[0].state_dict()
    p = "model.layers.1."
    qkv = [w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
    assert torch.equal(ours[p + "self_attn.qkv_proj.weight"], torch.cat(qkv))
    gate_up = [w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]
    assert torch.equal(ours[p + "mlp.gate_up_proj.weight"], torch.cat(gate_up))


def test_logs_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_dir = make_checkpoint(tmp_path, "qwen2", shards=2)
    n = len(list(model_dir.glob("model-*.safetensors")))
    with caplog.at_level(logging.INFO, logger="kvrelay"):
        _load(model_dir)
    text = caplog.text
    assert n > 1 and f"GB in {n} shard(s)" in text
    for i in range(1, n + 1):
        assert f"shard {i}/{n} model-{i:05d}-of-{n:05d}.safetensors" in text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(llama_dir: Path, dtype: torch.dtype) -> None:
    model, config = _load(llama_dir, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(p.device == CPU and not p.requires_grad for p in model.parameters())
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    ids = [1, 2, 3, 4, 5, 6]
    low = _logits(model, config, ids)
    full = _logits(*_load(llama_dir), ids)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)


# ---- config.json ----


def test_config_unsupported_architecture(llama_dir: Path) -> None:
    edit_json(llama_dir / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        ValueError,
        match=r"config\.json: key 'architectures' is \['GPT2LMHeadModel'\]; supported: LlamaForCausalLM",
    ):
        ModelConfig.from_dir(llama_dir)


def test_config_missing_key(llama_dir: Path) -> None:
    edit_json(llama_dir / "config.json", hidden_size=None)
    with pytest.raises(ValueError, match=r"config\.json: missing required key 'hidden_size'"):
        ModelConfig.from_dir(llama_dir)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_config_unsupported_rope_scaling(llama_dir: Path, rope_type: str) -> None:
    edit_json(llama_dir / "config.json", rope_scaling={"type": rope_type, "factor": 2.0})
    with pytest.raises(ValueError, match=rf"config\.json: key 'rope_scaling\.rope_type' is '{rope_type}'"):
        ModelConfig.from_dir(llama_dir)


def test_config_bad_head_grouping(llama_dir: Path) -> None:
    edit_json(llama_dir / "config.json", num_key_value_heads=3)
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"
    ):
        ModelConfig.from_dir(llama_dir)


def test_config_legacy_rope_fields_and_eos_list(llama_dir: Path) -> None:
    edit_json(
        llama_dir / "config.json",
        rope_parameters=None,
        rope_theta=500000.0,
        rope_scaling={"type": "linear", "factor": 2},
        eos_token_id=[7, 8],
    )
    edit_json(llama_dir / "generation_config.json", eos_token_id=None)
    config = ModelConfig.from_dir(llama_dir)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.eos_token_ids == (7, 8)
    edit_json(llama_dir / "generation_config.json", eos_token_id=[9, 10, 11])
    assert ModelConfig.from_dir(llama_dir).eos_token_ids == (9, 10, 11)


def test_config_fields_per_architecture(tmp_path: Path) -> None:
    mistral = ModelConfig.from_dir(make_checkpoint(tmp_path / "m", "mistral", sliding_window=100))
    assert (mistral.max_position_embeddings, mistral.sliding_window, mistral.max_model_len) == (256, 100, 100)
    # Qwen's sliding_window is dead unless use_sliding_window is set.
    qwen2 = ModelConfig.from_dir(make_checkpoint(tmp_path / "q2", "qwen2", tie=True))
    edit_json(tmp_path / "q2" / "config.json", sliding_window=32, use_sliding_window=False)
    qwen2 = ModelConfig.from_dir(tmp_path / "q2")
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == (
        True,
        False,
        False,
        True,
    )
    assert qwen2.sliding_window is None and qwen2.max_model_len == 256
    qwen3 = ModelConfig.from_dir(make_checkpoint(tmp_path / "q3", "qwen3", head_dim=32))
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias) == (32, True, False)
    llama = ModelConfig.from_dir(make_checkpoint(tmp_path / "l", "llama", num_kv_heads=1, rope_theta=123.0))
    assert (llama.num_key_value_heads, llama.head_dim, llama.rope_theta, llama.rope_scaling) == (
        1,
        16,
        123.0,
        None,
    )
    assert (llama.bos_token_id, llama.eos_token_ids, llama.torch_dtype) == (BOS_ID, (EOS_ID,), "float32")


# ---- resolve_model and the tiny model ----


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"is not 'tiny', 'smollm2', a \.gguf file nor an existing directory"
    ):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(make_checkpoint(tmp_path / "m", "llama"))) == tmp_path / "m"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_model_resolves_and_loads(cache_dir: Path) -> None:
    model_dir = resolve_model("tiny")
    assert model_dir == cache_dir / TINY_NAME
    model, config = _load(model_dir)
    assert (config.architecture, config.hidden_size, config.num_hidden_layers) == ("LlamaForCausalLM", 256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (8, 4, 320)
    assert (config.bos_token_id, config.eos_token_ids, config.max_model_len) == (BOS_ID, (EOS_ID,), 4096)
    weights = tiny_weights()
    assert torch.equal(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert torch.equal(load_file(model_dir / "model.safetensors")[Q_PROJ], weights[Q_PROJ])
    # Deterministic: the generator is seeded, not the global RNG.
    torch.manual_seed(1234)
    assert torch.equal(tiny_weights()[Q_PROJ], weights[Q_PROJ])
    assert abs(weights[Q_PROJ].std().item() - 0.02) < 0.001


def test_tiny_model_written_once_even_when_racing(cache_dir: Path) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        dirs = list(pool.map(lambda _: tiny_model_dir(), range(3)))
    assert dirs == [cache_dir / TINY_NAME] * 3
    assert sorted(p.name for p in cache_dir.iterdir()) == [TINY_NAME]  # no temp dirs left
    mtime = (dirs[0] / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir() == dirs[0]
    assert (dirs[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_tokenizer_round_trips_unicode(cache_dir: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_model_dir() / "tokenizer.json"))
    for text in [
        "",
        "hello world",
        "  leading\tand\nnewlines  ",
        "héllo wörld",
        "日本語と中文",
        "emoji 🎉👩‍👩‍👧 ok",
        "\x00\x7f",
    ]:
        ids = tok.encode(text).ids
        assert ids == [BOS_ID, *text.encode("utf-8")]
        assert tok.decode(ids) == text
    assert tok.encode("a</s>").ids == [BOS_ID, ord("a"), EOS_ID]
    assert tok.decode([BOS_ID, ord("a"), EOS_ID], skip_special_tokens=False) == "<s>a</s>"
    config = json.loads((tiny_model_dir() / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")


def test_tiny_model_matches_transformers(cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    ids = hf_tok("Hi, tiny 🦙!")["input_ids"]
    assert ids == [BOS_ID, *"Hi, tiny 🦙!".encode()]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    model, config = _load(model_dir)
    torch.testing.assert_close(_logits(model, config, ids), expected, atol=1e-4, rtol=0)
