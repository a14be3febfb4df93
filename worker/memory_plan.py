"""Startup sizing of an engine's device memory: which CUDA graphs it captures, and how many KV
blocks fit beside its weights, its activations and those graphs.

Runs once, in ``Engine.__init__``, after the model is loaded and before the KV pool exists. On a
GPU the free memory is measured, not guessed: the largest step runs once against a scratch pool
(peak activation memory), and the largest graph buckets are captured once against another
(what the graphs will take, reserved before the KV budget is computed). On the CPU, or with
``num_kv_blocks`` given, nothing runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvrelay.memory_model.transport import PoolLayout, dtype_name

from .config import EngineConfig
from .cuda_graph import default_buckets
from .disagg.role import KvPool, KvRole
from .kv_cache.block_allocator import BlockAllocator
from .kv_cache.pool import KVCacheSpec, kv_budget_bytes, plan_num_blocks
from .model.config import ModelConfig
from .model.llama import LlamaForCausalLM
from .model_runner import ModelRunner
from .prefill_graph import prefill_token_buckets
from .request import Request
from .sampling_params import SamplingParams
from .scheduler import ScheduledRequest, SchedulerOutput

log = logging.getLogger("kvrelay")


@dataclass(frozen=True)
class MemoryPlanner:
    """What the sizing needs of a loaded engine; every method is a pure function of it (plus the
    device's free memory)."""

    config: EngineConfig
    model: LlamaForCausalLM
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int  # the engine's, after config.max_model_len is checked against the model's

    def decode_buckets(self, role: type[KvRole]) -> list[int]:
        """Batch buckets of the decode graphs. A worker that never decodes (prefill) gets none,
        and no memory for them."""
        if self.device.type != "cuda" or self.config.enforce_eager or not role.decodes:
            return []
        return default_buckets(min(self.config.max_graph_batch_size, self.config.max_num_seqs))

    def token_buckets(self) -> list[int]:
        """Token buckets of the prefill graphs ([] where there are none)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return []
        return prefill_token_buckets(self.config, self.model.attn_backend)

    def make_kv_pool(self, role: type[KvRole], decode_buckets: list[int], token_buckets: list[int]) -> KvPool:
        """The paged KV pool, one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer,
        sized by the config or the memory budget; where it lives is the role's (shared memory on a
        CPU decode worker)."""
        spec = KVCacheSpec(
            num_layers=self.model_config.num_hidden_layers,
            num_kv_heads=self.model_config.num_key_value_heads,
            head_dim=self.model_config.head_dim,
            block_size=self.config.block_size,
            dtype=self.dtype,
        )
        num_blocks = self.plan_kv_blocks(spec, decode_buckets, token_buckets)
        layout = PoolLayout(
            spec.num_layers,
            num_blocks,
            spec.block_size,
            spec.num_kv_heads,
            spec.head_dim,
            dtype_name(self.dtype),
        )
        return role.allocate_pool(spec, layout, self.device)

    def plan_kv_blocks(self, spec: KVCacheSpec, decode_buckets: list[int], token_buckets: list[int]) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        graph_reserve = 0
        if self.device.type == "cuda":
            self.profile_peak_memory(spec)
            if decode_buckets or token_buckets:
                graph_reserve = self.estimate_graph_memory(spec, decode_buckets[-1:], token_buckets[-1:])
        budget = kv_budget_bytes(
            self.device,
            kv_cache_memory=self.config.kv_cache_memory,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            reserved_bytes=graph_reserve,
        )
        # More blocks than every sequence at full length can use is wasted memory.
        useful = self.config.max_num_seqs * -(-self.max_model_len // spec.block_size)
        return plan_num_blocks(spec, budget, max_useful_blocks=useful)

    def profile_peak_memory(self, spec: KVCacheSpec) -> None:
        """Run the largest step once against a scratch pool so the peak activation memory is known."""
        n = self.config.max_num_batched_tokens
        blocks = -(-n // spec.block_size) + 1
        scratch = spec.allocate(blocks, self.device)
        alloc = BlockAllocator(blocks, spec.block_size, enable_prefix_caching=False)
        runner = ModelRunner(
            self.model,
            scratch,
            block_size=spec.block_size,
            max_num_batched_tokens=n,
            max_num_seqs=1,
            max_model_len=max(n, self.max_model_len),
            device=self.device,
        )
        req = Request("__profile__", [0] * n, SamplingParams(max_tokens=1))
        alloc.allocate_slots(req.request_id, n)
        sched = SchedulerOutput(scheduled=[ScheduledRequest(req, 0, n)])
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.execute(runner.prepare(sched, alloc))
        torch.cuda.synchronize(self.device)
        del scratch, runner
        torch.cuda.empty_cache()

    def estimate_graph_memory(
        self, spec: KVCacheSpec, decode_buckets: list[int], token_buckets: list[int]
    ) -> int:
        """Capture the largest buckets against a scratch pool; what they take, plus margin, is reserved.

        Buckets share one pool (decode and prefill graphs alike) and the largest needs the most, so
        the smaller ones add little; the margin covers that and the per-graph bookkeeping. The real
        capture logs what it took.
        """
        scratch = spec.allocate(4, self.device)  # all-padding steps read and write no KV
        runner = ModelRunner(
            self.model,
            scratch,
            block_size=spec.block_size,
            max_num_batched_tokens=max([*decode_buckets, *token_buckets]),
            max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
            device=self.device,
        )
        runner.capture_cuda_graphs(
            decode_buckets,
            hidden_size=self.model_config.hidden_size,
            dtype=self.dtype,
            token_buckets=token_buckets,
            progress=False,
        )
        measured = runner.graph_memory_bytes
        del runner, scratch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserve = int(measured * 1.25) + (64 << 20)
        log.info(
            "CUDA graphs: reserving %.0f MiB (largest buckets took %.0f MiB)",
            reserve / 2**20,
            measured / 2**20,
        )
        return reserve
