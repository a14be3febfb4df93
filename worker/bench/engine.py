"""`kvrelay bench engine`: offline throughput of one engine, side by side with baselines.

CPU (the tiny model): prefill tok/s and decode tok/s at a few batch sizes.

GPU (``random:llama-3.2-1b`` and ``random:llama-3.1-8b`` by default), in one run:
- the device-to-device copy bandwidth (bytes read + written per second): the HBM roof;
- batch-1 decode ms/token and its MBU: bytes a step must read (weights + the KV of the
  context) per second, over that roof;
- decode tok/s at each batch size and context, with CUDA graphs and eagerly (the same engine
  with its graphs switched off: same weights, same KV pool, same requests);
- Hugging Face transformers ``generate`` with ``cache_implementation="static"`` at the same
  shape, batch and context (skipped with a note where transformers is absent);
- graph capture time and memory;
- time to first token by prompt length and a mixed step (a prompt chunk beside decodes), with
  the prefill graphs and without (``bench/prefill.py``).

Decode is timed at a given context without computing the prompt: requests are admitted with
their blocks allocated and all but the last prompt token marked computed (the KV bytes are
whatever the pool holds; a decode step reads them all the same). So the figures are the
decode step alone, as in a long-running server.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import EngineConfig, resolve_device
from ..engine import Engine
from ..request import RequestStatus
from ..sampling_params import SamplingParams

log = logging.getLogger("kvrelay")

GPU_MODELS = ("random:llama-3.2-1b", "random:llama-3.1-8b")


@dataclass(frozen=True)
class PrefillBenchArgs:
    ttft_lens: Sequence[int]  # prompt lengths of the TTFT table
    mixed_step: tuple[int, int]  # (chunk tokens, decoding sequences) of the mixed-step row
    flop_rate: float  # measured bf16 matmul FLOP/s: the compute floor's roof


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of iters)."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def _admit_decoding(engine: Engine, rid: str, prompt: list[int], params: SamplingParams) -> None:
    """Admit a request as if its prompt but the last token were already computed (bench only)."""
    engine.add_request(rid, prompt, params)
    req = engine.requests[rid]
    engine.scheduler.waiting.remove(req)
    if not engine.allocator.allocate_slots(rid, len(prompt)):
        raise RuntimeError(f"bench: the KV pool cannot hold {len(prompt)} more tokens for {rid}")
    req.status = RequestStatus.RUNNING
    req.num_computed_tokens = len(prompt) - 1
    req.num_cached_prompt_tokens = 0
    engine.scheduler.running.append(req)


def measure_decode(engine: Engine, batch: int, context: int, steps: int, *, graphs: bool = True) -> float:
    """Seconds per decode step of `batch` sequences at `context` tokens (steps timed after one warm step)."""
    saved = engine.runner.graphs
    if not graphs:
        engine.runner.graphs = None
    try:
        rng = random.Random(batch * 7919 + context)
        vocab = engine.model_config.vocab_size
        params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
        for i in range(batch):
            _admit_decoding(
                engine, f"d{batch}-{context}-{i}", [rng.randrange(vocab) for _ in range(context)], params
            )
        engine.step()  # the last prompt token, decode-shaped
        engine.step()
        _sync(engine.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(engine.device)
        elapsed = time.perf_counter() - t0
        while engine.has_unfinished_requests():
            engine.step()
        return elapsed / steps
    finally:
        engine.runner.graphs = saved


def measure_prefill(engine: Engine, batch: int, prompt_len: int) -> float:
    """Prompt tokens per second computing `batch` prompts of `prompt_len` to their first token."""
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{batch}-{i}", [rng.randrange(vocab) for _ in range(prompt_len)], params)
    _sync(engine.device)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    _sync(engine.device)
    return batch * prompt_len / (time.perf_counter() - t0)


def _weight_bytes(engine: Engine) -> int:
    seen: set[int] = set()
    total = 0
    for p in engine.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _kv_bytes_per_token(engine: Engine) -> int:
    mc = engine.model_config
    return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * engine.dtype.itemsize


def hf_static_decode(
    model_config: Any, dtype: torch.dtype, device: torch.device, points: Sequence[tuple[int, int]], steps: int
) -> dict[tuple[int, int], float] | str:
    """Seconds per decode step of transformers' generate with a static cache; a note if unavailable."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return "transformers not installed: HF baseline skipped"
    mc = model_config
    fields: dict[str, Any] = {
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.intermediate_size,
        "num_hidden_layers": mc.num_hidden_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_key_value_heads,
        "head_dim": mc.head_dim,
        "rms_norm_eps": mc.rms_norm_eps,
        "max_position_embeddings": mc.max_position_embeddings,
        "tie_word_embeddings": mc.tie_word_embeddings,
    }
    with torch.device(device):
        model: Any = LlamaForCausalLM(LlamaConfig(**fields))
    model = model.to(dtype).eval()
    out: dict[tuple[int, int], float] = {}
    for batch, context in points:
        ids = torch.randint(0, mc.vocab_size, (batch, context + steps), device=device)

        def run(prompt_len: int, new_tokens: int, ids: torch.Tensor = ids) -> float:
            _sync(device)
            t0 = time.perf_counter()
            model.generate(
                ids[:, :prompt_len],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
            )
            _sync(device)
            return time.perf_counter() - t0

        # Both timed runs end at the same length (context + steps + 2), so the static cache and the
        # compiled decode graph transformers builds for it are the same; they differ by `steps`
        # decode steps (and a prefill `steps` tokens longer in the short run, which slightly
        # favours the baseline). Warm-up compiles at this shape first.
        run(context, steps + 2)
        run(context + steps, 2)
        long, short = run(context, steps + 2), run(context + steps, 2)
        out[(batch, context)] = (long - short) / steps
    return out


