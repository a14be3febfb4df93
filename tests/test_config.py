"""cluster/config.py: YAML into frozen dataclasses; errors name the key (and the file); flags override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvrelay.cluster.config import ServerConfig, TlsConfig, load_config
from kvrelay.cluster.routing import BalanceConfig
from kvrelay.worker.config import EngineConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "kvrelay.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvrelay.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    c = load_config(None)
    assert c == ServerConfig()
    assert (c.host, c.port, c.workers, c.device, c.default_max_tokens) == (
        "127.0.0.1",
        50051,
        None,
        "auto",
        16,
    )
    assert c.engine == EngineConfig(detokenize=False)
    assert c.routing == BalanceConfig()


def test_the_example_file_is_valid_and_holds_the_defaults() -> None:
    assert load_config(EXAMPLE) == ServerConfig()


def test_file_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
port: 6000
workers: 2
drain_grace_s: 5          # an int where a float is expected is fine
metrics_port: 9400
model: /models/llama
engine:
  num_kv_blocks: 64
  dtype: float32
  prefill_graph_tokens: [16, 64]
routing:
  affinity_blocks: 2
  balance_rel_threshold: 2
""",
    )
    c = load_config(path)
    assert (c.port, c.workers, c.drain_grace_s, c.metrics_port) == (6000, 2, 5.0, 9400)
    assert isinstance(c.drain_grace_s, float)
    assert (c.engine.model, c.engine.num_kv_blocks, c.engine.dtype, c.engine.detokenize) == (
        "/models/llama", 64, "float32", False,
    )  # fmt: skip
    assert (c.routing.affinity_blocks, c.routing.balance_rel_threshold) == (2, 2.0)
    assert c.engine.prefill_graph_tokens == (16, 64)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 6000\nhost: 0.0.0.0\nengine:\n  num_kv_blocks: 64\n  dtype: float32\n")
    c = load_config(path, {"port": 7000, "engine": {"num_kv_blocks": 32}, "model": "tiny"})
    assert (c.port, c.host) == (7000, "0.0.0.0")
    assert (c.engine.num_kv_blocks, c.engine.dtype, c.engine.model) == (32, "float32", "tiny")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot: 1\n", "unknown key prot (known: auth_token_file, "),
        ("engine:\n  num_kv_block: 3\n", "unknown key engine.num_kv_block"),
        ("routing:\n  affinity: 3\n", "unknown key routing.affinity"),
        ("port: '50051'\n", "port must be int, got str '50051'"),
        ("workers: true\n", "workers must be int or null, got bool True"),
        ("drain_grace_s: soon\n", "drain_grace_s must be float, got str 'soon'"),
        ("engine:\n  enforce_eager: 1\n", "engine.enforce_eager must be bool, got int 1"),
        (
            "engine:\n  prefill_graph_tokens: [16, x]\n",
            "engine.prefill_graph_tokens must be a list of int or null, got list [16, 'x']",
        ),
        ("engine:\n  prefill_graph_tokens: [16, 9999]\n", "engine.prefill_graph_tokens: each bucket"),
        ("engine:\n  max_model_len: 1.5\n", "engine.max_model_len must be int or null, got float 1.5"),
        ("engine:\n  device: cpu\n", "engine.device cannot be set: set the top-level 'device' key"),
        ("engine:\n  detokenize: true\n", "engine.detokenize cannot be set"),
        ("engine: 3\n", "engine must be a mapping of keys to values, got int"),
        ("engine:\n  block_size: 7\n", "engine.block_size must be one of 8, 16, 32, 64, 128, got 7"),
        ("model: a\nengine:\n  model: b\n", "model is given twice ('a' and engine.model 'b')"),
        ("port: 70000\n", "port must be in [0, 65535], got 70000"),
        ("device: tpu\n", "device must be one of auto, cpu, cuda, got 'tpu'"),
        ("workers: 2\nprefill_workers: 1\n", "give either workers or prefill_workers + decode_workers"),
        ("max_queued_requests: 0\n", "max_queued_requests must be >= 1, got 0"),
        ("drain_grace_s: -1\n", "drain_grace_s must be a finite number of seconds >= 0, got -1.0"),
        ("routing:\n  balance_rel_threshold: 0.5\n", "routing.balance_rel_threshold must be >= 1.0"),
        ("tls:\n  cert: a.pem\n", "unknown key tls.cert (known: cert_file, client_ca_file, key_file, "),
        ("tls:\n  key_file: k.pem\n", "tls.key_file is set but tls.cert_file is not: give both"),
        ("tls:\n  cert_file: c.pem\n", "tls.cert_file is set but tls.key_file is not: give both"),
        ("tls:\n  client_ca_file: ca.pem\n", "tls.client_ca_file needs TLS: set tls.cert_file"),
        (
            "tls:\n  cert_file: c\n  key_file: k\n  require_client_cert: true\n",
            "tls.require_client_cert is true but tls.client_ca_file is not set",
        ),
        ("tls:\n  require_client_cert: 1\n", "tls.require_client_cert must be bool or null, got int 1"),
        ("auth_token_file: ''\n", "auth_token_file must be a file path or null, got an empty string"),
        ("max_concurrent_streams: 0\n", "max_concurrent_streams must be >= 1, got 0"),
        ("gpus_per_worker: 1.5\n", "gpus_per_worker must be in (0, 1], got 1.5"),
        ("gpus_per_worker: 0\n", "gpus_per_worker must be in (0, 1], got 0"),
        (
            "gpus_per_worker: 0.5\n",
            "gpus_per_worker 0.5 shares a GPU between workers: set engine.kv_cache_memory",
        ),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_overrides_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"^port must be in \[0, 65535\], got -1"):
        load_config(None, {"port": -1})


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--config: cannot read .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"kvrelay.yaml: not valid YAML at line 2"):
        load_config(write(tmp_path, "port: 1\n  bad: [\n"))
    with pytest.raises(ValueError, match=r"kvrelay.yaml: expected a mapping of keys to values, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    assert load_config(write(tmp_path, "# only comments\n")) == ServerConfig()


def test_tls_section_and_flags_merge(tmp_path: Path) -> None:
    path = write(tmp_path, "tls:\n  cert_file: c.pem\n  key_file: k.pem\n")
    c = load_config(path, {"tls": {"client_ca_file": "ca.pem"}})
    assert c.tls == TlsConfig("c.pem", "k.pem", "ca.pem", None)
    assert (c.tls.enabled, c.tls.client_cert_required) == (True, True)
    optional = TlsConfig("c.pem", "k.pem", "ca.pem", require_client_cert=False)
    assert (optional.enabled, optional.client_cert_required) == (True, False)
    assert (TlsConfig().enabled, TlsConfig().client_cert_required) == (False, False)


def test_config_is_frozen() -> None:
    c = load_config(None)
    with pytest.raises(AttributeError):
        c.port = 1  # type: ignore[misc]


def test_shared_gpus_default_to_more_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvrelay.cluster import serve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    c = load_config(write(tmp_path, "gpus_per_worker: 0.5\nengine:\n  kv_cache_memory: 1048576\n"))
    assert serve.resolve_workers(c) == (4, "cuda")
    assert serve.resolve_workers(load_config(None)) == (2, "cuda")
