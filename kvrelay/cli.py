"""The `kvrelay` command line. Errors are one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from kvrelay.worker.config import DTYPES

log = logging.getLogger("kvrelay")

# Fields a prompts-file line may carry besides its prompt, and their JSON types.
_SAMPLING_FIELDS: dict[str, type | tuple[type, ...]] = {
    "max_tokens": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "min_p": (int, float),
    "seed": int,
    "stop": list,
    "stop_token_ids": list,
    "ignore_eos": bool,
    "logprobs": int,
    "repetition_penalty": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="local Hugging Face-format model dir, or 'tiny' (built in)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool size in bytes")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (GPU only)")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap the host's scheduling with the device's step (default: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--no-prefill-graphs",
        action="store_true",
        help="run steps with prefill chunks eagerly (decode steps keep their CUDA graphs)",
    )
    p.add_argument(
        "--narrow-gemv",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Triton GEMV for projections of 1-8 tokens on CUDA (default: off; no faster than cuBLAS on an H200, docs/BENCHMARKS.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay", description="kvrelay: LLM serving on a Ray worker pool")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from prompts (in this process, or against a server)")
    g.add_argument("--server", default=None, help="HOST:PORT of a running kvrelay server")
    from kvrelay.cluster.client import add_connection_args

    add_connection_args(g)  # --tls-root-cert, --tls-client-cert, --tls-client-key, --token-file
    _add_engine_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a text prompt")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--chat", help="a one-turn user message, rendered with the model's chat template")
    src.add_argument(
        "--prompts-file",
        type=Path,
        help="JSONL: {'text': ...}, {'prompt_ids': [...]} or {'messages': [{'role', 'content'}, ...]} a line",
    )
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off (vLLM's semantics)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2]; 0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2]; 0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON object a line, in input order")

    from kvrelay.cluster.serve import add_serve_args

    add_serve_args(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    be = bench.add_parser("engine", help="offline engine throughput (prefill and decode)")
    _add_engine_args(be)
    be.add_argument(
        "--batch-sizes", default=None, help="decode batch sizes (CPU default 1,8,32; GPU 1,8,32,64,128,256)"
    )
    be.add_argument("--contexts", default="512,2048", help="GPU: decode context lengths")
    be.add_argument(
        "--models", default=None, help="GPU: models to run (default random:llama-3.2-1b,random:llama-3.1-8b)"
    )
    be.add_argument("--prompt-len", type=int, default=128, help="CPU: prompt length")
    be.add_argument("--decode-steps", type=int, default=32)
    be.add_argument("--no-hf", action="store_true", help="GPU: skip the transformers static-cache baseline")
    be.add_argument("--hf-batches", default="1,32,128", help="GPU: batch sizes of the transformers baseline")
    be.add_argument("--hf-contexts", default="512", help="GPU: contexts of the transformers baseline")
    be.add_argument(
        "--ttft-lens", default="16,256,1024,2048", help="GPU: prompt lengths of the time-to-first-token table"
    )
    be.add_argument(
        "--mixed-step",
        default="256,64",
        help="GPU: CHUNK,DECODES of the mixed-step row (a prompt beside decodes)",
    )
    be.add_argument("--json", type=Path, default=None, help="write results here")
    from kvrelay.cluster.bench.serve import add_bench_serve_args

    add_bench_serve_args(bench.add_parser("serve", help="load test of a running server over gRPC"))
    from kvrelay.cluster.bench.disagg import add_bench_disagg_args

    add_bench_disagg_args(
        bench.add_parser("disagg", help="disaggregated vs colocated serving: TTFT and throughput")
    )
    from kvrelay.cluster.bench.router import add_bench_router_args

    add_bench_router_args(
        bench.add_parser("router", help="the gRPC router's own cost under many streams (no model)")
    )
    from kvrelay.memory_model.verify.bench_handoff import add_bench_handoff_args

    add_bench_handoff_args(
        bench.add_parser("handoff", help="GPU: KV handoff signal latency and bandwidth (memory_model)")
    )

    from kvrelay.memory_model.verify.litmus import add_litmus_args

    add_litmus_args(sub.add_parser("litmus", help="GPU memory-model litmus tests (MP, SB, LB)"))
    cp = sub.add_parser(
        "check-protocol", help="exhaustively check the KV handoff protocol and its broken variants"
    )
    cp.add_argument("--variants", default=None, help="comma-separated (default: all)")
    cp.add_argument("--traces", action="store_true", help="print each counterexample")
    return parser


def _engine_config(args: argparse.Namespace) -> Any:
    from kvrelay.worker.config import EngineConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        prefill_graphs=not args.no_prefill_graphs,
        narrow_gemv=args.narrow_gemv,
    )


def _mixed_step(text: str) -> tuple[int, int]:
    vals = _parse_ids(text, "--mixed-step")
    if len(vals) != 2 or min(vals) < 1:
        raise CliError(f"--mixed-step: expected CHUNK,DECODES, two positive integers, got {text!r}")
    return vals[0], vals[1]


def _parse_ids(text: str, where: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"{where}: expected comma-separated integers, got {text!r}") from None


# A prompt as the CLI carries it: text, token ids, or chat messages.
CliPrompt = str | list[int] | list[dict[str, str]]
_PROMPT_KEYS = ("text", "prompt_ids", "messages")


def _read_prompts_file(path: Path) -> list[tuple[CliPrompt, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CliError(f"--prompts-file: cannot read {path}: {e.strerror}") from None
    prompts: list[tuple[CliPrompt, dict[str, Any]]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CliError(f"{where}: expected a JSON object")
        keys = [k for k in _PROMPT_KEYS if k in obj]
        if len(keys) != 1:
            raise CliError(f"{where}: give exactly one of 'text', 'prompt_ids' or 'messages'")
        prompt = obj.pop(keys[0])
        if keys[0] == "messages":
            if not isinstance(prompt, list) or not prompt or not all(_is_message(m) for m in prompt):
                raise CliError(
                    f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}"
                )
        elif isinstance(prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise CliError(f"{where}: 'prompt_ids' must be a list of integers")
        elif not isinstance(prompt, str):
            raise CliError(f"{where}: 'text' must be a string")
        for key, value in obj.items():
            want = _SAMPLING_FIELDS.get(key)
            if want is None:
                raise CliError(
                    f"{where}: unknown field {key!r} (allowed: text, prompt_ids, messages, "
                    f"{', '.join(_SAMPLING_FIELDS)})"
                )
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise CliError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
        prompts.append((prompt, obj))
    if not prompts:
        raise CliError(f"--prompts-file: {path} holds no prompts")
    return prompts


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvrelay.worker.engine import Engine
    from kvrelay.worker.sampling_params import SamplingParams

    defaults: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
    }
    if args.prompts_file is not None:
        items = _read_prompts_file(args.prompts_file)
    elif args.prompt_ids is not None:
        items = [(_parse_ids(args.prompt_ids, "--prompt-ids"), {})]
    elif args.chat is not None:
        items = [([{"role": "user", "content": args.chat}], {})]
    else:
        items = [(args.prompt, {})]
    params = []
    for i, (_, overrides) in enumerate(items):
        fields = {**defaults, **overrides}
        fields["stop"] = tuple(fields["stop"])
        fields["stop_token_ids"] = tuple(fields.get("stop_token_ids", ()))
        try:
            params.append(SamplingParams(**fields))
        except ValueError as e:
            raise CliError(f"prompt {i + 1}: {e}") from None
    if args.server is not None:
        rows = _generate_remote(args, args.server, items, params)
    else:
        engine = Engine(_engine_config(args))
        prompts = [_local_prompt(engine, p, i) for i, (p, _) in enumerate(items)]
        rows = [out.to_json() for out in engine.generate(prompts, params)]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False) if args.json else row["text"])
    return 0


def _local_prompt(engine: Any, prompt: CliPrompt, i: int) -> str | list[int]:
    """Chat messages rendered with the model's template here (the server does it in remote mode)."""
    if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], dict):
        return cast("str | list[int]", prompt)
    if engine.tokenizer is None:
        raise CliError(f"prompt {i + 1}: chat: model {engine.config.model} has no tokenizer")
    try:
        return cast("list[int]", engine.tokenizer.apply_chat_template(prompt))
    except ValueError as e:
        raise CliError(f"prompt {i + 1}: {e}") from None


