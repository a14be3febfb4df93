"""uvicorn serving the OpenAI HTTP app (cluster/http_api.py) as a task on the router's event loop,
beside the gRPC server: one process, one loop, one `RouterCore`.

The socket is bound here (so a port in use is a one-line error naming `http_port`, and port 0's
pick is known); TLS uses the gRPC side's files (`tls.cert_file`/`key_file`, and `client_ca_file`
for client certificates, required or optional as `tls.require_client_cert` says). uvicorn's own
signal handling is off: `kvrelay serve` drains on SIGTERM for both protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from .auth import ServerSecurity
from .config import ServerConfig
from .http_api import build_app
from .router_core import RouterCore

log = logging.getLogger("kvrelay")
_START_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the caller owns SIGTERM/SIGINT (drain)


class HttpServer:
    """Started with `start()` (returns the bound port), stopped with `stop()`. Built over a started
    core: the model it serves is the pool's."""

    def __init__(
        self,
        core: RouterCore,
        config: ServerConfig,
        security: ServerSecurity,
        port: int | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        """reuse_port: share the port with the other router processes (SO_REUSEPORT)."""
        self._reuse_port = reuse_port
        self._host = config.host
        self._port = config.http_port if port is None else port
        assert self._port is not None, "http_port is not set"
        app = build_app(core, core.model_name, security.tokens, config.max_message_bytes)
        tls = config.tls
        self._config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
            ssl_ca_certs=tls.client_ca_file,
            ssl_cert_reqs=(
                ssl.CERT_NONE
                if tls.client_ca_file is None
                else ssl.CERT_REQUIRED
                if tls.client_cert_required
                else ssl.CERT_OPTIONAL
            ),
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._config.is_ssl else "http"

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self._host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self._host.strip("[]"), self._port))
        except OSError as e:
            sock.close()
            raise ValueError(f"http_port: cannot listen on {self._host}:{self._port}: {e.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        port = int(sock.getsockname()[1])
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its exception, if any
                raise RuntimeError("the HTTP server stopped during start-up")
            if loop.time() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {_START_TIMEOUT_S} s")
            await asyncio.sleep(0.01)
        return port

    async def stop(self) -> None:
        """Close the listener and the open connections (after the core drained)."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._task
        self._task = None
