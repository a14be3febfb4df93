"""The model's shape, read from a Hugging Face model directory's config.json.

Only what the Llama family (Llama, Mistral, Qwen2, Qwen3) needs is kept; everything is
validated here so that the model code can trust it. Both config layouts are read: the
transformers 4 one (top-level ``rope_theta`` and ``rope_scaling``) and the transformers 5
one (a ``rope_parameters`` dict holding both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
# RoPE variants whose frequencies are fixed at load time; "dynamic", "yarn", "longrope" and
# friends change frequencies or attention scale and are rejected rather than run wrong.
_ROPE_TYPES = ("default", "linear", "llama3")
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE, else {"rope_type": "linear", "factor"} or {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False  # Llama/Qwen3 `attention_bias` also covers o_proj; Qwen2's does not
    mlp_bias: bool = False  # Llama `mlp_bias`
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(SUPPORTED_ARCHITECTURES)}, got {self.architecture!r}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if any(t < 0 for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be >= 0, got {self.eos_token_ids}")
        if self.bos_token_id is not None and self.bos_token_id < 0:
            raise ValueError(f"bos_token_id must be >= 0 or None, got {self.bos_token_id}")

    @property
    def max_model_len(self) -> int:
        """Longest context served. Capped at the sliding window: within it, full causal
        attention is exactly what the model computes, so no window mask is ever needed."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Reads config.json (and generation_config.json for EOS ids) of a model directory."""
        path = Path(model_dir) / "config.json"
        raw = _read_json(path)
        return cls.from_dict(raw, path, _read_generation_eos(Path(model_dir) / "generation_config.json"))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], path: Path, generation_eos: tuple[int, ...] | None = None
    ) -> ModelConfig:
        """``path`` names the source in error messages; ``generation_eos`` overrides config.json's EOS."""

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ValueError(f"{path}: missing required key {key!r}")
            return raw[key]

        archs = need("architectures")
        arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: key 'architectures' is {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        if raw.get("head_dim") is not None:
            head_dim = raw["head_dim"]
        elif isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
            head_dim = hidden // heads
        else:
            raise ValueError(
                f"{path}: no 'head_dim' and hidden_size ({hidden}) is not divisible by "
                f"num_attention_heads ({heads})"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        eos = (
            generation_eos if generation_eos else _as_id_tuple(raw.get("eos_token_id"), path, "eos_token_id")
        )
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw),
            rope_scaling=_rope_scaling(raw, path),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "Qwen2ForCausalLM" else attention_bias,
            o_proj_bias=attention_bias and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(raw.get("mlp_bias", False)) and arch == "LlamaForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(raw, arch),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_generation_eos(path: Path) -> tuple[int, ...] | None:
    if not path.is_file():
        return None
    return _as_id_tuple(_read_json(path).get("eos_token_id"), path, "eos_token_id") or None


def _as_id_tuple(value: Any, path: Path, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: key {key!r} must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 folds rope_theta and the scaling into `rope_parameters`.
    params = raw.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def _rope_theta(raw: dict[str, Any]) -> float:
    theta = raw.get("rope_theta")
    if theta is None:
        theta = _rope_params(raw).get("rope_theta")
    return float(theta) if theta is not None else _DEFAULT_ROPE_THETA


def _rope_scaling(raw: dict[str, Any], path: Path) -> dict[str, Any] | None:
    if raw.get("rope_scaling") is not None:
        key, scaling = "rope_scaling", raw["rope_scaling"]
    else:
        key, scaling = "rope_parameters", _rope_params(raw)
    if not isinstance(scaling, dict):
        raise ValueError(f"{path}: key {key!r} must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"{path}: key '{key}.rope_type' is {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None

    def field(name: str, default: Any = None) -> float:
        value = scaling.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: key '{key}.{name}' must be a positive number, got {value!r}")
        return float(value)

    if rope_type == "linear":
        return {"rope_type": "linear", "factor": field("factor")}
    low, high = field("low_freq_factor"), field("high_freq_factor")
    if not high > low:
        raise ValueError(f"{path}: key '{key}.high_freq_factor' ({high}) must exceed low_freq_factor ({low})")
    return {
        "rope_type": "llama3",
        "factor": field("factor"),
        "low_freq_factor": low,
        "high_freq_factor": high,
        # transformers falls back to max_position_embeddings when this is absent.
        "original_max_position_embeddings": int(
            field("original_max_position_embeddings", raw.get("max_position_embeddings"))
        ),
    }


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    window = raw.get("sliding_window")
    # Qwen configs carry a sliding_window value that is only live under use_sliding_window.
    if arch in _QWEN and not raw.get("use_sliding_window", False):
        return None
    if arch not in (*_QWEN, "MistralForCausalLM"):
        return None
    return int(window) if window is not None else None