def _generate_remote(
    args: argparse.Namespace,
    server: str,
    items: list[tuple[CliPrompt, dict[str, Any]]],
    params: list[Any],
) -> list[dict[str, Any]]:
    """All prompts sent at once over gRPC (so the server batches them); results in input order."""
    import asyncio

    from kvrelay.cluster.client import AsyncKvrelayClient, KvrelayError, connection_kwargs

    connection = connection_kwargs(args)

    async def run() -> list[dict[str, Any]]:
        async with AsyncKvrelayClient(server, **connection) as client:

            async def one(prompt: CliPrompt, p: Any) -> dict[str, Any]:
                r = await client.generate(
                    prompt,
                    max_tokens=p.max_tokens,
                    temperature=p.temperature,
                    top_p=p.top_p,
                    top_k=p.top_k,
                    min_p=p.min_p,
                    seed=p.seed,
                    stop=p.stop,
                    stop_token_ids=p.stop_token_ids,
                    ignore_eos=p.ignore_eos,
                    logprobs=p.logprobs,
                    repetition_penalty=p.repetition_penalty,
                    presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                )
                usage = r.usage
                return {
                    "token_ids": list(r.token_ids),
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "cached_prompt_tokens": usage.cached_prompt_tokens if usage else 0,
                }

            return await asyncio.gather(
                *(one(prompt, p) for (prompt, _), p in zip(items, params, strict=True))
            )

    try:
        return asyncio.run(run())
    except KvrelayError as e:
        raise CliError(f"--server {server}: {e.code.name}: {e.details}") from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvrelay.worker.bench.engine import run_engine_bench
    from kvrelay.worker.config import resolve_device

    on_gpu = resolve_device(args.device).type == "cuda"
    default_batches = "1,8,32,64,128,256" if on_gpu else "1,8,32"
    config = _engine_config(args)
    run_engine_bench(
        config,
        models=args.models.split(",") if args.models else None,
        batch_sizes=_parse_ids(args.batch_sizes or default_batches, "--batch-sizes"),
        contexts=_parse_ids(args.contexts, "--contexts"),
        prompt_len=args.prompt_len,
        decode_steps=args.decode_steps,
        hf=not args.no_hf,
        hf_batches=_parse_ids(args.hf_batches, "--hf-batches"),
        hf_contexts=_parse_ids(args.hf_contexts, "--hf-contexts"),
        ttft_lens=_parse_ids(args.ttft_lens, "--ttft-lens"),
        mixed_step=_mixed_step(args.mixed_step),
        json_path=args.json,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "serve":
            from kvrelay.cluster.serve import run_serve

            return run_serve(args)
        if args.command == "litmus":
            from kvrelay.memory_model.verify.litmus import run_litmus

            return run_litmus(args)
        if args.command == "check-protocol":
            from kvrelay.memory_model.verify.checker import run_checker

            names = args.variants.split(",") if args.variants else None
            return run_checker(names, show_traces=args.traces)
        if args.bench_command == "disagg":
            from kvrelay.cluster.bench.disagg import run_bench_disagg

            return run_bench_disagg(args)
        if args.bench_command == "router":
            from kvrelay.cluster.bench.router import run_bench_router

            return run_bench_router(args)
        if args.bench_command == "handoff":
            from kvrelay.memory_model.verify.bench_handoff import run_bench_handoff

            return run_bench_handoff(args)
        if args.bench_command == "serve":
            from kvrelay.cluster.bench.serve import run_bench_serve

            return run_bench_serve(args)
        return _cmd_bench(args)
    except (CliError, ValueError) as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # anything else is our bug: one line for the user, the traceback with -v
        log.debug("unhandled error", exc_info=True)
        print(
            f"kvrelay: internal error: {type(e).__name__}: {e} (rerun with -v for details)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
