"""`kvrelay serve` as a subprocess for the benchmark scripts: started, its gRPC address read from its
first line of stdout, stopped with SIGTERM (a drain) when the block ends."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

_READY = "kvrelay serving on "


@contextmanager
def serving(args: Sequence[str], env: Mapping[str, str]) -> Iterator[tuple[str, int]]:
    """Runs `kvrelay serve ARGS` and yields (its gRPC address, its pid); SystemExit if it does not
    start."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "kvrelay.cli", "serve", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(env),
    )
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline().strip()
        if not line.startswith(_READY):
            raise SystemExit(f"serve did not start: {line!r}")
        yield line.removeprefix(_READY), serve.pid
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
