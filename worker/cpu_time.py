"""CPU seconds of a process, read from /proc (Linux): the worker's data-plane process and the
benchmarks' server and worker processes."""

from __future__ import annotations

import os


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, every thread (Linux /proc/PID/stat). The command,
    field 2, is in parentheses and may hold spaces: utime and stime are the 12th and 13th fields
    after the closing parenthesis."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
