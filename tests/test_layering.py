"""The package layering (issue 13), read from the source's import statements, with no import run.

    proto, memory_model  <  worker  <  cluster  <  kvrelay.cli

A module may import its own layer and the layers below, never above; proto and memory_model do
not import each other. Runtime code never imports the benchmark and verification packages
(`*/bench/`, `memory_model/verify/`): only they, their tests and the CLI reach them. Every
import counts, including the ones inside functions and under TYPE_CHECKING: a cycle there still
ties the two files together for a reader and for static tools.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"proto": 0, "memory_model": 0, "worker": 1, "cluster": 2, "cli": 3}
# Measurement and verification code: importable from itself, the CLI and tests, never from runtime code.
NON_RUNTIME = ("kvrelay.worker.bench", "kvrelay.cluster.bench", "kvrelay.memory_model.verify")


def module_name(path: Path) -> str:
    """kvrelay's dotted name of a source file under REPO: worker/x/y.py -> kvrelay.worker.x.y."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts[0] == "kvrelay" else ".".join(["kvrelay", *parts])


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every kvrelay import in source, relative ones resolved.

    `from P import n` yields P.n: n may be a module (it is, for the cross-folder cases that matter)
    and, when it is a plain name, P.n still starts with P, so the layer is the same.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kvrelay"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "kvrelay":
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def layer_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] != "kvrelay":
        return None
    return parts[1] if parts[1] in LAYERS else None


def violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """Why each import of module breaks the layering; empty when it keeps it."""
    own = layer_of(module)
    out: list[str] = []
    for line, target in imports:
        other = layer_of(target)
        if own is None or other is None or other == own:
            pass
        elif LAYERS[other] >= LAYERS[own]:
            out.append(f"{module}:{line} imports {target}: {own} may not import {other}")
        runtime = own != "cli" and not module.startswith(NON_RUNTIME)
        if runtime and target.startswith(NON_RUNTIME):
            out.append(f"{module}:{line} imports {target}: runtime code may not import a benchmark")
    return out


def source_files() -> list[Path]:
    files = [REPO / "kvrelay" / "cli.py", REPO / "kvrelay" / "__init__.py"]
    for top in ("proto", "memory_model", "worker", "cluster"):
        files += sorted((REPO / top).rglob("*.py"))
    return files


def test_the_packages_keep_their_layers() -> None:
    files = source_files()
    assert len(files) > 80  # the whole tree was read, not an empty glob
    broken: list[str] = []
    for path in files:
        module = module_name(path)
        broken += violations(module, imported_modules(path.read_text(), module, path.name == "__init__.py"))
    assert broken == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # the layer above
        (
            "kvrelay.worker.actor",
            "from kvrelay.cluster.interfaces import ModelDescription\n",
            [
                "kvrelay.worker.actor:1 imports kvrelay.cluster.interfaces.ModelDescription: "
                "worker may not import cluster"
            ],
        ),
        # a relative import that climbs out of its folder, inside a function
        (
            "kvrelay.memory_model.mailbox",
            "def f():\n    from ..worker import engine\n",
            [
                "kvrelay.memory_model.mailbox:2 imports kvrelay.worker.engine: memory_model may not import worker"
            ],
        ),
        # the same layer's other package
        (
            "kvrelay.proto.kvrelay_pb2",
            "import kvrelay.memory_model.shm\n",
            [
                "kvrelay.proto.kvrelay_pb2:1 imports kvrelay.memory_model.shm: proto may not import memory_model"
            ],
        ),
        # runtime code reaching a benchmark (same layer)
        (
            "kvrelay.cluster.serve",
            "from .bench.metrics import BenchMetrics\n",
            [
                "kvrelay.cluster.serve:1 imports kvrelay.cluster.bench.metrics.BenchMetrics: "
                "runtime code may not import a benchmark"
            ],
        ),
        # allowed: downward, relative within a folder, bench -> runtime, the CLI -> a benchmark
        ("kvrelay.cluster.pool", "from ..worker.protocol import WorkerLoad\nfrom . import routing\n", []),
        (
            "kvrelay.worker.bench.engine",
            "from ..engine import Engine\nfrom ...memory_model.verify import x\n",
            [],
        ),
        ("kvrelay.cli", "from kvrelay.cluster.bench.serve import run\n", []),
    ],
)
def test_the_checker_flags_each_kind_of_break(module: str, source: str, expected: list[str]) -> None:
    is_package = False
    assert violations(module, imported_modules(source, module, is_package)) == expected


def test_a_top_level_folder_imports_only_as_kvrelay() -> None:
    # The same file loaded as `worker.engine` and `kvrelay.worker.engine` would be two modules.
    code = "import importlib\nfor name in ('worker', 'cluster', 'memory_model', 'proto'):\n" + (
        "    try:\n        importlib.import_module(name)\n    except ImportError as e:\n        print(e)\n"
        "    else:\n        print('imported', name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out == [
        f"import {n} as kvrelay.{n}: kvrelay's top-level folders load only through the kvrelay package"
        for n in ("worker", "cluster", "memory_model", "proto")
    ]
