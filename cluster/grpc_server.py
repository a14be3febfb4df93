"""The gRPC servers around a `GenerationRouter`: the API port (Generation, health, reflection;
TLS and token auth from `cluster/auth.py`; explicit size and concurrency limits), and an
optional plaintext health-only port for probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvrelay.proto import kvrelay_pb2 as pb

from .auth import ServerSecurity, load_security
from .config import ServerConfig
from .router import _UNPARSABLE, SERVICE_NAME, GenerationRouter

# RPCs the server runs at once beyond max_queued_requests: health probes, stats, and calls that
# are about to be refused, so those still get an answer under full load.
_CONTROL_RPC_HEADROOM = 64
_HANDSHAKE_TIMEOUT_MS = 10_000
_MIN_PENDING_REQUESTS = 8192  # calls gRPC core holds for the handlers before it sheds any  # a peer that opens a connection and stalls the TLS handshake


def build_server(
    router: GenerationRouter,
    config: ServerConfig,
    security: ServerSecurity | None = None,
    *,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with the Generation, health and reflection services, bound to
    config.host:config.port (0: any free port); returns it (not started) and the bound port.
    security: TLS credentials and token check (default: `load_security(config)`).
    reuse_port: share the port with the other router processes (SO_REUSEPORT: the kernel spreads
    connections over them); off, a second server on the same port fails to bind."""
    if security is None:
        security = load_security(config)
    limit = config.max_message_bytes
    pending = max(_MIN_PENDING_REQUESTS, 4 * config.max_concurrent_streams)
    server = grpc.aio.server(
        interceptors=security.interceptors,
        options=[
            # Larger messages fail in gRPC itself with RESOURCE_EXHAUSTED, before any handler runs.
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_metadata_size", config.max_metadata_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.server_handshake_timeout_ms", _HANDSHAKE_TIMEOUT_MS),
            # gRPC core cancels calls that wait for the application to pick them up once more
            # than max_pending_requests (default 1000) wait, at random up to the hard limit: at
            # 2,000 simultaneous streams ~6% read CANCELLED with no handler run (issue 14). Past
            # these limits a call still reads CANCELLED; docs/ROUTERS.md.
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
            # Without 0 a second server on the same port would share it silently (Linux).
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
        # Past this many RPCs at once gRPC answers RESOURCE_EXHAUSTED before any handler runs.
        maximum_concurrent_rpcs=config.max_queued_requests + _CONTROL_RPC_HEADROOM,
    )
    server.add_generic_rpc_handlers((_generation_handler(router),))
    health_pb2_grpc.add_HealthServicer_to_server(router.health, server)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = format_address(config.host, config.port)
    try:
        if security.credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, security.credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ValueError(f"port: cannot listen on {address} (in use, or not an address of this host)")
    return server, port


def build_health_server(router: GenerationRouter, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with the health service alone (the router's, so it reports the same
    status), for probes that cannot present TLS or a token. Nothing else is reachable on it."""
    return build_health_only(router.health, host, port)


def build_health_only(servicer: Any, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """`build_health_server` over any grpc.health.v1 servicer (the controller of several router
    processes has its own, SERVING only while every router is)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ValueError(f"health_port: cannot listen on {address} (in use, or not an address of this host)")
    return server, bound


def _generation_handler(router: GenerationRouter) -> grpc.GenericRpcHandler:
    """The Generation service as `add_GenerationServicer_to_server` builds it, but with deserializers
    that yield _UNPARSABLE for bytes that do not parse, which the handlers refuse as INVALID_ARGUMENT."""

    def parse(cls: Any) -> Callable[[bytes], object]:
        def deserialize(data: bytes) -> object:
            try:
                return cls.FromString(data)
            except Exception:  # DecodeError, or a nesting/UTF-8 error: the bytes are the problem
                return _UNPARSABLE

        return deserialize

    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            router.Generate,
            request_deserializer=parse(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            router.GetModelInfo,
            request_deserializer=parse(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
        "GetServerStats": grpc.unary_unary_rpc_method_handler(
            router.GetServerStats,
            request_deserializer=parse(pb.GetServerStatsRequest),
            response_serializer=pb.ServerStats.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def format_address(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
