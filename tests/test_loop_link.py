"""The data plane in a process of its own (worker/loop_link.py, worker/dataplane_front.py): its
lifetime follows the worker's, and the hop trace sees every worker hop in either layout. The
scenarios of tests/test_dataplane.py run in both layouts too (its `served` fixture)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest
from dataplane_helpers import GREEDY, Router, ServedPlane, model_of
from engine_helpers import make_engine

from kvrelay.cluster.dataplane import WorkerEndpoint
from kvrelay.worker import hop_trace
from kvrelay.worker.dataplane import DataPlaneServer
from kvrelay.worker.engine import Engine
from kvrelay.worker.engine_loop import EngineLoop
from kvrelay.worker.loop_link import LoopLink
from kvrelay.worker.protocol import WorkRequest


@pytest.fixture
def engine() -> Engine:
    return make_engine(detokenize=False)


def _gone(pid: int) -> bool:
    """The process ended (a zombie nobody reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_data_plane_process_exits_with_its_worker_and_on_shutdown(engine: Engine) -> None:
    """A worker SIGKILLed (Ray kills a hung actor so) leaves no data plane process behind, and a
    shut-down link stops its process. The worker here is a child process owning a LoopLink."""
    script = (
        "import sys, time\n"
        "sys.path.insert(0, 'tests')\n"
        "from engine_helpers import make_engine\n"
        "from kvrelay.worker.engine_loop import EngineLoop\n"
        "from kvrelay.worker.loop_link import LoopLink\n"
        "link = LoopLink(EngineLoop(make_engine(detokenize=False)), '127.0.0.1', incarnation='k')\n"
        "print(link.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        front = int(worker.stdout.readline())
        assert not _gone(front)
        worker.kill()
        worker.wait()
        end = time.monotonic() + 5
        while not _gone(front):
            assert time.monotonic() < end, "the data plane process outlived its worker"
            time.sleep(0.05)
    finally:
        worker.kill()
    loop = EngineLoop(engine)
    link = LoopLink(loop, "127.0.0.1", incarnation="k2")
    loop.shutdown()
    link.close()
    assert _gone(link.pid) and not link.alive()


@pytest.mark.parametrize("layout", ["in-process", "own-process"])
def test_hop_trace_marks_each_worker_hop_once_and_in_order(
    layout: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVRELAY_HOP_TRACE (worker/hop_trace.py): a served request's worker-side hops, each once, in
    the order it meets them, whichever process the data plane runs in (the child reads the env)."""
    path = str(tmp_path / "trace")
    monkeypatch.setenv("KVRELAY_HOP_TRACE", path)
    monkeypatch.setattr(hop_trace, "_PATH", path)
    monkeypatch.setattr(hop_trace, "ENABLED", True)
    engine = make_engine(detokenize=False)
    loop = EngineLoop(engine)
    server: ServedPlane = (
        DataPlaneServer(loop, "127.0.0.1", incarnation="inc-t")
        if layout == "in-process"
        else LoopLink(loop, "127.0.0.1", incarnation="inc-t")
    )
    ids = ["t0", "t1"]

    async def scenario() -> None:
        a = Router(model_of(engine), WorkerEndpoint(0, server.address, "inc-t"), "router-t")
        await a.start()
        assert await a.pool.workers[0].submit([WorkRequest(i, [3, 4, 5], GREEDY) for i in ids]) == {}
        await a.until(lambda: a.finished(ids))
        await a.pool.stop()

    try:
        asyncio.run(scenario())
    finally:
        loop.shutdown()
        server.close()
    lines = [ln.split("\t") for f in tmp_path.glob("trace.*") for ln in f.read_text().splitlines()]
    worker_stages = ["worker_recv", "loop_add", "loop_first_token", "worker_send_first"]
    for rid in ids:
        mine = sorted((float(t), stage) for r, stage, t in lines if r == rid)
        assert [stage for _, stage in mine] == worker_stages, mine


def test_a_data_plane_process_that_cannot_start_is_a_clear_error(engine: Engine) -> None:
    """It cannot bind (no such address): the worker reads why at once, not a hang until a timeout."""
    loop = EngineLoop(engine)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"exited with .* before READY"):
            LoopLink(loop, "256.0.0.1", incarnation="bad")
        assert time.monotonic() - started < 30
    finally:
        loop.shutdown()


def test_a_long_temp_directory_still_gives_ipc_paths_that_fit(
    engine: Engine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ipc endpoints are unix-socket paths (at most 107 bytes): under a TMPDIR too long for them the
    link's directory goes to /tmp, and the data plane starts."""
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    loop = EngineLoop(engine)
    link = LoopLink(loop, "127.0.0.1", incarnation="deep")
    try:
        assert link.alive() and link.address.startswith("tcp://127.0.0.1:")
    finally:
        loop.shutdown()
        link.close()
