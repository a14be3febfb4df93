"""`kvrelay serve`: a Ray worker pool behind the gRPC router, until SIGTERM/SIGINT drains it.

    kvrelay serve [--config FILE] [--model PATH|tiny] [--host HOST] [--port PORT] [--workers N]
                  [--device auto|cpu|cuda] [--ray-address ADDR] [--metrics-port PORT] [--http-port PORT]
                  [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--auth-token-file FILE] ...

TLS, client certificates and bearer tokens: cluster/auth.py and docs/SECURITY.md. Their files are
read before anything starts, so a bad one is a one-line error naming its key.

Start-up: the pool (one worker actor per GPU, or N CPU workers; a local Ray cluster unless
`--ray-address`), then the tokenizer, then the gRPC server and, with `--http-port`, the OpenAI HTTP
API (cluster/http_server.py) on the same event loop; when both accept calls, exactly one line
`kvrelay serving on HOST:PORT` (the gRPC address) goes to stdout, then `kvrelay http on HOST:PORT`
when HTTP is on (logs go to stderr).

Shutdown, on SIGTERM or SIGINT: health turns NOT_SERVING (HTTP /health 503) and new calls get
UNAVAILABLE (HTTP 503) at once; open streams of both protocols run on for up to `drain_grace_s` (a
second signal cuts the grace short), the rest end with UNAVAILABLE; then the servers and the pool
stop and the process exits 0.

With `--router-processes N` (N > 1; `auto` picks by cores) this process is the controller of N
router processes on the same ports instead (cluster/router_procs.py, docs/ROUTERS.md).

`add_serve_args` and `run_serve` are what `kvrelay/cli.py` wires; `python -m kvrelay.cluster.serve`
runs the same command standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEVICES, ServerConfig, load_config

if TYPE_CHECKING:
    from .auth import ServerSecurity
    from .http_server import HttpServer
    from .interfaces import WorkerPool

log = logging.getLogger("kvrelay")

# flag dest -> where it lands in the config (a top-level key, or ("engine", key))
_TOP_LEVEL_FLAGS = (
    "model", "host", "port", "workers", "prefill_workers", "decode_workers", "device", "ray_address",
    "metrics_port", "health_port", "http_port", "max_queued_requests", "max_queued_tokens", "max_message_bytes", "drain_grace_s",
    "default_max_tokens", "auth_token_file", "max_restarts", "gpus_per_worker", "router_processes",
    "stream_interval",
)  # fmt: skip
# A signal this soon after the first is the same request delivered twice (a wrapper such as
# `timeout` signals both its child and its process group), not a second Ctrl-C.
_SECOND_SIGNAL_MIN_GAP_S = 1.0
_ENGINE_FLAGS = ("dtype", "num_kv_blocks", "kv_cache_memory", "max_model_len", "max_num_seqs", "block_size")
_TLS_FLAGS = {"tls_cert": "cert_file", "tls_key": "key_file", "tls_client_ca": "client_ca_file"}


def add_serve_args(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the `serve` subcommand to an argparse subparsers object; returns its parser.
    Every flag defaults to None so that only flags given on the command line override the file."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="serve the kvrelay.v1 gRPC API on a Ray worker pool"
    )
    p.add_argument("--config", type=Path, default=None, help="YAML file; flags override its keys")
    p.add_argument("--model", help="local Hugging Face-format model dir, or 'tiny' (default)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 50051; 0: any free port)")
    p.add_argument("--workers", type=int, help="worker actors (default: one per GPU, or 1 CPU worker)")
    p.add_argument(
        "--prefill-workers",
        type=int,
        help="disaggregated serving: workers that compute prompts and hand their KV over",
    )
    p.add_argument(
        "--decode-workers", type=int, help="disaggregated serving: workers that receive KV and stream tokens"
    )
    p.add_argument("--device", choices=DEVICES, help="auto (default): cuda where a GPU is visible, else cpu")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on HOST:PORT")
    p.add_argument(
        "--http-port", type=int, help="serve the OpenAI-compatible HTTP API on HOST:PORT (0: any free port)"
    )
    p.add_argument("--health-port", type=int, help="plaintext gRPC health-only port (probes, when TLS is on)")
    p.add_argument("--max-queued-requests", type=int, help="requests in flight before RESOURCE_EXHAUSTED")
    p.add_argument("--max-queued-tokens", type=int, help="tokens (prompt + max_tokens) in flight, likewise")
    p.add_argument("--max-message-bytes", type=int, help="gRPC message size limit")
    p.add_argument("--drain-grace-s", type=float, help="how long open streams may run after SIGTERM")
    p.add_argument("--default-max-tokens", type=int, help="max_tokens of requests that leave it 0")
    p.add_argument(
        "--auth-token-file", help="bearer tokens, one a line (default: $KVRELAY_AUTH_TOKENS, else no auth)"
    )
    p.add_argument("--tls-cert", help="serve TLS with this PEM certificate chain (needs --tls-key)")
    p.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="require client certificates signed by these PEM CAs (mTLS)")
    p.add_argument(
        "--router-processes",
        type=_router_processes,
        help="router processes sharing the ports (SO_REUSEPORT): N, or auto (default: 1 up to 4 "
        "cores, else min(cores // 4, 8)); docs/ROUTERS.md",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        help="tokens a stream gathers per response after its first (default 1: every token at once; "
        "larger cuts the router's and clients' CPU per token)",
    )
    p.add_argument("--max-restarts", type=int, help="restarts per worker actor before it stays down")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPU share of a worker actor, in (0, 1] (default 1; below 1 needs --kv-cache-memory)",
    )
    p.add_argument("--dtype", help="engine dtype: auto, float32, bfloat16, float16")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks per worker (default: sized from memory)")
    p.add_argument("--kv-cache-memory", type=int, help="KV cache bytes per worker")
    p.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, help="sequences per engine step")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    return p


def _router_processes(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config file (if any) with every flag that was given on top."""
    overrides: dict[str, Any] = {
        k: getattr(args, k) for k in _TOP_LEVEL_FLAGS if getattr(args, k, None) is not None
    }
    engine = {k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k, None) is not None}
    if engine:
        overrides["engine"] = engine
    tls = {
        key: getattr(args, dest) for dest, key in _TLS_FLAGS.items() if getattr(args, dest, None) is not None
    }
    if tls:
        overrides["tls"] = tls
    return load_config(getattr(args, "config", None), overrides)


