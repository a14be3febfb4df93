"""Which router process serves a client: read from the kernel (psutil: each router's established
sockets on the gRPC port), since SO_REUSEPORT's hash picks it per connection.

`spread_clients` opens clients, each on a connection of its own (OWN_CONNECTION), until every
router holds at least one; a test then reads each router's own ServerStats through its clients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psutil

from kvrelay.cluster.client import OWN_CONNECTION

__all__ = [
    "OWN_CONNECTION",
    "connect_on",
    "controller_routers",
    "generate_spread",
    "router_of_port",
    "spread_clients",
]


class _Connectable(Protocol):
    def wait_ready(self, timeout: float) -> None: ...


C = TypeVar("C", bound=_Connectable)


def router_of_port(pids: Sequence[int], port: int) -> dict[int, int]:
    """client port -> pid of the router process (among pids) holding that connection to `port`.
    A router in the test's own process works too: only its server side has laddr.port == port."""
    out = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:  # it exited meanwhile
            continue
        for c in conns:
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port and c.raddr:
                out[c.raddr.port] = pid
    return out


def connect_on(open_client: Callable[[], C], pids: Sequence[int], port: int) -> tuple[C, int]:
    """A new client, connected, and the router pid that its connection landed on. Open no other
    connection to the port meanwhile: the new connection is told apart by its client port."""
    seen = set(router_of_port(pids, port))
    client = open_client()
    client.wait_ready(10)
    new = set(router_of_port(pids, port)) - seen
    assert len(new) == 1, f"expected one new connection, saw {sorted(new)}"
    return client, router_of_port(pids, port)[new.pop()]


def spread_clients(
    open_client: Callable[[], C], pids: Sequence[int], port: int, *, at_least: int = 2, most: int = 40
) -> list[tuple[C, int]]:
    """Clients (with the router pid of each) until there are at_least and every router holds one.
    With 2 routers, 40 connections all on one router has probability 2**-39: that fails."""
    out: list[tuple[C, int]] = []
    while len(out) < at_least or {pid for _, pid in out} != set(pids):
        assert len(out) < most, f"{most} connections reached only routers {sorted({p for _, p in out})}"
        out.append(connect_on(open_client, pids, port))
    return out


@dataclass(frozen=True)
class SpreadRun:
    """`generate_spread`'s result: the token ids of every prompt (in order), how many requests
    each router pid was sent, and how many each router's own ServerStats counted meanwhile."""

    token_ids: list[list[int]]
    sent: dict[int, int]
    counted: dict[int, int]


def generate_spread(
    open_client: Callable[[], Any],
    pids: Sequence[int],
    port: int,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    at_least: int = 2,
) -> SpreadRun:
    """Greedy generations of `prompts` (ignore_eos), all at once, round-robin over clients spread
    on every router (`spread_clients`); each router's count is read through a connection it holds."""
    clients = spread_clients(open_client, pids, port, at_least=at_least)
    try:
        via = {pid: c for c, pid in clients}
        before = {pid: c.server_stats().num_requests_total for pid, c in via.items()}

        def one(i: int) -> list[int]:
            result = clients[i % len(clients)][0].generate(prompts[i], max_tokens=max_tokens, ignore_eos=True)
            return list(result.token_ids)

        with ThreadPoolExecutor(len(prompts)) as ex:
            got = list(ex.map(one, range(len(prompts))))
        sent = Counter(clients[i % len(clients)][1] for i in range(len(prompts)))
        counted = {pid: c.server_stats().num_requests_total - before[pid] for pid, c in via.items()}
    finally:
        for c, _ in clients:
            c.close()
    return SpreadRun(got, dict(sent), counted)


def controller_routers(controller_pid: int) -> list[int]:
    """The router processes of a `kvrelay serve --router-processes N` controller: its
    multiprocessing-spawned children (Ray's processes are not)."""
    out = []
    for c in psutil.Process(controller_pid).children():
        try:
            if c.status() != psutil.STATUS_ZOMBIE and any("spawn_main" in a for a in c.cmdline()):
                out.append(c.pid)
        except psutil.Error:  # it exited meanwhile
            pass
    return out
