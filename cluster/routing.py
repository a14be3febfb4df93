"""Which worker a request goes to: the least loaded, unless one that likely caches its prefix is close.

Load is measured in tokens, so that one long request weighs like many short ones:

    load(w) = outstanding_tokens(w) + kv_weight * kv_usage(w) * kv_capacity_tokens + sent(w)

The first two terms are what worker w reported with its latest poll (tokens its admitted requests
still have to compute or produce; KV blocks in use, as tokens). `sent(w)` is what the router routed
to w that w has not yet shown progress for (cost = prompt + max_tokens each): a burst of requests
arrives long before the next report, and without it the whole burst would see the same stale loads
and go to the same worker. An entry leaves `sent` at the request's first delta, after which the
worker's reports include it (the worker reports its load with the deltas of the same step), or when
the request ends. A request still queued in the worker's scheduler is then briefly counted twice; that
errs towards spreading.

Prefix affinity (SGLang's cache-aware router, bounded): the chained hashes of the prompt's first
`affinity_blocks` full blocks (`hash_prompt_blocks`, the very hashes the workers' prefix caches use)
are looked up deepest first in a table of which workers were recently sent each prefix. The least
loaded of those workers is chosen only while it is *balanced* against the least-loaded healthy worker:

    load(affine) <= min_load + balance_abs_threshold   or   load(affine) <= min_load * balance_rel_threshold

Otherwise the request goes to the least-loaded worker, which is then recorded as holding the prefix
too. So a hot prefix first fills one worker up to the threshold, then spills, and the prefix ends up
cached on every worker that serves it: no worker idles while another piles up requests. (SGLang
checks imbalance over all workers and otherwise sticks to the cached worker however loaded it is; here
the bound applies to the very worker affinity would pick.)

`PerWorkerBatcher` then sends what was routed to one worker together: one `submit` (or `abort`)
call per worker per event-loop iteration, or per `window_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from kvrelay.worker.kv_cache.prefix_hash import BlockHash, hash_prompt_blocks
from kvrelay.worker.protocol import WorkerLoad

log = logging.getLogger("kvrelay")
T = TypeVar("T")


class Candidate(Protocol):
    """What the balancer reads of a worker (`cluster.interfaces.WorkerClient` has it)."""

    @property
    def rank(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def load(self) -> WorkerLoad: ...


@dataclass(frozen=True)
class BalanceConfig:
    # Prompt blocks hashed for affinity (the first N full blocks; 0 = no affinity, pure least-load).
    affinity_blocks: int = 4
    # How much more loaded (in tokens) than the least-loaded worker an affine worker may be.
    balance_abs_threshold: int = 2048
    # ... or by what factor; either bound suffices (the absolute one matters when loads are small).
    balance_rel_threshold: float = 1.25
    # Weight of KV usage (as tokens held) against outstanding tokens.
    kv_weight: float = 1.0
    # Prefix hashes remembered (LRU); one entry per distinct prefix depth.
    max_prefix_entries: int = 65536

    def __post_init__(self) -> None:
        if not 0 <= self.affinity_blocks <= 64:
            raise ValueError(f"routing.affinity_blocks must be in [0, 64], got {self.affinity_blocks}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"routing.balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
        if not (math.isfinite(self.balance_rel_threshold) and self.balance_rel_threshold >= 1.0):
            raise ValueError(
                f"routing.balance_rel_threshold must be >= 1.0, got {self.balance_rel_threshold}"
            )
        if not (math.isfinite(self.kv_weight) and self.kv_weight >= 0):
            raise ValueError(f"routing.kv_weight must be >= 0, got {self.kv_weight}")
        if self.max_prefix_entries < 1:
            raise ValueError(f"routing.max_prefix_entries must be >= 1, got {self.max_prefix_entries}")


class Balancer:
    """Picks workers; all calls on the router's event loop."""

    def __init__(self, config: BalanceConfig, block_size: int, kv_capacity_tokens: int) -> None:
        self.config = config
        self._block_size = block_size
        self._kv_capacity = kv_capacity_tokens
        # prefix hash -> ranks sent that prefix, most recent last (LRU over hashes)
        self._prefixes: OrderedDict[BlockHash, list[int]] = OrderedDict()
        # rank -> {request key: cost} routed there and not yet confirmed by a delta
        self._sent: dict[int, dict[str, int]] = {}
        self._sent_total: dict[int, int] = {}
        self._next = 0  # rotates ties between equally loaded workers

    # ---- load ---------------------------------------------------------------------------
    def load(self, worker: Candidate) -> float:
        r = worker.load
        kv = self.config.kv_weight * r.kv_usage * self._kv_capacity
        return r.outstanding_tokens + kv + self._sent_total.get(worker.rank, 0)

    def sent(self, rank: int, key: str, cost: int) -> None:
        """A request of `cost` tokens is on its way to `rank`."""
        self._sent.setdefault(rank, {})[key] = cost
        self._sent_total[rank] = self._sent_total.get(rank, 0) + cost

    def confirmed(self, rank: int, key: str) -> None:
        """The worker reported on the request (its loads now include it), or the request ended."""
        cost = self._sent.get(rank, {}).pop(key, None)
        if cost is not None:
            self._sent_total[rank] -= cost

    def forget_worker(self, rank: int) -> None:
        """The worker died or restarted empty: nothing sent to it is pending, its cache is gone."""
        self._sent.pop(rank, None)
        self._sent_total.pop(rank, None)
        for ranks in self._prefixes.values():
            if rank in ranks:
                ranks.remove(rank)

    # ---- picking ------------------------------------------------------------------------
    def pick(self, prompt_ids: Sequence[int], workers: Sequence[Candidate]) -> int | None:
        """The rank to send this prompt to, or None when no worker is healthy."""
        healthy = [w for w in workers if w.healthy]
        if not healthy:
            return None
        loads = {w.rank: self.load(w) for w in healthy}
        least = self._least_loaded(healthy, loads)
        hashes = self._prefix_hashes(prompt_ids)
        chosen = self._affine(hashes, loads, loads[least])
        if chosen is None:
            chosen = least
        self._remember(hashes, chosen, len(workers))
        return chosen

    def _least_loaded(self, healthy: list[Candidate], loads: dict[int, float]) -> int:
        lowest = min(loads.values())
        ties = [w.rank for w in healthy if loads[w.rank] == lowest]
        self._next += 1
        return ties[self._next % len(ties)]

    def _prefix_hashes(self, prompt_ids: Sequence[int]) -> list[BlockHash]:
        n = self.config.affinity_blocks * self._block_size
        if n == 0 or len(prompt_ids) < self._block_size:
            return []
        return hash_prompt_blocks(prompt_ids[:n], self._block_size)

    def _affine(self, hashes: list[BlockHash], loads: dict[int, float], min_load: float) -> int | None:
        """The least-loaded healthy worker holding the deepest known prefix, if it is balanced."""
        c = self.config
        for h in reversed(hashes):
            ranks = [r for r in self._prefixes.get(h, ()) if r in loads]
            if not ranks:
                continue
            best = min(ranks, key=lambda r: loads[r])
            if (
                loads[best] <= min_load + c.balance_abs_threshold
                or loads[best] <= min_load * c.balance_rel_threshold
            ):
                return best
        return None

    def _remember(self, hashes: list[BlockHash], rank: int, num_workers: int) -> None:
        table = self._prefixes
        for h in hashes:
            ranks = table.get(h)
            if ranks is None:
                table[h] = [rank]
            else:
                if rank in ranks:
                    ranks.remove(rank)
                ranks.append(rank)
                del ranks[: max(0, len(ranks) - num_workers)]
                table.move_to_end(h)
        while len(table) > self.config.max_prefix_entries:
            table.popitem(last=False)

    def affine_ranks(self, prompt_ids: Sequence[int]) -> list[int]:
        """Workers recorded for the prompt's deepest known prefix (for tests and debugging)."""
        for h in reversed(self._prefix_hashes(prompt_ids)):
            if h in self._prefixes:
                return list(self._prefixes[h])
        return []


class PerWorkerBatcher(Generic[T]):
    """Collects items per worker rank and hands each rank's batch to `send(rank, items)` (run as a
    task) at the next event-loop iteration, or `window_s` after the first item when window_s > 0."""

    def __init__(
        self, send: Callable[[int, list[T]], Coroutine[Any, Any, None]], window_s: float = 0.0
    ) -> None:
        self._send = send
        self._window_s = window_s
        self._pending: dict[int, list[T]] = {}
        self._handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, rank: int, item: T) -> None:
        self._pending.setdefault(rank, []).append(item)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            if self._window_s > 0:
                self._handle = loop.call_later(self._window_s, self._flush)
            else:
                self._handle = loop.call_soon(self._flush)

    def drop(self, rank: int) -> list[T]:
        """Take back what is pending for a rank (its worker is gone)."""
        return self._pending.pop(rank, [])

    def _flush(self) -> None:
        self._handle = None
        pending, self._pending = self._pending, {}
        for rank, items in pending.items():
            task = asyncio.ensure_future(self._send(rank, items))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sending a batch to a worker failed", exc_info=task.exception())

    def close(self) -> None:
        """Drop what is pending and cancel the sends in flight."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending = {}
        for task in list(self._tasks):
            task.cancel()
