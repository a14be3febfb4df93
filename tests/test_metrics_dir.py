"""cluster/metrics_dir.py: the multiprocess metrics directory of a SIGKILLed controller is removed
by the next start; a running controller's, another program's, and anything not a directory stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ray_helpers import REPO_ROOT

from kvrelay.cluster.metrics_dir import make_metrics_dir, remove_metrics_dir

# A stand-in controller: makes its directory (and a file in it, as a router would), says where,
# then waits to be killed.
_CONTROLLER = """\
import sys, time
from pathlib import Path
from kvrelay.cluster.metrics_dir import make_metrics_dir
d = make_metrics_dir(sys.argv[1])
Path(d, "counter_123.db").write_bytes(b"x")
print(d, flush=True)
time.sleep(120)
"""


def _controller(base: Path) -> tuple[subprocess.Popen[str], Path]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    p = subprocess.Popen(
        [sys.executable, "-c", _CONTROLLER, str(base)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout is not None
    return p, Path(p.stdout.readline().strip())


def test_a_sigkilled_controllers_directory_is_swept_by_the_next_start(tmp_path: Path) -> None:
    killed, killed_dir = _controller(tmp_path)
    alive, alive_dir = _controller(tmp_path)
    try:
        assert killed_dir.name.startswith(f"kvrelay-metrics-{killed.pid}-") and killed_dir.is_dir()
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(10) == -signal.SIGKILL
        assert (killed_dir / "counter_123.db").exists()  # what SIGKILL leaves behind
        # Names the sweep must not touch: an old unkeyed directory, a file and a symlink with a
        # dead PID's name, someone else's prefix.
        keep = [tmp_path / "kvrelay-metrics-abc_12", tmp_path / "other-metrics-1-x"]
        for d in keep:
            d.mkdir()
        (tmp_path / f"kvrelay-metrics-{killed.pid}-file").write_text("x")
        target = tmp_path / "elsewhere"
        target.mkdir()
        (tmp_path / f"kvrelay-metrics-{killed.pid}-link").symlink_to(target)

        mine = Path(make_metrics_dir(str(tmp_path)))
        assert mine.name.startswith(f"kvrelay-metrics-{os.getpid()}-") and list(mine.iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [
                alive_dir.name,
                mine.name,
                "elsewhere",
                "kvrelay-metrics-abc_12",
                "other-metrics-1-x",
                f"kvrelay-metrics-{killed.pid}-file",
                f"kvrelay-metrics-{killed.pid}-link",
            ]
        )
        assert (alive_dir / "counter_123.db").read_bytes() == b"x"
        remove_metrics_dir(str(mine))
        assert not mine.exists()
    finally:
        for p in (killed, alive):
            if p.poll() is None:
                p.kill()
            p.wait(10)
    # Once the second controller is gone too, the next start removes its directory.
    mine = Path(make_metrics_dir(str(tmp_path)))
    assert not alive_dir.exists() and mine.is_dir()
