#!/usr/bin/env python3
"""Regenerate the committed gRPC stubs in proto/ from proto/kvrelay.proto.

    python scripts/gen_proto.py            # rewrite proto/kvrelay_pb2{.py,.pyi,_grpc.py}
    python scripts/gen_proto.py --check    # exit 1 with a diff if the committed stubs are stale

The generator is pinned (proto/README.md says why): grpcio-tools 1.62.3 bundles protoc 25.x, whose
Python gencode has no runtime-version check, so one set of stubs imports under protobuf 5, 6 and
7, and whose gRPC plugin emits no `GRPC_GENERATED_VERSION` check, so the stubs run on any grpcio
>= 1.60. It is installed with `pip install --target` into a private directory (a temporary one
unless --tools-dir names a cache), never into the running environment.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.62.3"
REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"
PROTO_NAME = "kvrelay.proto"
# The .proto is compiled as `kvrelay/proto/kvrelay.proto` under the include root: protoc then names
# the module `kvrelay.proto.kvrelay_pb2`, so the gRPC stub imports `from kvrelay.proto import
# kvrelay_pb2` with no post-processing, and the descriptor's file name is unique in the global pool.
PROTO_REL = Path("kvrelay") / "proto" / PROTO_NAME
GENERATED = ("kvrelay_pb2.py", "kvrelay_pb2.pyi", "kvrelay_pb2_grpc.py")


class ToolsUnavailable(RuntimeError):
    """pip could not install a pinned package (typically: no package registry reachable)."""


def pip_install_target(target: Path, requirements: list[str], *, pip_timeout_s: float = 60.0) -> Path:
    """`pip install --no-deps --target target requirements` unless a completed install of exactly
    these requirements is already there (a cache); returns target. ToolsUnavailable if pip fails."""
    stamp = target / ".kvrelay-complete"
    wanted = "\n".join(requirements)
    if stamp.is_file() and stamp.read_text() == wanted:
        return target
    # Install beside, then rename: an interrupted install never passes for a complete one.
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--only-binary=:all:", "--timeout", str(int(pip_timeout_s)), "--retries", "1"]
    cmd += ["--target", str(staging), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ToolsUnavailable(
            f"pip could not install {' '.join(requirements)}: {proc.stderr.strip()[-600:]}"
        )
    (staging / stamp.name).write_text(wanted)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return target


def ensure_tools(tools_dir: Path) -> Path:
    """The pinned grpcio-tools, installed into tools_dir unless already there; returns tools_dir."""
    # --no-deps: protoc and the gRPC plugin are compiled into grpc_tools; neither imports protobuf.
    return pip_install_target(tools_dir, [f"grpcio-tools=={GRPCIO_TOOLS_VERSION}"])


# Runs in a child interpreter whose sys.path starts with the tools dir, so the pinned grpc_tools
# shadows any other installed version; it refuses to run if it did not.
_PROTOC_MAIN = """
import sys
from importlib import resources
import grpc_tools
from grpc_tools import protoc
tools_dir, args = sys.argv[1], sys.argv[2:]
if not grpc_tools.__file__.startswith(tools_dir):
    sys.exit(f"grpc_tools came from {grpc_tools.__file__}, not from {tools_dir}")
include = str(resources.files("grpc_tools") / "_proto")
sys.exit(protoc.main(["protoc", *args, "-I" + include]))
"""


def run_protoc(tools_dir: Path, args: list[str]) -> None:
    """Run the pinned protoc (with the gRPC plugin) on args; raises RuntimeError with its stderr."""
    cmd = [sys.executable, "-S", "-c", _PROTOC_MAIN, str(tools_dir.resolve()), *args]
    env = {**os.environ, "PYTHONPATH": str(tools_dir.resolve())}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed ({proc.returncode}): {proc.stderr.strip()}")


def generate(out_dir: Path, tools_dir: Path, proto: Path = PROTO_DIR / PROTO_NAME) -> dict[str, bytes]:
    """Compile proto into out_dir with the pinned tools; returns {file name: contents} of GENERATED."""
    with tempfile.TemporaryDirectory(prefix="kvrelay-proto-") as tmp:
        root = Path(tmp) / "include"
        (root / PROTO_REL).parent.mkdir(parents=True)
        shutil.copyfile(proto, root / PROTO_REL)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        outs = [f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}"]
        run_protoc(tools_dir, [f"-I{root}", *outs, str(PROTO_REL)])
        produced = {name: (gen / PROTO_REL.parent / name).read_bytes() for name in GENERATED}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in produced.items():
        (out_dir / name).write_bytes(data)
    return produced


def stale_files(produced: dict[str, bytes], committed_dir: Path = PROTO_DIR) -> dict[str, str]:
    """{file name: unified diff} for each committed stub that differs from the freshly generated one."""
    diffs = {}
    for name, data in produced.items():
        path = committed_dir / name
        old = path.read_bytes() if path.exists() else b""
        if old != data:
            lines = difflib.unified_diff(
                old.decode(errors="replace").splitlines(keepends=True),
                data.decode(errors="replace").splitlines(keepends=True),
                f"committed/{name}",
                f"generated/{name}",
            )
            diffs[name] = "".join(lines)[:4000]
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed stubs; write nothing")
    ap.add_argument("--tools-dir", type=Path, default=None, help="cache for the pinned grpcio-tools")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvrelay-grpc-tools-") as tmp:
        tools = ensure_tools(args.tools_dir or Path(tmp) / "tools")
        if args.check:
            diffs = stale_files(generate(Path(tmp) / "out", tools))
            for diff in diffs.values():
                sys.stdout.write(diff)
            if diffs:
                print(f"stale: {', '.join(diffs)}; run: python scripts/gen_proto.py", file=sys.stderr)
            return 1 if diffs else 0
        generate(PROTO_DIR, tools)
    print(f"wrote {', '.join(GENERATED)} to {PROTO_DIR} (grpcio-tools {GRPCIO_TOOLS_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
