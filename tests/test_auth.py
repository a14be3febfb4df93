"""cluster/auth.py: tokens, TLS and mTLS on a served router, refused calls never reaching a worker.

Certificates are minted here with `cryptography` (EC P-256, SAN localhost and 127.0.0.1): one CA
signs the server's and a client's certificate, a second CA signs an impostor client's.

`secure` is an in-process router over the fake pool (TLS + required client certificates + tokens);
the last test runs `kvrelay serve` with the same flags over the real Ray pool.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_pool import FakePool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ray_helpers import LoopThread

from kvrelay.cluster.auth import (
    TOKENS_ENV,
    UNAUTHENTICATED_MESSAGE,
    ServerSecurity,
    TokenSet,
    bearer_token,
    load_security,
    load_tokens,
    server_credentials,
)
from kvrelay.cluster.client import (
    KvrelayClient,
    Unauthenticated,
    Unavailable,
    channel_credentials,
    connection_kwargs,
)
from kvrelay.cluster.config import TlsConfig, load_config
from kvrelay.cluster.grpc_server import build_health_server, build_server
from kvrelay.cluster.router import GenerationRouter

TOKEN = "tok-0123456789abcdef"
OTHER_TOKEN = "tok-fedcba9876543210"
GENERATE = "/kvrelay.v1.Generation/Generate"


# ---- certificates ------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    impostor_cert: Path  # signed by another CA
    impostor_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_cn, issuer_key = issuer if issuer is not None else (cn, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None, key: ec.EllipticCurvePrivateKey | None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def make_pki(d: Path) -> Pki:
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "other", "srv", "cli", "imp")}
    ca = _cert("kvrelay-test-ca", keys["ca"], None, ca=True)
    return Pki(
        ca=_write(d / "ca.pem", ca, None),
        server_cert=_write(d / "server.pem", _cert("localhost", keys["srv"], ("kvrelay-test-ca", keys["ca"]), False), None),
        server_key=_write(d / "server.key", None, keys["srv"]),
        client_cert=_write(d / "client.pem", _cert("client", keys["cli"], ("kvrelay-test-ca", keys["ca"]), False), None),
        client_key=_write(d / "client.key", None, keys["cli"]),
        impostor_cert=_write(d / "imp.pem", _cert("client", keys["imp"], ("other-ca", keys["other"]), False), None),
        impostor_key=_write(d / "imp.key", None, keys["imp"]),
    )  # fmt: skip


# ---- tokens and credentials, no server -----------------------------------------------------
def test_token_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# ops\n\n  {TOKEN}  \n# old: {OTHER_TOKEN}\n", encoding="utf-8")
    tokens = load_tokens(str(path), environ={})
    assert tokens is not None and len(tokens) == 1
    assert tokens.check(TOKEN)
    assert not tokens.check(OTHER_TOKEN)  # commented out


def test_tokens_from_the_environment() -> None:
    assert load_tokens(None, environ={}) is None  # no auth
    tokens = load_tokens(None, environ={TOKENS_ENV: f" {TOKEN}, ,{OTHER_TOKEN}"})
    assert tokens is not None and len(tokens) == 2
    assert tokens.check(TOKEN) and tokens.check(OTHER_TOKEN)
    assert not tokens.check(TOKEN[:-1]) and not tokens.check(TOKEN + "x") and not tokens.check(None)


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("# nothing\n\n", {}, "auth_token_file: {path} holds no tokens"),
        ("short\n", {}, "auth_token_file {path} line 1: a token must be at least 16 characters, got 5"),
        ("# c\ntok en-0123456789abcdef\n", {}, "auth_token_file {path} line 2: a token must be printable ASCII"),
        (f"{TOKEN}\n", {TOKENS_ENV: OTHER_TOKEN}, f"auth_token_file and ${TOKENS_ENV} are both set"),
        (None, {TOKENS_ENV: " , "}, f"${TOKENS_ENV} is set but holds no tokens"),
        (None, {TOKENS_ENV: f"{TOKEN},ab"}, f"${TOKENS_ENV} token 2: a token must be at least 16"),
    ],
)  # fmt: skip
def test_token_errors_name_the_source_never_the_token(
    tmp_path: Path, content: str | None, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_tokens(str(path) if content is not None else None, environ=env)
    assert str(e.value).startswith(message.format(path=path)), str(e.value)
    assert "en-0123" not in str(e.value) and OTHER_TOKEN not in str(e.value)


def test_bearer_metadata() -> None:
    assert bearer_token([("authorization", f"Bearer {TOKEN}")]) == TOKEN
    assert bearer_token([("x", "y"), ("authorization", f"bearer {TOKEN}")]) == TOKEN
    assert bearer_token([("authorization", f"Basic {TOKEN}")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token(None) is None


def test_tls_files_are_checked_at_start_up(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    good = TlsConfig(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    assert server_credentials(good) is not None
    assert server_credentials(TlsConfig()) is None
    cases = [
        (TlsConfig(str(tmp_path / "nope.pem"), str(pki.server_key)), "tls.cert_file: cannot read"),
        (TlsConfig(str(pki.server_cert), str(pki.client_key)), "tls.key_file: cannot use it with tls.cert_file"),
        (TlsConfig(str(pki.server_cert), str(pki.server_key), str(pki.server_key)), "tls.client_ca_file: not PEM"),
    ]  # fmt: skip
    for tls, message in cases:
        with pytest.raises(ValueError) as e:
            server_credentials(tls)
        assert str(e.value).startswith(message), str(e.value)


def test_client_tls_arguments(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    assert channel_credentials(None) is None
    assert channel_credentials(pki.ca, client_cert=pki.client_cert, client_key=pki.client_key) is not None
    with pytest.raises(ValueError, match="tls_client_cert and tls_client_key go together"):
        channel_credentials(pki.ca, client_cert=pki.client_cert)
    with pytest.raises(ValueError, match="tls_root_cert: cannot read"):
        channel_credentials(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="tls_server_name needs TLS"):
        KvrelayClient("127.0.0.1:1", tls_server_name="localhost")
    with pytest.raises(ValueError, match="token must be a non-empty string of printable ASCII"):
        KvrelayClient("127.0.0.1:1", token="two words")
    token_file = tmp_path / "t"
    token_file.write_text(f"{TOKEN}\n", encoding="utf-8")
    args: Any = type("Args", (), {"token_file": str(token_file), "tls_root_cert": str(pki.ca)})()
    assert connection_kwargs(args, environ={"KVRELAY_TOKEN": OTHER_TOKEN}) == {
        "token": TOKEN,
        "tls_root_cert": str(pki.ca),
        "tls_client_cert": None,
        "tls_client_key": None,
    }


# ---- a served router: TLS, mTLS and tokens -----------------------------------------------
@dataclass
class Secure:
    lt: LoopThread
    pool: FakePool
    router: GenerationRouter
    grpc_server: Any
    address: str
    pki: Pki

    def client(
        self, *, token: str | None = TOKEN, cert: Path | None = None, key: Path | None = None
    ) -> KvrelayClient:
        cert, key = (self.pki.client_cert, self.pki.client_key) if cert is None else (cert, key)
        return KvrelayClient(
            self.address, token=token, tls_root_cert=self.pki.ca, tls_client_cert=cert, tls_client_key=key,
            timeout=30.0,
        )  # fmt: skip

    def seen(self) -> tuple[int, int]:
        """(requests the router opened, requests any worker was sent)."""
        submitted = sum(len(ids) for w in self.pool.workers for ids in w.submitted)
        return self.router._num_requests_total, submitted


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n", encoding="utf-8")
    tokens.chmod(0o600)
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "client_ca_file": str(pki.ca)}
    config = load_config(None, {"port": 0, "auth_token_file": str(tokens), "tls": tls})
    lt, pool = LoopThread(), FakePool(1, num_kv_blocks=64)

    async def start() -> Secure:
        router = GenerationRouter(pool, config)
        await router.start()
        server, port = build_server(router, config, load_security(config, environ={}))
        await server.start()
        return Secure(lt, pool, router, server, f"127.0.0.1:{port}", pki)

    s = lt.run(start())
    yield s
    lt.run(s.grpc_server.stop(0))
    lt.run(s.router.stop())
    lt.close()


def test_authenticated_client_over_mtls(secure: Secure) -> None:
    with secure.client() as c:
        result = c.generate([1, 2, 3], max_tokens=4, ignore_eos=True)
        assert (len(result.token_ids), result.finish_reason) == (4, "length")
        assert c.model_info().vocab_size == 320
        assert c.server_stats().num_requests_total >= 1


def test_tls_handshake_failures_are_unavailable_and_reach_no_worker(secure: Secure) -> None:
    before = secure.seen()
    plaintext = KvrelayClient(secure.address, token=TOKEN, timeout=10.0)
    no_cert = KvrelayClient(secure.address, token=TOKEN, tls_root_cert=secure.pki.ca, timeout=10.0)
    impostor = secure.client(cert=secure.pki.impostor_cert, key=secure.pki.impostor_key)
    for c in (plaintext, no_cert, impostor):
        with c, pytest.raises(Unavailable):
            c.generate([1, 2, 3], max_tokens=2)
    assert secure.seen() == before


@pytest.mark.parametrize("token", [None, OTHER_TOKEN, TOKEN + "x"], ids=["missing", "wrong", "longer"])
def test_bad_token_is_unauthenticated_before_any_work(secure: Secure, token: str | None) -> None:
    before = secure.seen()
    with secure.client(token=token) as c:
        for call in (lambda: c.generate("hello", max_tokens=2), c.model_info, c.server_stats):
            with pytest.raises(Unauthenticated) as e:
                call()
            assert e.value.details == UNAUTHENTICATED_MESSAGE
    assert secure.seen() == before


def test_unauthenticated_bytes_are_never_parsed(secure: Secure) -> None:
    """Garbage that would be INVALID_ARGUMENT with a token is UNAUTHENTICATED without one."""
    creds = channel_credentials(
        secure.pki.ca, client_cert=secure.pki.client_cert, client_key=secure.pki.client_key
    )
    assert creds is not None
    with grpc.secure_channel(secure.address, creds) as channel:
        raw = channel.unary_stream(GENERATE)
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\xff\xff\xff", timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\xff\xff\xff", timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "request: not a valid kvrelay.v1.GenerateRequest message"


def test_health_is_open_reflection_is_not(secure: Secure) -> None:
    creds = channel_credentials(
        secure.pki.ca, client_cert=secure.pki.client_cert, client_key=secure.pki.client_key
    )
    assert creds is not None
    with grpc.secure_channel(secure.address, creds) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        status = check(health_pb2.HealthCheckRequest(service="kvrelay.v1.Generation"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        info = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        with pytest.raises(grpc.RpcError) as e:
            list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_health_port_serves_probes_and_nothing_else(secure: Secure) -> None:
    """What Kubernetes' grpc probe needs when the main port has mTLS: health, in plaintext,
    without a token; Generate is not served there at all."""
    server, port = secure.lt.run(_health_server(secure))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            status = check(health_pb2.HealthCheckRequest(service="kvrelay.v1.Generation"), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                list(channel.unary_stream(GENERATE)(b"", timeout=10))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        secure.lt.run(server.stop(0))


async def _health_server(secure: Secure) -> tuple[Any, int]:
    server, port = build_health_server(secure.router, "127.0.0.1", 0)
    await server.start()
    return server, port


def test_http_api_uses_the_same_tls_client_ca_and_tokens(secure: Secure) -> None:
    """HTTPS with the gRPC port's certificate; a client certificate from the same CA is required;
    the same bearer token is checked before the body is read (401 in OpenAI's error JSON)."""
    import ssl

    import httpx

    from kvrelay.cluster.http_server import HttpServer

    security = load_security(secure.router.config, environ={})
    http = HttpServer(secure.router, secure.router.config, security, port=0)
    port = secure.lt.run(http.start())
    try:
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(secure.pki.ca))
        ctx.load_cert_chain(str(secure.pki.client_cert), str(secure.pki.client_key))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, verify=ctx, timeout=30) as c:
            assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
            r = c.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True},
                headers=auth,
            )
            assert (r.status_code, r.json()["usage"]["completion_tokens"]) == (200, 4)
            before = secure.seen()
            refused = c.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": [1]},
                headers={"Authorization": "Bearer " + OTHER_TOKEN},
            )
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert secure.seen() == before  # no work for a refused call
            assert c.get("/health").status_code == 200  # open, like gRPC health
        no_cert = ssl.create_default_context(cafile=str(secure.pki.ca))
        with httpx.Client(base_url=url, verify=no_cert, timeout=30) as c, pytest.raises(httpx.HTTPError):
            c.get("/health")
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c,
            pytest.raises(httpx.HTTPError),
        ):
            c.get("/health")  # plaintext to the TLS port
    finally:
        secure.lt.run(http.stop())


