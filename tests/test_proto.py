"""The committed gRPC stubs: they match kvrelay.proto, and they work under protobuf 5, 6 and 7.

The pinned generator and the protobuf runtimes are pip-installed into `--target` directories under
.pytest_cache (re-runs reuse them); without a reachable package registry those tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, text_format

from kvrelay.proto import kvrelay_pb2, kvrelay_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def _load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_proto = _load_gen_proto()


@pytest.fixture(scope="module")
def cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return Path(cache.mkdir("kvrelay-proto")) if cache is not None else tmp_path_factory.mktemp("proto")


def _pip_target(target: Path, requirements: list[str]) -> Path:
    try:
        return gen_proto.pip_install_target(target, requirements, pip_timeout_s=30)
    except gen_proto.ToolsUnavailable as err:
        pytest.skip(f"no package registry reachable to install {requirements}: {err}")


def test_stub_layout() -> None:
    assert kvrelay_pb2.DESCRIPTOR.name == "kvrelay/proto/kvrelay.proto"
    assert kvrelay_pb2.DESCRIPTOR.package == "kvrelay.v1"
    service = kvrelay_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "kvrelay.v1.Generation"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse"),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo"),
        "GetServerStats": ("GetServerStatsRequest", "ServerStats"),
    }
    grpc_src = (REPO / "proto" / "kvrelay_pb2_grpc.py").read_text()
    assert "from kvrelay.proto import kvrelay_pb2 as" in grpc_src
    # The version gates that would tie the stubs to one protobuf major or a recent grpcio.
    assert "GRPC_GENERATED_VERSION" not in grpc_src
    assert "_runtime_version" not in (REPO / "proto" / "kvrelay_pb2.py").read_text()
    assert hasattr(kvrelay_pb2_grpc, "add_GenerationServicer_to_server")


def _fresh_descriptor(tmp_path: Path, protoc: list[str]) -> descriptor_pb2.FileDescriptorProto:
    """kvrelay.proto compiled now, under the same file name the stubs were generated with."""
    include = tmp_path / "include"
    (include / gen_proto.PROTO_REL).parent.mkdir(parents=True)
    shutil.copyfile(REPO / "proto" / "kvrelay.proto", include / gen_proto.PROTO_REL)
    out = tmp_path / "set.pb"
    args = [f"-I{include}", f"--descriptor_set_out={out}", str(gen_proto.PROTO_REL)]
    proc = subprocess.run([*protoc, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert len(files) == 1
    return files[0]


def _default_json_name(field_name: str) -> str:
    """protoc's ToJsonName: drop each '_' and upper-case the letter after it."""
    out, upper = [], False
    for ch in field_name:
        if ch == "_":
            upper = True
        else:
            out.append(ch.upper() if upper else ch)
            upper = False
    return "".join(out)


def _strip_default_json_names(messages: Sequence[descriptor_pb2.DescriptorProto]) -> None:
    """protoc leaves default json_names out of the descriptor it embeds in _pb2.py, not out of
    --descriptor_set_out: drop them there too, keeping any custom one."""
    for message in messages:
        for field in message.field:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
        _strip_default_json_names(message.nested_type)


def test_committed_descriptor_matches_proto(tmp_path: Path) -> None:
    """Fast check with whatever grpcio-tools this environment has (any version compiles the same
    descriptor); the byte-for-byte check below needs the pinned one."""
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (pip install -e '.[dev]' brings it)")
    fresh = _fresh_descriptor(tmp_path, [sys.executable, "-m", "grpc_tools.protoc"])
    _strip_default_json_names(fresh.message_type)
    committed = descriptor_pb2.FileDescriptorProto.FromString(kvrelay_pb2.DESCRIPTOR.serialized_pb)
    assert committed == fresh, (
        "proto/kvrelay_pb2.py is stale: run `python scripts/gen_proto.py` and commit the result.\n"
        f"committed:\n{text_format.MessageToString(committed)}\nfresh:\n{text_format.MessageToString(fresh)}"
    )


def test_committed_stubs_match_pinned_generator(tmp_path: Path, cache_dir: Path) -> None:
    tools = _pip_target(cache_dir / "grpcio-tools", [f"grpcio-tools=={gen_proto.GRPCIO_TOOLS_VERSION}"])
    produced = gen_proto.generate(tmp_path / "out", tools)
    assert set(produced) == {"kvrelay_pb2.py", "kvrelay_pb2.pyi", "kvrelay_pb2_grpc.py"}
    stale = gen_proto.stale_files(produced, REPO / "proto")
    assert stale == {}, "run `python scripts/gen_proto.py` and commit the result:\n" + "\n".join(
        stale.values()
    )


# Runs in a fresh interpreter whose protobuf (and grpcio) come from the --target directory; warnings
# are errors, so a deprecation in the gencode path fails here before it breaks a future runtime.
_ROUND_TRIP = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("error")
    from concurrent import futures
    import google.protobuf, grpc
    from kvrelay.proto import kvrelay_pb2 as pb, kvrelay_pb2_grpc as pb_grpc
    assert google.protobuf.__file__.startswith(sys.argv[1]), google.protobuf.__file__

    req = pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[1, 2, 3]),
                             sampling=pb.SamplingParams(max_tokens=4, seed=0, stop=["x"], min_p=0.5))
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back == req and back.WhichOneof("prompt") == "token_ids"
    assert back.sampling.HasField("seed") and not pb.SamplingParams().HasField("seed")
    resp = pb.GenerateResponse(token_ids=[7], text="é", finish_reason=pb.FINISH_REASON_LENGTH,
                               logprobs=[pb.TokenLogprobs(token_id=7, logprob=-0.5,
                                                          top=[pb.TopLogprob(token_id=7, logprob=-0.5)])],
                               usage=pb.Usage(prompt_tokens=3, completion_tokens=1))
    assert pb.GenerateResponse.FromString(resp.SerializeToString()) == resp
    assert pb.FinishReason.Name(resp.finish_reason) == "FINISH_REASON_LENGTH"

    class Servicer(pb_grpc.GenerationServicer):
        def Generate(self, request, context):
            for t in request.token_ids.ids:
                yield pb.GenerateResponse(token_ids=[t + 100])
        def GetModelInfo(self, request, context):
            return pb.ModelInfo(model="m", vocab_size=32, eos_token_ids=[2])

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_GenerationServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        assert [list(r.token_ids) for r in stub.Generate(req, timeout=10)] == [[101], [102], [103]]
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert (info.model, info.vocab_size, list(info.eos_token_ids)) == ("m", 32, [2])
    server.stop(None)
    print("OK", google.protobuf.__version__, grpc.__version__)
    """
)


@pytest.mark.parametrize(
    "requirements",
    [
        # The oldest supported pair: protobuf 5 with the grpcio the stubs promise to need at most.
        ["protobuf==5.29.5", "grpcio==1.60.2"],
        ["protobuf==6.33.5"],
        ["protobuf==7.36.2"],
    ],
    ids=["protobuf5-grpcio1.60", "protobuf6", "protobuf7"],
)
def test_stubs_under_runtime(requirements: list[str], cache_dir: Path) -> None:
    target = _pip_target(cache_dir / "-".join(r.replace("==", "-") for r in requirements), requirements)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND_TRIP, str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = {r.split("==")[0]: r.split("==")[1] for r in requirements}
    protobuf_version, grpc_version = proc.stdout.split()[1:]
    assert protobuf_version == versions["protobuf"]
    if "grpcio" in versions:
        assert grpc_version == versions["grpcio"]