def run_serve(args: argparse.Namespace) -> int:
    """`kvrelay serve`: blocks until drained; returns the exit status. Bad configuration raises
    ValueError (the message names the key), which the CLI prints as one line."""
    config = config_from_args(args)
    from .auth import load_security

    security = load_security(config)  # before Ray starts: a bad file or token fails in a second
    return asyncio.run(serve(config, security=security))


def resolve_workers(config: ServerConfig) -> tuple[int, str]:
    """(number of workers, "cpu" or "cuda"): one per visible GPU by default, else one CPU worker."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0 and config.ray_address is None:
        raise ValueError("--device cuda: no CUDA GPU is visible here")
    workers = config.workers
    if workers is None:
        workers = int(gpus / config.gpus_per_worker) if device == "cuda" and gpus > 0 else 1
    return workers, device


def make_pool(config: ServerConfig) -> WorkerPool:
    """Colocated workers, or prefill + decode workers (disaggregated: cluster/disagg.py)."""
    from .pool import RayWorkerPool

    if config.prefill_workers is None and config.decode_workers is None:
        num_workers, device = resolve_workers(config)
        log.info("starting %d %s workers of %s", num_workers, device, config.engine.model)
        return RayWorkerPool(
            config.engine,
            num_workers,
            device,
            config.ray_address,
            config.max_restarts,
            gpus_per_worker=config.gpus_per_worker,
        )
    if not config.prefill_workers or not config.decode_workers:
        raise ValueError(
            "prefill_workers and decode_workers: give both, each >= 1, for disaggregated serving"
        )
    from .disagg import DisaggregatedPool

    _, device = resolve_workers(config)
    log.info(
        "starting %d prefill + %d decode %s workers of %s",
        config.prefill_workers,
        config.decode_workers,
        device,
        config.engine.model,
    )
    return DisaggregatedPool(
        config.engine,
        config.prefill_workers,
        config.decode_workers,
        device,
        config.ray_address,
        config.max_restarts,
        gpus_per_worker=config.gpus_per_worker,
    )


async def serve(
    config: ServerConfig,
    *,
    ready: Callable[[str], None] | None = None,
    security: ServerSecurity | None = None,
    pool: WorkerPool | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain; `ready(address)` is called once serving (default:
    print the ready line). security: default `load_security(config)`, read before the pool starts.
    pool: default `make_pool(config)` (`kvrelay bench router` passes a synthetic one)."""
    # Imported here, not at module level: the CLI builds its parser from this module, and
    # `kvrelay generate` or `bench` must not need gRPC's health/reflection packages or Ray.
    from .auth import load_security
    from .grpc_server import build_health_server, build_server, format_address
    from .router import GenerationRouter

    if security is None:
        security = load_security(config)
    if pool is None:
        from .config import resolve_router_processes

        n = resolve_router_processes(config.router_processes)
        if n > 1:
            from .router_procs import serve_controller

            return await serve_controller(config, n, ready=ready)
        pool = make_pool(config)
    router = GenerationRouter(pool, config)
    signals = _Signals(asyncio.get_running_loop())
    stop_metrics: Callable[[], None] | None = None
    server = health_server = None
    http_server: HttpServer | None = None
    try:
        if not await signals.until_signal(router.start()):
            log.info("interrupted during start-up")
            return 0
        signals.install()
        server, port = build_server(router, config, security)
        await server.start()
        if config.health_port is not None:
            health_server, health_port = build_health_server(router, config.host, config.health_port)
            await health_server.start()
            log.info("gRPC health (plaintext) on %s", format_address(config.host, health_port))
        if config.metrics_port is not None:
            metrics_port, stop_metrics = router.metrics.serve_http(config.host, config.metrics_port)
            log.info("metrics on http://%s/metrics", format_address(config.host, metrics_port))
        http_line = None
        if config.http_port is not None:
            from .http_server import HttpServer

            http_server = HttpServer(router, config, security)
            http_port = await http_server.start()
            http_line = f"kvrelay http on {format_address(config.host, http_port)}"
            log.info("OpenAI HTTP API on %s://%s", http_server.scheme, format_address(config.host, http_port))
        address = format_address(config.host, port)
        if ready is not None:
            ready(address)
        else:
            print(f"kvrelay serving on {address}", flush=True)
            if http_line is not None:
                print(http_line, flush=True)
        await signals.first.wait()
        log.info("draining (grace %.1f s)", config.drain_grace_s)
        if not await signals.until_signal(router.drain(config.drain_grace_s), which=signals.second):
            log.info("second signal: ending the grace period now")
            await router.drain(0.0)
        await server.stop(1.0)
        return 0
    finally:
        signals.restore()
        if http_server is not None:
            await http_server.stop()
        if stop_metrics is not None:
            stop_metrics()
        if server is not None:
            await server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        await router.stop()
        log.info("stopped")


class _Signals:
    """SIGTERM/SIGINT as events: the first asks for a drain, the second for an end now."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.first = asyncio.Event()
        self.second = asyncio.Event()
        self._installed: list[signal.Signals] = []
        self._first_at = 0.0
        self.install()

    def install(self) -> None:
        """(Re)install the handlers: `ray.init` replaces SIGTERM's with one that kills the process."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                if sig not in self._installed:
                    self._installed.append(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if not self.first.is_set():
            log.info("got %s", sig.name)
            self._first_at = now
            self.first.set()
        elif now - self._first_at >= _SECOND_SIGNAL_MIN_GAP_S:
            log.info("got %s again", sig.name)
            self.second.set()

    async def until_signal(self, coro: Any, which: asyncio.Event | None = None) -> bool:
        """Run coro unless the event (default: the first signal) fires first: True if coro finished
        (its exception propagates), False if it was cancelled by the signal."""
        event = self.first if which is None else which
        task = asyncio.ensure_future(coro)
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    def restore(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrelay")
    add_serve_args(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except ValueError as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
