"""Small pieces the Ray pools share: awaiting an ObjectRef, reading a Ray error, and the
no-progress watchdog of a worker."""

from __future__ import annotations

import asyncio
import re
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ray_future(ref: Any) -> asyncio.Future[Any]:
    """A Ray ObjectRef as an asyncio future of this loop (so it can be waited on, shielded, timed)."""
    return asyncio.wrap_future(ref.future())


def error_summary(e: BaseException) -> tuple[str, str]:
    """(exception type, message) of what a Ray error wraps: the last line of its text, which for
    an exception raised in an actor is `Type: message` (the lines above are its traceback)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    kind, sep, msg = last.partition(": ")
    if sep and kind.replace(".", "").isidentifier():
        return kind.rsplit(".", 1)[-1], msg
    return type(e).__name__, last


class ProgressWatchdog:
    """When a worker that holds work last progressed: `observe` after every poll answer."""

    def __init__(self, no_progress_s: float) -> None:
        if not no_progress_s > 0:
            raise ValueError(f"no_progress_s must be > 0 seconds, got {no_progress_s}")
        self.no_progress_s = no_progress_s
        self._since: float | None = None  # last progress, or when work last appeared

    def observe(self, now: float, *, holds_work: bool, progressed: bool) -> float | None:
        """Seconds without progress once that reaches `no_progress_s` (the worker is stalled),
        else None. An idle worker has nothing to progress on, so idle time never counts."""
        if progressed or not holds_work or self._since is None:
            self._since = now
            return None
        stalled_s = now - self._since
        return stalled_s if stalled_s >= self.no_progress_s else None

    def reset(self, now: float) -> None:
        """The worker came back empty: its clock starts again."""
        self._since = now
