"""`kvrelay serve` as a subprocess with the real Ray pool: ready line, a stream, SIGTERM drain, exit 0.

Also, in-process: flags over a config file, and the flags that are accepted but refused for now.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from engine_helpers import make_engine
from ray_helpers import REPO_ROOT

from kvrelay.cluster.client import KvrelayClient, Unavailable
from kvrelay.cluster.serve import add_serve_args, config_from_args, run_serve
from kvrelay.worker.sampling_params import SamplingParams

READY_PREFIX = "kvrelay serving on "
HTTP_PREFIX = "kvrelay http on "
CONFIG = """\
port: 0
workers: 1
device: cpu
drain_grace_s: 30
metrics_port: 0
http_port: 0
engine:
  num_kv_blocks: 128
  dtype: float32
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvrelay")
    add_serve_args(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def serve_command() -> list[str]:
    """`python -m kvrelay.cli serve` once the CLI has the subcommand, else this module's own entry."""
    from kvrelay import cli

    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "serve" in subcommands.choices:
        return [sys.executable, "-m", "kvrelay.cli", "serve"]
    return [sys.executable, "-m", "kvrelay.cluster.serve"]


class ServeProcess:
    def __init__(self, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [*serve_command(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # signals for the test's process group never reach it
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.http = ""  # the HTTP API's base URL, once read from stdout
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream: object, sink: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink(line)  # type: ignore[operator]

    def wait_ready(self, timeout_s: float) -> str:
        try:
            line = self.stdout.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"no ready line in {timeout_s} s; stderr:\n{''.join(self.stderr[-30:])}"
            ) from None
        assert line.startswith(READY_PREFIX), line
        return line[len(READY_PREFIX) :].strip()

    def http_address(self) -> str:
        """The HTTP line that follows the ready line when http_port is set."""
        line = self.stdout.get(timeout=5)
        assert line.startswith(HTTP_PREFIX), line
        return line[len(HTTP_PREFIX) :].strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str]]:
    config = tmp_path_factory.mktemp("serve") / "kvrelay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    p = ServeProcess(["--config", str(config), "--host", "127.0.0.1", "--stream-interval", "3"])
    try:
        address = p.wait_ready(180)
        p.http = f"http://{p.http_address()}"
        yield p, address
    finally:
        p.kill()


def test_one_request_streams(server: tuple[ServeProcess, str]) -> None:
    _, address = server
    expected = make_engine(num_kv_blocks=64).generate(
        ["Hello"], SamplingParams(max_tokens=8, ignore_eos=True)
    )[0]
    with KvrelayClient(address, timeout=60) as c:
        chunks = list(c.stream("Hello", max_tokens=8, ignore_eos=True))
    assert [t for ch in chunks for t in ch.token_ids] == expected.token_ids
    assert "".join(ch.text for ch in chunks) == expected.text
    assert chunks[-1].finish_reason == "length"
    # --stream-interval 3: the first token alone, then at least 3 a message (more when deltas queued
    # up behind the reader), the rest with the last.
    sizes = [len(ch.token_ids) for ch in chunks]
    assert sizes[0] == 1 and all(n >= 3 for n in sizes[1:-1]), sizes


def test_sigterm_drains_then_exits_0(server: tuple[ServeProcess, str]) -> None:
    """Both protocols: health turns NOT_SERVING / 503, new requests UNAVAILABLE / 503, the open gRPC
    and HTTP streams finish, then exit 0."""
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    p, address = server
    body = {"model": "tiny", "prompt": [3] * 10, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with (
        KvrelayClient(address, timeout=60) as c,
        grpc.insecure_channel(address) as channel,
        httpx.Client(base_url=p.http, timeout=60) as h,
        h.stream("POST", "/v1/completions", json=body) as http_stream,
    ):
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service="kvrelay.v1.Generation")
        assert check(request).status == health_pb2.HealthCheckResponse.SERVING
        assert h.get("/health").status_code == 200
        http_lines = http_stream.iter_lines()
        assert next(http_lines).startswith("data: ")
        stream = c.stream([3] * 10, max_tokens=400, ignore_eos=True)
        num_tokens = len(next(stream).token_ids)
        p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while check(request).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health did not turn NOT_SERVING"
            time.sleep(0.02)
        assert h.get("/health").status_code == 503
        with pytest.raises(Unavailable, match="the server is shutting down"):
            c.generate([1, 2, 3], max_tokens=2)
        refused = h.post("/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "the server is shutting down"
        chunks = list(stream)
        rest = [line for line in http_lines if line]
    assert num_tokens + sum(len(ch.token_ids) for ch in chunks) == 400  # the in-flight stream finished
    assert chunks[-1].finish_reason == "length"
    assert rest[-1] == "data: [DONE]"  # so did the HTTP one
    assert '"finish_reason":"length"' in rest[-2]
    assert p.proc.wait(60) == 0
    assert p.stdout.qsize() == 0  # the ready and HTTP lines were the only lines on stdout
    assert any("kvrelay: stopped" in line for line in p.stderr)


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "port: 6000\nworkers: 3\nengine:\n  num_kv_blocks: 64\n  dtype: float32\n", encoding="utf-8"
    )
    c = config_from_args(
        parse("--config", str(config), "--port", "7000", "--num-kv-blocks", "32", "--model", "tiny")
    )
    assert (c.port, c.workers, c.engine.num_kv_blocks, c.engine.dtype, c.engine.model) == (
        7000,
        3,
        32,
        "float32",
        "tiny",
    )
    c = config_from_args(parse())
    assert (c.host, c.port, c.workers, c.device, c.engine.model) == ("127.0.0.1", 50051, None, "auto", "tiny")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prefill-workers", "1"], "prefill_workers and decode_workers: give both"),
        (["--auth-token-file", "/nonexistent/tokens"], "auth_token_file: cannot read /nonexistent/tokens"),
        (["--auth-token-file", "/dev/null"], "auth_token_file: /dev/null holds no tokens"),
        (["--tls-key", "/k.pem"], "tls.key_file is set but tls.cert_file is not: give both"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/k.pem"], "tls.cert_file: cannot read"),
        (["--port", "99999"], "port must be in [0, 65535], got 99999"),
    ],
)
def test_refused_before_anything_starts(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        run_serve(parse(*argv))
    assert str(e.value).startswith(message), str(e.value)


def test_a_worker_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    """A bad model path fails inside the Ray worker actors: the operator still reads one line
    naming the field, from the router and from the worker, and no traceback from either."""
    config = tmp_path / "kvrelay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    p = ServeProcess(["--config", str(config), "--model", str(tmp_path / "nope")])
    try:
        code = p.proc.wait(180)
    finally:
        p.kill()
    time.sleep(0.2)  # the pumps' last lines
    err = "".join(p.stderr)
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"kvrelay: error: model: '{tmp_path / 'nope'}' is not 'tiny', 'smollm2', a .gguf file nor an existing directory"
    )
    assert "Traceback" not in err and "never retrieved" not in err, err
