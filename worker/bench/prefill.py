"""`kvrelay bench engine`, GPU: time to first token by prompt length and the mixed step, with the
token-bucket prefill graphs (worker/prefill_graph.py) and without, side by side on one engine.

- TTFT offline: ``Engine.generate`` of one prompt with max_tokens 1, median of ``repeats``
  fresh random prompts (prefix caching is off in the bench, so nothing is reused);
- the mixed step: one engine step of a ``chunk``-token prompt beside ``decodes`` decoding
  sequences at ``context`` tokens, against the graphed decode step of the same sequences;
- the compute floor of a prompt: its matmul and causal-attention FLOPs over the measured
  bf16 matmul rate.

Graphs off means the same engine with its prefill graphs detached (same weights, KV pool and
requests); decode-only steps keep their decode graphs either way. With the Triton backend the
mixed step is also timed with ``mixed_decode_kernel`` off (every sequence through the prefill
kernel, the path before issue 16), its prefill graphs captured again for that, so the
before/after is a ratio from one run.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..attention.triton_backend import TritonPagedAttention
from ..engine import Engine
from ..model.config import ModelConfig
from ..sampling_params import SamplingParams
from .engine import _admit_decoding, _sync, measure_decode


def matmul_rate(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """bf16 FLOP/s of an n x n x n matmul (median of iters): the compute roof."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def prefill_flops(mc: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of a `tokens`-token prompt from empty: projections and causal attention
    (QK^T and PV over the lower triangle), lm_head on the one sampled row."""
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    per_token = mc.hidden_size * (q + 2 * kv) + q * mc.hidden_size + 3 * mc.hidden_size * mc.intermediate_size
    attention = 2 * tokens * tokens * q  # 2 matmuls x 2 FLOPs x tokens^2 / 2 x q
    return mc.num_hidden_layers * (2 * tokens * per_token + attention) + 2 * mc.hidden_size * mc.vocab_size


class _PrefillGraphsOff:
    """Detaches the engine's prefill graphs for the block (graphs=False), or does nothing."""

    def __init__(self, engine: Engine, graphs: bool) -> None:
        self.runner, self.graphs = engine.runner, graphs
        self.saved = engine.runner.prefill_graphs

    def __enter__(self) -> None:
        if not self.graphs:
            self.runner.prefill_graphs = None

    def __exit__(self, *_: object) -> None:
        self.runner.prefill_graphs = self.saved


class MixedDecodeKernel:
    """Runs the block with the Triton backend's ``mixed_decode_kernel`` set to ``on``. Where that
    changes it, the prefill graphs are captured again for the block (a graph keeps the launches it
    captured) into the engine's graph pool (the KV pool leaves no room for a second one), and the
    engine's own graphs and flag come back after. No request may be live: capture overwrites the
    static block tables."""

    def __init__(self, engine: Engine, backend: TritonPagedAttention, on: bool) -> None:
        self.engine, self.backend, self.on = engine, backend, on
        self.saved_flag, self.saved_graphs = backend.mixed_decode_kernel, engine.runner.prefill_graphs

    def __enter__(self) -> None:
        if self.on == self.saved_flag:
            return
        assert not self.engine.requests, list(self.engine.requests)
        self.backend.mixed_decode_kernel = self.on
        pg = self.saved_graphs
        if pg is not None:
            self.engine.runner.attach_prefill_graphs(
                pg.buckets,
                hidden_size=pg.hidden.shape[1],
                dtype=pg.hidden.dtype,
                capture=pg.use_graphs,
                progress=False,
                pool=pg.pool,
            )

    def __exit__(self, *_: object) -> None:
        self.backend.mixed_decode_kernel = self.saved_flag
        self.engine.runner.prefill_graphs = self.saved_graphs


def triton_backend(engine: Engine) -> TritonPagedAttention | None:
    """The engine's attention backend where it is the Triton one (every layer shares one)."""
    for module in engine.model.modules():
        backend = getattr(module, "attn_backend", None)
        if backend is not None:
            return backend if isinstance(backend, TritonPagedAttention) else None
    return None


def measure_ttft(engine: Engine, prompt_len: int, repeats: int = 5, *, graphs: bool = True) -> float:
    """Median seconds from submitting one `prompt_len`-token prompt to its first token."""
    rng = random.Random(prompt_len)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    with _PrefillGraphsOff(engine, graphs):
        for i in range(repeats + 1):  # the first is a warm-up
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            _sync(engine.device)
            t0 = time.perf_counter()
            engine.generate([prompt], params)
            _sync(engine.device)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_mixed_step(
    engine: Engine, chunk: int, decodes: int, context: int, repeats: int = 5, *, graphs: bool = True
) -> float:
    """Median seconds of one step that runs a `chunk`-token prompt beside `decodes` sequences
    decoding at `context` tokens (the prompt gets its first token in that step and finishes)."""
    rng = random.Random(chunk * 31 + decodes)
    vocab = engine.model_config.vocab_size
    decoding = SamplingParams(max_tokens=repeats + 8, ignore_eos=True)
    for i in range(decodes):
        _admit_decoding(engine, f"mixed-d{i}", [rng.randrange(vocab) for _ in range(context)], decoding)
    engine.step()  # the decodes' last prompt token: now every sequence decodes
    times = []
    with _PrefillGraphsOff(engine, graphs):
        for i in range(repeats + 1):
            engine.add_request(
                f"mixed-p{graphs}-{i}",
                [rng.randrange(vocab) for _ in range(chunk)],
                SamplingParams(max_tokens=1),
            )
            _sync(engine.device)
            t0 = time.perf_counter()
            engine.step()
            _sync(engine.device)
            if i:
                times.append(time.perf_counter() - t0)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return statistics.median(times)


