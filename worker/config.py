"""Engine configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device where one exists, else the CPU."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU (what checkpoints ship in) and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a local Hugging Face-format directory, or "tiny" (built in)
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16  # tokens per KV block
    # KV pool size: an explicit byte budget wins; else this fraction of the device memory that is
    # free after the weights and a profiled forward pass (GPU), or a fixed default (CPU).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # tests pin the pool size exactly
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # None = the model's own limit
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs (they are only ever used on a GPU)
    max_graph_batch_size: int = 256  # largest CUDA-graph bucket (1, 2, 4, 8, then steps of 8)
    # Steps with prefill chunks (prompts, or prompts mixed with decodes) replay a CUDA graph of the
    # smallest token bucket >= their token count (worker/prefill_graph.py); False: they run eagerly.
    prefill_graphs: bool = True
    # Their token-count buckets; None: 16..128 by 16, four per doubling after, max_num_batched_tokens.
    prefill_graph_tokens: tuple[int, ...] | None = None
    attention_backend: str = "auto"  # auto (triton on a GPU, torch on the CPU), triton, torch
    seed: int = 0  # seeds the sampling noise of requests that bring no seed
    # Overlapped scheduling (worker/overlap.py): the host schedules and prepares step N+1 while
    # the device runs step N, and learns step N's tokens one step late. None: on for CUDA, off
    # for the CPU (where nothing runs concurrently, so it only adds a step of latency).
    async_scheduling: bool | None = None
    # Projections of 1..8 tokens (decode at small batch) run a Triton GEMV / split-K kernel on
    # CUDA where it beats cuBLAS (worker/model/gemv.py); False: always F.linear. Off by default
    # until it has been measured and tested on a GPU (scripts/bench_gemv.py, tests/test_gemv.py).
    narrow_gemv: bool = False
    # Detokenize outputs and match stop strings in the engine. Served workers turn it off: the
    # router owns text, so tokens alone cross the wire.
    detokenize: bool = True
    # Disaggregated serving: "both" (colocated), "prefill" (computes prompts, hands their KV to
    # decode workers) or "decode" (receives KV, streams the rest). See worker/disagg/role.py.
    kv_role: str = "both"
    handoff_timeout_s: float = 10.0  # a decode worker gives up waiting for a handoff after this
    handoff_policy: str = "recompute"  # then: "recompute" the prompt locally, or "fail" (UNAVAILABLE)
    # "auto": shared memory / CUDA IPC within a node, relay through Ray across nodes; "relay":
    # always relay (GPUs without peer access, or to test the cross-node path on one machine).
    kv_transport: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}), so every running sequence can decode in one step"
            )
        if not 1 <= self.max_graph_batch_size <= 512:
            raise ValueError(f"max_graph_batch_size must be in [1, 512], got {self.max_graph_batch_size}")
        if self.prefill_graph_tokens is not None:
            _check_token_buckets(self.prefill_graph_tokens, self.max_num_batched_tokens)
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"attention_backend must be auto, triton or torch, got {self.attention_backend!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        if self.kv_role not in ("both", "prefill", "decode"):
            raise ValueError(f"kv_role must be both, prefill or decode, got {self.kv_role!r}")
        if not 0.0 < self.handoff_timeout_s <= 3600.0:
            raise ValueError(f"handoff_timeout_s must be in (0, 3600] seconds, got {self.handoff_timeout_s}")
        if self.kv_transport not in ("auto", "relay"):
            raise ValueError(f"kv_transport must be auto or relay, got {self.kv_transport!r}")
        if self.handoff_policy not in ("recompute", "fail"):
            raise ValueError(f"handoff_policy must be recompute or fail, got {self.handoff_policy!r}")
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_model_len > self.max_num_batched_tokens
        ):
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )


def _check_token_buckets(buckets: tuple[int, ...], max_num_batched_tokens: int) -> None:
    if not buckets:
        raise ValueError("prefill_graph_tokens must name at least one token bucket, got ()")
    for b in buckets:
        if not isinstance(b, int) or not 1 <= b <= max_num_batched_tokens:
            raise ValueError(
                f"prefill_graph_tokens: each bucket must be an int in [1, max_num_batched_tokens="
                f"{max_num_batched_tokens}], got {b!r}"
            )
