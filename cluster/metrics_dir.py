"""The directory of prometheus-client's multiprocess files for `kvrelay serve --router-processes N`.

The controller makes one per run and removes it at exit. A controller killed with SIGKILL (or by
the OOM killer) never reaches its exit, so the directory is named after the controller's PID,
`kvrelay-metrics-<pid>-<random>`, and every start first removes the directories of PIDs that are
no longer running. Only directories this user owns are touched. A PID the kernel has since given
to another process keeps its stale directory until that process exits too: a leak that ends,
never the removal of a live server's files (whose PID is running).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("kvrelay")

PREFIX = "kvrelay-metrics-"


def make_metrics_dir(base: str | None = None) -> str:
    """A fresh, empty directory in `base` (default: the temp dir), after sweeping the stale ones."""
    root = base if base is not None else tempfile.gettempdir()
    removed = sweep_stale_metrics_dirs(root)
    if removed:
        log.info("removed %d metrics directories of servers that are gone: %s", len(removed), removed)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)


def remove_metrics_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale_metrics_dirs(base: str) -> list[str]:
    """Remove `base`'s kvrelay-metrics-<pid>-* directories (owned by this user) whose PID is not
    running; returns their names, sorted. Others' names, files and directories are left alone."""
    removed = []
    try:
        entries = sorted(Path(base).iterdir())
    except OSError:
        return []
    for entry in entries:
        pid = _owner_pid(entry.name)
        if pid is None or pid == os.getpid() or _running(pid):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        # Not a symlink (a planted link must not steer rmtree elsewhere) and ours.
        if not entry.is_dir() or entry.is_symlink() or st.st_uid != os.getuid():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def _owner_pid(name: str) -> int | None:
    """The PID in kvrelay-metrics-<pid>-<random>, or None for any other name (including the
    unkeyed kvrelay-metrics-<random> of older versions, whose owner is unknown)."""
    if not name.startswith(PREFIX):
        return None
    pid, sep, rest = name[len(PREFIX) :].partition("-")
    if not sep or not rest or not pid.isdigit():
        return None
    return int(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