def bench_prefill(
    engine: Engine, ttft_lens: Sequence[int], mixed: tuple[int, int], context: int, flop_rate: float
) -> dict[str, Any]:
    """The TTFT rows and the mixed-step row of one model, graphs on and off."""
    pg = engine.runner.prefill_graphs
    out: dict[str, Any] = {"prefill_graphs": pg.buckets if pg is not None else None, "ttft": []}
    for n in ttft_lens:
        if n > engine.config.max_num_batched_tokens or n >= engine.max_model_len:
            out["ttft"].append({"prompt": n, "skipped": "longer than one step or the model length"})
            continue
        floor = prefill_flops(engine.model_config, n) / flop_rate
        on = measure_ttft(engine, n) if pg is not None else None
        off = measure_ttft(engine, n, graphs=False)
        out["ttft"].append(
            {"prompt": n, "graph_ms": on and 1e3 * on, "eager_ms": 1e3 * off, "floor_ms": 1e3 * floor}
        )
    chunk, decodes = mixed
    if chunk + decodes <= engine.config.max_num_batched_tokens and decodes <= engine.config.max_num_seqs:
        on = measure_mixed_step(engine, chunk, decodes, context) if pg is not None else None
        off = measure_mixed_step(engine, chunk, decodes, context, graphs=False)
        decode = measure_decode(engine, decodes, context, 16)
        out["mixed"] = {
            "chunk": chunk,
            "decodes": decodes,
            "context": context,
            "graph_ms": on and 1e3 * on,
            "eager_ms": 1e3 * off,
            "decode_ms": 1e3 * decode,
            "chunk_floor_ms": 1e3 * prefill_flops(engine.model_config, chunk) / flop_rate,
        }
        backend = triton_backend(engine)
        if backend is not None and backend.mixed_decode_kernel:
            with MixedDecodeKernel(engine, backend, on=False):
                old_on = measure_mixed_step(engine, chunk, decodes, context) if pg is not None else None
                old_off = measure_mixed_step(engine, chunk, decodes, context, graphs=False)
            out["mixed"]["prefill_kernel_graph_ms"] = old_on and 1e3 * old_on
            out["mixed"]["prefill_kernel_eager_ms"] = 1e3 * old_off
    return out


def print_prefill(m: dict[str, Any]) -> None:
    buckets = m["prefill_graphs"]
    print(f"  prefill graphs: {'off' if buckets is None else 'token buckets ' + ','.join(map(str, buckets))}")
    print(
        f"  {'prompt':>6} {'TTFT graph ms':>14} {'TTFT eager ms':>14} {'g/e':>6} {'floor ms':>9} {'of floor':>9}"
    )
    for r in m["ttft"]:
        if "skipped" in r:
            print(f"  {r['prompt']:>6}  skipped: {r['skipped']}")
            continue
        best = r["graph_ms"] or r["eager_ms"]
        g = f"{r['graph_ms']:>14.3f}" if r["graph_ms"] else f"{'-':>14}"
        ratio = f"{r['eager_ms'] / r['graph_ms']:>5.1f}x" if r["graph_ms"] else f"{'-':>6}"
        print(
            f"  {r['prompt']:>6} {g} {r['eager_ms']:>14.3f} {ratio} {r['floor_ms']:>9.3f} {r['floor_ms'] / best:>9.0%}"
        )
    mx = m.get("mixed")
    if mx:
        g = f"{mx['graph_ms']:.3f}" if mx["graph_ms"] else "-"
        bound = mx["decode_ms"] + mx["chunk_floor_ms"]
        best = mx["graph_ms"] or mx["eager_ms"]
        print(
            f"  mixed step ({mx['chunk']}-token chunk + {mx['decodes']} decodes at {mx['context']}): "
            f"graph {g} ms, eager {mx['eager_ms']:.3f} ms; decode step of {mx['decodes']} "
            f"{mx['decode_ms']:.3f} ms + chunk floor {mx['chunk_floor_ms']:.3f} ms = {bound:.3f} ms "
            f"(mixed / that: {best / bound:.2f}x)"
        )
        if "prefill_kernel_eager_ms" in mx:
            old = mx["prefill_kernel_graph_ms"] or mx["prefill_kernel_eager_ms"]
            og = f"{mx['prefill_kernel_graph_ms']:.3f}" if mx["prefill_kernel_graph_ms"] else "-"
            print(
                f"  mixed step, decodes through the prefill kernel (before issue 16): graph {og} ms, "
                f"eager {mx['prefill_kernel_eager_ms']:.3f} ms (mixed / bound: {old / bound:.2f}x; "
                f"decode kernel saves {old / best:.2f}x)"
            )
