"""Where a request's first token spends its time: per-hop timestamps, a diagnostic.

With KVRELAY_HOP_TRACE=PATH every kvrelay process (routers, workers, their data planes) appends
one line per hop of a request to PATH.<pid>: `request_id stage seconds`, seconds being
`time.monotonic()`, which is one clock for every process of a host. Keys are the router's
worker request ids, so one request's lines from several processes join up.
`scripts/ttft_hops.py` serves with it set, runs requests at concurrency 1, and prints the median
time between consecutive stages. Off (the default) a mark is one global read at its call site:
call sites that would build a list of ids for it test `ENABLED` first.

Stages, in the order a request meets them (STAGES):
    router_arrival      the protocol adapter's handler started (gRPC's Generate, the HTTP route)
    router_open         the router accepted it (validated, admitted, routed)
    router_submit       the router's submit to the worker is sent
    worker_recv         the worker's data plane read the SUBMIT
    loop_add            the engine loop added it to the engine
    loop_first_token    the loop published its first token (after the step that sampled it)
    worker_send_first   the data plane sent the delta carrying it
    router_recv_first   the router read that delta
    router_yield_first  the router handed the first response to the protocol adapter
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

STAGES = (
    "router_arrival",
    "router_open",
    "router_submit",
    "worker_recv",
    "loop_add",
    "loop_first_token",
    "worker_send_first",
    "router_recv_first",
    "router_yield_first",
)
_ENV = "KVRELAY_HOP_TRACE"
_PATH = os.environ.get(_ENV) or None
ENABLED = _PATH is not None


def mark(stage: str, request_ids: Iterable[str], at: float | None = None) -> None:
    """Append `stage` now (or at `at`, a time.monotonic() taken earlier) for these requests (no-op
    unless KVRELAY_HOP_TRACE is set)."""
    if _PATH is None:
        return
    now = time.monotonic() if at is None else at
    lines = "".join(f"{rid}\t{stage}\t{now:.6f}\n" for rid in request_ids)
    if lines:
        with open(f"{_PATH}.{os.getpid()}", "a") as f:
            f.write(lines)