def test_no_security_configured_is_plaintext_and_open() -> None:
    security = load_security(load_config(None), environ={})
    assert security == ServerSecurity(None, None)
    assert security.interceptors == []
    assert isinstance(load_security(load_config(None), environ={TOKENS_ENV: TOKEN}).tokens, TokenSet)


# ---- `kvrelay serve` over the real Ray pool ----------------------------------------------
def test_served_over_ray_refuses_before_any_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from test_serve import ServeProcess

    pki = make_pki(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# test\n{TOKEN}\n", encoding="utf-8")
    monkeypatch.delenv(TOKENS_ENV, raising=False)  # the server process inherits the environment
    p = ServeProcess(
        ["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--device", "cpu", "--num-kv-blocks", "64",
         "--dtype", "float32", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--tls-client-ca", str(pki.ca), "--auth-token-file", str(tokens)]
    )  # fmt: skip
    try:
        address = p.wait_ready(180)

        def client(**kw: Any) -> KvrelayClient:
            args = {
                "tls_root_cert": pki.ca,
                "tls_client_cert": pki.client_cert,
                "tls_client_key": pki.client_key,
            }
            return KvrelayClient(address, timeout=30.0, **{**args, **kw})

        refused: list[tuple[dict[str, Any], type[Exception]]] = [
            ({"token": OTHER_TOKEN}, Unauthenticated),
            ({}, Unauthenticated),
            ({"token": TOKEN, "tls_client_cert": pki.impostor_cert, "tls_client_key": pki.impostor_key}, Unavailable),
        ]  # fmt: skip
        for kw, error in refused:
            with client(**kw) as c, pytest.raises(error):
                c.generate([1, 2, 3], max_tokens=2)
        with client(token=TOKEN) as c:
            stats = c.server_stats()
            assert stats.num_requests_total == 0
            assert [(w.num_running, w.num_waiting, w.prefix_cache_queries) for w in stats.workers] == [
                (0, 0, 0)
            ]
            assert len(c.generate([1, 2, 3], max_tokens=4, ignore_eos=True).token_ids) == 4
            assert c.server_stats().num_requests_total == 1
        assert not any(TOKEN in line for line in p.stderr)
    finally:
        p.kill()


def test_two_router_processes_serve_tls_and_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvrelay serve --router-processes 2` with mTLS and tokens: each router serves over TLS with
    the token (the exact tokens, counted by that router alone), and refuses a missing or wrong
    token; plaintext and an impostor's certificate are refused on every connection."""
    pytest.importorskip("ray")
    from engine_helpers import make_engine
    from router_helpers import OWN_CONNECTION, controller_routers, spread_clients
    from test_serve import ServeProcess

    from kvrelay.worker.sampling_params import SamplingParams

    pki = make_pki(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n", encoding="utf-8")
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    p = ServeProcess(
        ["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--device", "cpu", "--num-kv-blocks", "64",
         "--dtype", "float32", "--router-processes", "2", "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca), "--auth-token-file", str(tokens)]
    )  # fmt: skip
    clients: list[tuple[KvrelayClient, int]] = []
    try:
        address = p.wait_ready(180)
        port = int(address.rsplit(":", 1)[1])
        pids = controller_routers(p.proc.pid)
        assert len(pids) == 2, pids

        def client(**kw: Any) -> KvrelayClient:
            args = {
                "tls_root_cert": pki.ca,
                "tls_client_cert": pki.client_cert,
                "tls_client_key": pki.client_key,
                "channel_options": OWN_CONNECTION,
            }
            return KvrelayClient(address, timeout=30.0, **{**args, **kw})

        # Refused by each router: the TLS handshake succeeds, the call has no or a wrong token.
        for token in (None, OTHER_TOKEN):
            refused = spread_clients(lambda: client(token=token), pids, port)  # noqa: B023
            for c, _ in refused:
                with c, pytest.raises(Unauthenticated):
                    c.generate([1, 2, 3], max_tokens=2)
        # Refused at the handshake, whichever router the connection reaches (8: both, but for 2**-7).
        for kw in ({"tls_root_cert": None, "tls_client_cert": None, "tls_client_key": None},
                   {"tls_client_cert": pki.impostor_cert, "tls_client_key": pki.impostor_key}):  # fmt: skip
            for _ in range(8):
                with client(token=TOKEN, **kw) as c, pytest.raises(Unavailable):
                    c.generate([1, 2, 3], max_tokens=2)
        clients = spread_clients(lambda: client(token=TOKEN), pids, port, at_least=4)
        via = {pid: c for c, pid in clients}
        assert all(c.server_stats().num_requests_total == 0 for c in via.values()), "refused calls ran"
        expected = make_engine(num_kv_blocks=64).generate(
            [[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True)
        )
        for c, _ in clients:
            assert (
                list(c.generate([1, 2, 3], max_tokens=4, ignore_eos=True).token_ids) == expected[0].token_ids
            )
        counts = {pid: sum(1 for _, q in clients if q == pid) for pid in pids}
        assert {pid: c.server_stats().num_requests_total for pid, c in via.items()} == counts
        assert not any(TOKEN in line for line in p.stderr)
    finally:
        for c, _ in clients:
            c.close()
        p.kill()
