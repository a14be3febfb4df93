"""Who may call the router: TLS (optionally mutual) on the connection, a bearer token on each call.

TLS is configured by `TlsConfig` (cluster/config.py). A plaintext client, or under mTLS a client
without a certificate signed by `client_ca_file`, fails in the TLS handshake: gRPC reports it to
the client as UNAVAILABLE and no handler runs.

Tokens come from `auth_token_file` (one a line; blank lines and `#` comments ignored) or, when no
file is configured, from the environment variable KVRELAY_AUTH_TOKENS (comma-separated); with
neither, calls are not authenticated. A client sends `authorization: Bearer <token>`. The check
runs in a server interceptor, before the request message is read or parsed, so an unauthenticated
call costs no validation, tokenization or worker call; it ends with UNAUTHENTICATED. Tokens are
compared as SHA-256 digests with `hmac.compare_digest`, against every configured token (no early
exit), so timing reveals neither a token's bytes nor its length nor which token matched.

Open without a token: `grpc.health.v1.Health` only, so load balancers and Kubernetes probes need
no secret (it tells whether the server is SERVING, nothing more). Server reflection needs the token
like the Generation service: it lists the API, which an unauthenticated caller has no use for.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .config import ServerConfig, TlsConfig

log = logging.getLogger("kvrelay")

TOKENS_ENV = "KVRELAY_AUTH_TOKENS"
# Shorter tokens are guessable online; 16 characters is the floor, 32+ random bytes the advice.
MIN_TOKEN_LEN = 16
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
UNAUTHENTICATED_MESSAGE = "missing or invalid token: send the metadata 'authorization: Bearer <token>'"
_REFUSAL_LOG_INTERVAL_S = 10.0


class TokenSet:
    """The accepted bearer tokens, kept as SHA-256 digests only."""

    def __init__(self, tokens: Sequence[str]) -> None:
        assert tokens, "an empty token set would refuse every call"
        self._digests = tuple(_digest(t) for t in tokens)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> bool:
        """Whether presented is one of the tokens; compares against all of them every time."""
        if presented is None:
            return False
        digest = _digest(presented)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        return ok


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def load_tokens(token_file: str | None, environ: Mapping[str, str] | None = None) -> TokenSet | None:
    """The tokens of token_file, else of $KVRELAY_AUTH_TOKENS; None when neither is set (no auth).
    ValueError names the file (or variable) and the line; it never quotes a token."""
    env = os.environ if environ is None else environ
    from_env = env.get(TOKENS_ENV)
    if token_file is not None:
        if from_env:
            raise ValueError(f"auth_token_file and ${TOKENS_ENV} are both set: use one")
        return TokenSet(_tokens_of_file(Path(token_file)))
    if from_env is None:
        return None
    tokens = [t.strip() for t in from_env.split(",") if t.strip()]
    if not tokens:
        raise ValueError(f"${TOKENS_ENV} is set but holds no tokens (comma-separated)")
    for i, t in enumerate(tokens, 1):
        _check_token(t, f"${TOKENS_ENV} token {i}")
    return TokenSet(tokens)


def _tokens_of_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ValueError(f"auth_token_file: cannot read {path}: {why}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("auth_token_file %s is readable by other users: chmod 600 it", path)
    tokens = []
    for n, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if token and not token.startswith("#"):
            _check_token(token, f"auth_token_file {path} line {n}")
            tokens.append(token)
    if not tokens:
        raise ValueError(f"auth_token_file: {path} holds no tokens (one a line; # starts a comment)")
    return tokens


def _check_token(token: str, where: str) -> None:
    # gRPC metadata values are printable ASCII; a space would split "Bearer <token>".
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{where}: a token must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_LEN:
        raise ValueError(f"{where}: a token must be at least {MIN_TOKEN_LEN} characters, got {len(token)}")


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid token, except the methods under `open_prefixes`."""

    def __init__(self, tokens: TokenSet, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        self._tokens = tokens
        self._open_prefixes = open_prefixes
        self._refused_since_log = 0
        self._last_log = -_REFUSAL_LOG_INTERVAL_S

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if method.startswith(self._open_prefixes) or self._tokens.check(bearer_token(metadata)):
            return await continuation(handler_call_details)
        self._note_refusal(method)
        # A stream-stream handler with no deserializer aborts before reading the request at all;
        # gRPC accepts it for a call of any arity.
        return grpc.stream_stream_rpc_method_handler(_deny)

    def _note_refusal(self, method: str) -> None:
        """A warning at most every few seconds, so a flood of bad calls cannot flood the log."""
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= _REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d unauthenticated call(s) in the last %.0f s (latest: %s)",
                self._refused_since_log, min(now - self._last_log, 1e9), method[:128],
            )  # fmt: skip
            self._refused_since_log = 0
            self._last_log = now


async def _deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """gRPC server credentials of tls (None: plaintext). Every file is loaded and checked here, so a
    bad one is a ValueError naming its key at start-up, not a failed handshake later."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    cert = _read("tls.cert_file", tls.cert_file)
    key = _read("tls.key_file", tls.key_file)
    ca = _read("tls.client_ca_file", tls.client_ca_file) if tls.client_ca_file is not None else None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A callback password: an encrypted key fails here instead of prompting on the terminal.
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise ValueError(
            f"tls.key_file: cannot use it with tls.cert_file ({_ssl_reason(e)}); both must be PEM, the key "
            "unencrypted and matching the certificate"
        ) from None
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls.client_ca_file: not PEM CA certificates ({_ssl_reason(e)})") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=tls.client_cert_required
    )


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path}: {e.strerror}") from None


def _ssl_reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__)


@dataclass(frozen=True)
class ServerSecurity:
    """What `build_server` applies: credentials for the port and interceptors for every call."""

    credentials: grpc.ServerCredentials | None  # None: plaintext
    tokens: TokenSet | None  # None: no token needed

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tokens is None else [BearerAuthInterceptor(self.tokens)]


def load_security(config: ServerConfig, environ: Mapping[str, str] | None = None) -> ServerSecurity:
    """Reads the TLS files and the tokens of config (ValueError naming the key on any problem), and
    warns when a non-loopback address would be served without TLS or tokens."""
    security = ServerSecurity(server_credentials(config.tls), load_tokens(config.auth_token_file, environ))
    missing = [
        what
        for what, on in (("TLS", security.credentials is not None), ("tokens", security.tokens is not None))
        if not on
    ]
    if missing and not _is_loopback(config.host):
        log.warning(
            "serving on %s without %s: anyone who reaches the port can use it (docs/SECURITY.md)",
            config.host, " or ".join(missing),
        )  # fmt: skip
    return security


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
