"""`kvrelay serve` configuration: frozen dataclasses, filled from YAML and overridden by flags.

A YAML file's top-level keys mirror the flags (`port`, `workers`, `metrics_port`, ...; `model` is
a shortcut for `engine.model`), plus three sections:

    engine:   fields of `worker.config.EngineConfig` (dtype, num_kv_blocks, max_num_seqs, ...)
    routing:  fields of `cluster.routing.BalanceConfig`
    tls:      fields of `TlsConfig` (cert_file, key_file, client_ca_file, require_client_cert)

An unknown key is an error naming the key and the file; so is a value of the wrong type (naming the
expected type). `deploy/kvrelay.example.yaml` is a commented example of every key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvrelay.worker.config import EngineConfig

from .routing import BalanceConfig

DEVICES = ("auto", "cpu", "cuda")
_SECTIONS = ("engine", "routing", "tls")
# Engine fields the server sets itself: a file may not.
_ENGINE_RESERVED = {
    "device": "set the top-level 'device' key (each worker picks its own GPU)",
    "detokenize": "the router detokenizes; workers always send token ids only",
    "kv_role": "set the top-level 'prefill_workers' and 'decode_workers' keys",
}


@dataclass(frozen=True)
class TlsConfig:
    """The router's TLS: off unless cert_file is set. Files are PEM; they are read (and a missing
    one refused) when the server starts, by `cluster.auth.load_security`."""

    cert_file: str | None = None  # the server's certificate chain
    key_file: str | None = None  # its private key
    client_ca_file: str | None = None  # CAs that sign client certificates (mTLS)
    # None: required exactly when client_ca_file is set; False with client_ca_file: a client may
    # connect without a certificate, but one it presents must verify.
    require_client_cert: bool | None = None

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "client_ca_file"):
            if getattr(self, name) == "":
                raise ValueError(f"tls.{name} must be a file path or null, got an empty string")
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            raise ValueError(f"tls.{given} is set but tls.{missing} is not: give both")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs TLS: set tls.cert_file and tls.key_file too")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("tls.require_client_cert is true but tls.client_ca_file is not set")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def client_cert_required(self) -> bool:
        if self.require_client_cert is None:
            return self.client_ca_file is not None
        return self.require_client_cert


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (the ready line says which)
    workers: int | None = None  # None: one per GPU, or 1 CPU worker where there is no GPU
    # Disaggregated prefill/decode pools: accepted here, refused by `kvrelay serve` for now.
    prefill_workers: int | None = None
    decode_workers: int | None = None
    device: str = "auto"  # auto: cuda where a GPU is visible, else cpu
    ray_address: str | None = None  # None: start a local Ray cluster
    max_restarts: int = 3  # per worker actor, before it stays down
    # GPUs per worker actor (Ray's num_gpus): below 1, workers share a GPU (a small model on a
    # large GPU; prefill and decode workers on one GPU). Sharing needs the engine's KV cache
    # sized explicitly (kv_cache_memory or num_kv_blocks): gpu_memory_utilization is of the GPU.
    gpus_per_worker: float = 1.0
    metrics_port: int | None = None  # Prometheus HTTP endpoint on `host`; None: off
    # The OpenAI-compatible HTTP API (cluster/http_api.py) on `host`, beside the gRPC port, with
    # the same TLS and tokens; None: off.
    http_port: int | None = None
    # A plaintext port serving only grpc.health.v1 (no token): for probes that cannot speak TLS
    # (Kubernetes' grpc probes) when `port` has it. None: health is on `port` only.
    health_port: int | None = None
    # Admission: requests in flight (queued or running) and their tokens (prompt + max_tokens).
    max_queued_requests: int = 1024
    max_queued_tokens: int = 4 * 1024 * 1024
    # gRPC message size limit (both directions); a bigger request gets RESOURCE_EXHAUSTED from gRPC.
    # 16 MiB holds a prompt of 3M token ids (at most 5 bytes each), past any max_model_len.
    max_message_bytes: int = 16 * 1024 * 1024
    max_metadata_bytes: int = 8 * 1024  # request headers (the bearer token rides there)
    # HTTP/2 streams one connection may hold open; further calls wait in the client. Twice the
    # admission limit: at exactly as many streams as it keeps open, a client opens the next
    # stream while the server still counts one the client has seen end, and gRPC refuses it
    # (REFUSED_STREAM: UNAVAILABLE, seen with 1024 streams on one connection by `kvrelay bench
    # router`); admission then answers excess load with a clear RESOURCE_EXHAUSTED instead.
    max_concurrent_streams: int = 2048
    # Router processes that serve `port` together (SO_REUSEPORT; docs/ROUTERS.md): an int >= 1, or
    # "auto" (`resolve_router_processes`: 1 with <= 4 cores, else min(cores // 4, 8)). 1 keeps the
    # single-process server.
    router_processes: int | str = "auto"
    drain_grace_s: float = 30.0  # after SIGTERM/SIGINT, how long in-flight streams may run on
    default_max_tokens: int = 16  # for requests that leave max_tokens at 0
    # Requests arriving within this window that go to one worker are submitted in one call;
    # 0: those arriving within one event-loop iteration.
    batch_window_s: float = 0.0
    # Tokens a stream's response waits to gather before it is sent (SGLang's and vLLM's
    # --stream-interval): 1 sends every step's token at once; N > 1 sends a message per N tokens
    # (the first token and the last response always at once), which divides the router's and the
    # client's per-message CPU by about N at the cost of a coarser stream. Stop strings are then
    # seen up to N - 1 tokens later (the text is cut at the stop all the same).
    stream_interval: int = 1
    # Bearer tokens, one a line; None: the KVRELAY_AUTH_TOKENS variable, else no authentication.
    auth_token_file: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(detokenize=False))
    routing: BalanceConfig = field(default_factory=BalanceConfig)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        for name in ("port", "metrics_port", "health_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        for name in ("workers", "prefill_workers", "decode_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.workers is not None and (self.prefill_workers or self.decode_workers):
            raise ValueError("give either workers or prefill_workers + decode_workers, not both")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        positive = (
            "max_queued_requests", "max_queued_tokens", "max_message_bytes", "max_metadata_bytes",
            "max_concurrent_streams", "default_max_tokens", "stream_interval",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_message_bytes >= 2**31:
            raise ValueError(
                f"max_message_bytes must be < 2**31 (gRPC's limit), got {self.max_message_bytes}"
            )
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not (math.isfinite(self.gpus_per_worker) and 0 < self.gpus_per_worker <= 1):
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")
        if (
            self.gpus_per_worker < 1
            and self.engine.kv_cache_memory is None
            and self.engine.num_kv_blocks is None
        ):
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker} shares a GPU between workers: set "
                "engine.kv_cache_memory (bytes per worker) or engine.num_kv_blocks, since "
                "gpu_memory_utilization sizes the KV cache from the whole GPU"
            )
        for name in ("drain_grace_s", "batch_window_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
        rp = self.router_processes
        if not (rp == "auto" or (isinstance(rp, int) and not isinstance(rp, bool) and 1 <= rp <= 64)):
            raise ValueError(f"router_processes must be 'auto' or an integer in [1, 64], got {rp!r}")
        if self.auth_token_file == "":
            raise ValueError("auth_token_file must be a file path or null, got an empty string")
        if self.engine.detokenize:
            raise ValueError("engine.detokenize must be False: the router detokenizes")


def resolve_router_processes(value: int | str, cores: int | None = None) -> int:
    """How many router processes `router_processes` means on a machine with `cores` CPU cores
    (default: this one's). "auto": 1 up to 4 cores (a second router would only take cores from the
    workers and Ray), else one router per 4 cores, at most 8 (the 16-core GPU machine gets 4)."""
    if value != "auto":
        assert isinstance(value, int)
        return value
    n = cores if cores is not None else (os.cpu_count() or 1)
    return 1 if n <= 4 else min(n // 4, 8)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """The config of a YAML file (or the defaults when path is None), then `overrides` on top.

    overrides: top-level keys as in the file (flags), already typed; `engine`, `routing` and `tls`
    may be nested mappings too. ValueError names the key (and the file) on any problem.
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    merged = _merge(values, dict(overrides or {}))
    try:
        return _build(merged)
    except ValueError as e:
        if path is None:
            raise
        raise ValueError(f"{path}: {e}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key in _SECTIONS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _build(values: dict[str, Any]) -> ServerConfig:
    values = dict(values)
    engine = _section(values.pop("engine", None), "engine")
    routing = _section(values.pop("routing", None), "routing")
    tls = _section(values.pop("tls", None), "tls")
    if "model" in values:
        model = values.pop("model")
        _check_type("model", model, str)
        if "model" in engine and engine["model"] != model:
            raise ValueError(f"model is given twice ({model!r} and engine.model {engine['model']!r})")
        engine["model"] = model
    for key in engine:
        if key in _ENGINE_RESERVED:
            raise ValueError(f"engine.{key} cannot be set: {_ENGINE_RESERVED[key]}")
    kwargs = _typed_fields(ServerConfig, values, "", known_extra={"model", *_SECTIONS})
    engine_fields = _typed_fields(EngineConfig, engine, "engine.")
    try:
        kwargs["engine"] = EngineConfig(**engine_fields, detokenize=False)
    except ValueError as e:  # EngineConfig names its fields bare
        raise ValueError(f"engine.{e}") from None
    kwargs["routing"] = BalanceConfig(**_typed_fields(BalanceConfig, routing, "routing."))
    kwargs["tls"] = TlsConfig(**_typed_fields(TlsConfig, tls, "tls."))
    return ServerConfig(**kwargs)


def _section(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping of keys to values, got {type(value).__name__}")
    return dict(value)


def _typed_fields(
    cls: type, values: dict[str, Any], prefix: str, known_extra: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    """values checked against cls's field annotations; known_extra: keys handled by the caller."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init} - known_extra
    if cls is EngineConfig:
        names -= set(_ENGINE_RESERVED)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in names:
            known = ", ".join(sorted(names | known_extra))
            raise ValueError(f"unknown key {prefix}{key} (known: {known})")
        out[key] = _check_type(prefix + key, value, hints[key])
    return out


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """value if it fits the annotation (str, int, float, bool, tuple[int, ...], or X | None); ints
    pass as floats."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if typing.get_origin(t) is tuple and _is_int_list(value):  # tuple[int, ...]: a YAML list
            return tuple(value)
    names = " or ".join(
        "null" if t is type(None) else "a list of int" if typing.get_origin(t) is tuple else t.__name__
        for t in allowed
    )
    raise ValueError(f"{key} must be {names}, got {type(value).__name__} {value!r}")