def _bench_cpu(
    config: EngineConfig, batch_sizes: Sequence[int], prompt_len: int, steps: int
) -> dict[str, Any]:
    engine = Engine(
        replace(config, max_num_seqs=max(config.max_num_seqs, *batch_sizes), enable_prefix_caching=False)
    )
    measure_decode(engine, 1, 16, 2)  # warm-up
    rows = []
    for b in tqdm(batch_sizes, desc="bench engine", unit="batch", leave=False):
        rows.append(
            {
                "batch": b,
                "prefill_tok_s": measure_prefill(engine, b, prompt_len),
                "decode_tok_s": b / measure_decode(engine, b, prompt_len, steps),
            }
        )
    engine.check_integrity()
    print(
        f"kvrelay bench engine: {config.model}, {engine.dtype}, cpu ({torch.get_num_threads()} threads), "
        f"prompt {prompt_len}, {steps} decode steps"
    )
    print(f"{'batch':>6} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['batch']:>6} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.0f}")
    return {
        "device": f"cpu: {platform.processor() or platform.machine()}",
        "model": config.model,
        "rows": rows,
    }


def _bench_gpu_model(
    config: EngineConfig,
    batch_sizes: Sequence[int],
    contexts: Sequence[int],
    steps: int,
    copy_bw: float,
    hf: bool,
    hf_batches: Sequence[int],
    hf_contexts: Sequence[int],
    prefill: PrefillBenchArgs,
) -> dict[str, Any]:
    from .prefill import bench_prefill  # imports this module's helpers

    engine = Engine(config)
    graphs = engine.runner.graphs
    captured = graphs is not None or engine.runner.prefill_graphs is not None
    res: dict[str, Any] = {
        "model": config.model,
        "weight_bytes": _weight_bytes(engine),
        "kv_blocks": engine.allocator.num_blocks,
        "capture_s": engine.runner.graph_capture_seconds if captured else None,
        "graph_memory_bytes": engine.runner.graph_memory_bytes if captured else None,
        "rows": [],
    }
    kv_tok = _kv_bytes_per_token(engine)
    points = [(b, c) for c in contexts for b in batch_sizes]
    for b, c in tqdm(points, desc=f"decode {config.model}", unit="point", leave=False):
        need = b * -(-(c + steps + 2) // config.block_size)
        if need > engine.allocator.num_free_blocks:
            log.warning(
                "skipping batch %d context %d: needs %d KV blocks, the pool has %d",
                b,
                c,
                need,
                engine.allocator.num_free_blocks,
            )
            res["rows"].append(
                {
                    "batch": b,
                    "context": c,
                    "skipped": f"needs {need} KV blocks, pool has {engine.allocator.num_free_blocks}",
                }
            )
            continue
        t_graph = measure_decode(engine, b, c, steps, graphs=True)
        t_eager = measure_decode(engine, b, c, max(4, steps // 4), graphs=False)
        step_bytes = res["weight_bytes"] + b * c * kv_tok
        res["rows"].append(
            {
                "batch": b,
                "context": c,
                "graph_ms": 1e3 * t_graph,
                "eager_ms": 1e3 * t_eager,
                "graph_tok_s": b / t_graph,
                "eager_tok_s": b / t_eager,
                "graphs_vs_eager": t_eager / t_graph,
                "mbu": step_bytes / t_graph / copy_bw,
            }
        )
    res.update(bench_prefill(engine, prefill.ttft_lens, prefill.mixed_step, contexts[0], prefill.flop_rate))
    engine.check_integrity()
    model_config, dtype, device = engine.model_config, engine.dtype, engine.device
    del engine, graphs
    torch.cuda.empty_cache()
    if hf:
        hf_points = [(b, c) for c in contexts for b in hf_batches if b in batch_sizes and c in hf_contexts]
        hf_res = hf_static_decode(
            model_config,
            dtype,
            device,
            hf_points,
            steps,
        )
        if isinstance(hf_res, str):
            res["hf_note"] = hf_res
        else:
            for row in res["rows"]:
                if "skipped" in row:
                    continue
                t = hf_res.get((row["batch"], row["context"]))
                if t is not None:
                    row["hf_ms"] = 1e3 * t
                    row["vs_hf"] = t / (row["graph_ms"] / 1e3)
        torch.cuda.empty_cache()
    return res


def _print_gpu(report: dict[str, Any]) -> None:
    from .prefill import print_prefill

    print(
        f"kvrelay bench engine on {report['device']}: copy bandwidth {report['copy_bw_gbs']:.0f} GB/s "
        f"(read + write), bf16 matmul {report['bf16_matmul_tflops']:.0f} TFLOP/s"
    )
    for m in report["models"]:
        cap = (
            f"capture {m['capture_s']:.1f} s, graph memory {m['graph_memory_bytes'] / 2**20:.0f} MiB"
            if m["capture_s"] is not None
            else "graphs off"
        )
        print(f"\n{m['model']}: weights {m['weight_bytes'] / 1e9:.2f} GB, {cap}")
        if "hf_note" in m:
            print(f"  ({m['hf_note']})")
        print(
            f"{'batch':>6} {'ctx':>5} {'graph ms':>9} {'tok/s':>9} {'MBU':>6} {'eager ms':>9} {'g/e':>6} {'HF ms':>8} {'vs HF':>6}"
        )
        for r in m["rows"]:
            if "skipped" in r:
                print(f"{r['batch']:>6} {r['context']:>5}  skipped: {r['skipped']}")
                continue
            hf_ms = f"{r['hf_ms']:>8.2f}" if "hf_ms" in r else f"{'-':>8}"
            vs_hf = f"{r['vs_hf']:>5.1f}x" if "vs_hf" in r else f"{'-':>6}"
            print(
                f"{r['batch']:>6} {r['context']:>5} {r['graph_ms']:>9.3f} {r['graph_tok_s']:>9.0f} "
                f"{r['mbu']:>6.1%} {r['eager_ms']:>9.3f} {r['graphs_vs_eager']:>5.1f}x {hf_ms} {vs_hf}"
            )
        print_prefill(m)


def run_engine_bench(
    config: EngineConfig,
    *,
    models: Sequence[str] | None = None,
    batch_sizes: Sequence[int],
    contexts: Sequence[int] = (512, 2048),
    prompt_len: int = 128,
    decode_steps: int = 32,
    hf: bool = True,
    hf_batches: Sequence[int] = (1, 32, 128),
    hf_contexts: Sequence[int] = (512,),
    ttft_lens: Sequence[int] = (16, 256, 1024, 2048),
    mixed_step: tuple[int, int] = (256, 64),
    json_path: Path | None = None,
) -> dict[str, Any]:
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    if ttft_lens and min(ttft_lens) < 1:
        raise ValueError(f"--ttft-lens must be positive integers, got {list(ttft_lens)}")
    if prompt_len < 1 or decode_steps < 1:
        raise ValueError(f"--prompt-len and --decode-steps must be >= 1, got {prompt_len} and {decode_steps}")
    device = resolve_device(config.device)
    if device.type == "cpu":
        report = _bench_cpu(config, batch_sizes, prompt_len, decode_steps)
    else:
        from .prefill import matmul_rate

        copy_bw = copy_bandwidth(device)
        prefill = PrefillBenchArgs(ttft_lens, mixed_step, matmul_rate(device))
        report = {
            "device": torch.cuda.get_device_name(device),
            "copy_bw_gbs": copy_bw / 1e9,
            "bf16_matmul_tflops": prefill.flop_rate / 1e12,
            "torch": torch.__version__,
            "models": [],
        }
        for name in models or GPU_MODELS:
            max_ctx = max(*contexts, *ttft_lens) + decode_steps + 8
            mcfg = replace(
                config,
                model=name,
                max_model_len=max_ctx,
                max_num_seqs=max(max(batch_sizes), config.max_num_seqs),
                enable_prefix_caching=False,
            )
            report["models"].append(
                _bench_gpu_model(
                    mcfg, batch_sizes, contexts, decode_steps, copy_bw, hf, hf_batches, hf_contexts, prefill
                )
            )
            torch.cuda.empty_cache()
        _print_gpu(report)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
    return report
