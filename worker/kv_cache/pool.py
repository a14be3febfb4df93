"""The paged KV cache tensors of one worker, and how many blocks fit a memory budget."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("kvrelay")

# CPU pools default to this much host memory (capped by what the machine has free).
DEFAULT_CPU_KV_BYTES = 2 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block, every layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate(self, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
        """One tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K at 0, V at 1).

        Zero-filled: a padded CUDA-graph row may read a block it does not own, and zeros keep
        that read finite.
        """
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_budget_bytes(
    device: torch.device,
    *,
    kv_cache_memory: int | None,
    gpu_memory_utilization: float,
    reserved_bytes: int = 0,
) -> int:
    """Bytes the KV pool may take.

    An explicit ``kv_cache_memory`` wins. On a GPU it is ``gpu_memory_utilization`` of the
    device's total memory less what this process already holds at its peak (weights, a profiled
    forward pass) and ``reserved_bytes`` (CUDA-graph memory), so the pool never squeezes the
    activations it was profiled against. On the CPU it is a fixed default capped at a third of
    the host memory available now.
    """
    if kv_cache_memory is not None:
        return kv_cache_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_allocated(device)
        budget = int(total * gpu_memory_utilization) - used_by_others - peak - reserved_bytes
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: total {total / 2**30:.1f} GiB x "
                f"gpu_memory_utilization {gpu_memory_utilization} < peak use {peak / 2**30:.1f} GiB "
                f"+ other processes {used_by_others / 2**30:.1f} GiB + reserved {reserved_bytes / 2**30:.1f} GiB"
            )
        return budget
    return min(DEFAULT_CPU_KV_BYTES, _host_available_bytes() // 3)


def plan_num_blocks(spec: KVCacheSpec, budget_bytes: int, *, max_useful_blocks: int | None = None) -> int:
    num_blocks = budget_bytes // spec.bytes_per_block
    if max_useful_blocks is not None:
        num_blocks = min(num_blocks, max_useful_blocks)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory of {budget_bytes} bytes holds no KV block "
            f"(one block is {spec.bytes_per_block} bytes)"
        )
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)",
        num_blocks,
        spec.block_size,
        num_blocks * spec.block_size,
        num_blocks * spec.bytes_per_block / 2**30,
        str(spec.dtype).removeprefix("torch."),
    )
    return num_blocks
