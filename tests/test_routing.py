"""cluster/routing.py: least-load balancing with prefix affinity that can never pile onto one worker."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from kvrelay.cluster.routing import BalanceConfig, Balancer
from kvrelay.worker.protocol import WorkerLoad

BLOCK = 16
CAPACITY = 16384  # one worker's KV, in tokens


@dataclass
class FakeWorker:
    rank: int
    healthy: bool = True
    load: WorkerLoad = field(default_factory=lambda: make_load())


def make_load(outstanding: int = 0, kv_usage: float = 0.0) -> WorkerLoad:
    return WorkerLoad(
        num_running=0, num_waiting=0, kv_usage=kv_usage, num_free_blocks=0, outstanding_tokens=outstanding
    )


def make_workers(n: int) -> list[FakeWorker]:
    return [FakeWorker(rank) for rank in range(n)]


def prompt(prefix: int, tail: int = 0) -> list[int]:
    """Four full blocks determined by `prefix`, then a partial block (`tail`) that no hash covers."""
    return [prefix] * (4 * BLOCK) + [tail]


def balancer(**fields: int | float) -> Balancer:
    config = BalanceConfig(**{"balance_abs_threshold": 1024, "balance_rel_threshold": 1.25, **fields})  # type: ignore[arg-type]
    return Balancer(config, BLOCK, CAPACITY)


def route(b: Balancer, workers: list[FakeWorker], ids: list[int], key: str, cost: int) -> int:
    rank = b.pick(ids, workers)
    assert rank is not None
    b.sent(rank, key, cost)
    return rank


def test_hot_prefix_spreads_over_every_worker_once_the_affine_one_is_loaded() -> None:
    b, workers = balancer(), make_workers(4)
    cost = 128  # prompt 64 + max_tokens 64
    picks = [route(b, workers, prompt(7, tail=i % 5), f"r{i}", cost) for i in range(100)]
    # The first worker takes the prefix until it is more than balance_abs_threshold (1024) tokens
    # ahead of the idle ones: 9 requests (8 * 128 = 1024 still within), then the load spills.
    assert picks[:9] == [picks[0]] * 9
    assert picks[9] != picks[0]
    counts = Counter(picks)
    assert set(counts) == {0, 1, 2, 3}
    loads = [b.load(w) for w in workers]
    assert max(loads) - min(loads) <= 1024 + cost, loads
    assert sorted(b.affine_ranks(prompt(7))) == [0, 1, 2, 3]  # the prefix now lives everywhere


def test_distinct_prefixes_stick_to_their_worker_when_load_is_even() -> None:
    b, workers = balancer(), make_workers(4)
    for w in workers:
        w.load = make_load(outstanding=500)  # even, as reported
    home: dict[int, int] = {}
    for round_ in range(3):
        for p in range(8):
            rank = route(b, workers, prompt(p, tail=round_), f"{round_}-{p}", 100)
            b.confirmed(rank, f"{round_}-{p}")  # the worker's reports now include it; load stays even
            if round_ == 0:
                home[p] = rank
            else:
                assert rank == home[p], (round_, p)
    assert sorted(Counter(home.values()).values()) == [2, 2, 2, 2]  # ties rotate over the workers


def test_affinity_allowed_within_the_relative_threshold() -> None:
    b, workers = balancer(), make_workers(2)
    route(b, workers, prompt(1), "a", 10)
    home = b.affine_ranks(prompt(1))[0]
    b.confirmed(home, "a")
    workers[home].load = make_load(outstanding=12_000)
    workers[1 - home].load = make_load(outstanding=10_000)
    assert b.pick(prompt(1, tail=9), workers) == home  # 12000 <= 1.25 * 10000, though > 10000 + 1024
    workers[home].load = make_load(outstanding=12_600)
    assert b.pick(prompt(1, tail=9), workers) == 1 - home  # past both thresholds


def test_kv_usage_and_sent_tokens_count_as_load() -> None:
    b, workers = balancer(affinity_blocks=0), make_workers(2)
    workers[0].load = make_load(outstanding=100, kv_usage=0.5)  # 100 + 0.5 * 16384
    workers[1].load = make_load(outstanding=5000)
    assert b.load(workers[0]) == 100 + 8192
    assert b.pick([1, 2, 3], workers) == 1
    b.sent(1, "x", 4000)
    assert b.load(workers[1]) == 9000
    assert b.pick([1, 2, 3], workers) == 0
    b.confirmed(1, "x")
    b.confirmed(1, "x")  # idempotent
    assert b.load(workers[1]) == 5000


def test_deepest_shared_prefix_wins() -> None:
    b, workers = balancer(), make_workers(3)
    shared = [5] * BLOCK
    a = shared + [6] * BLOCK
    c = shared + [8] * BLOCK
    rank_a = route(b, workers, [*a, 1], "a", 5000)  # loads its worker past the threshold ...
    rank_c = route(b, workers, [*c, 1], "c", 10)
    assert rank_a != rank_c  # ... so c, sharing only the first block, goes elsewhere
    for w, key in ((rank_a, "a"), (rank_c, "c")):
        b.confirmed(w, key)
    assert b.pick(a + [9] * BLOCK, workers) == rank_a
    assert b.pick(c + [9] * BLOCK, workers) == rank_c
    assert b.pick([*shared, 1], workers) in (rank_a, rank_c)  # only the first block is known


def test_short_prompts_have_no_affinity() -> None:
    b, workers = balancer(), make_workers(2)
    picks = [route(b, workers, [1, 2, 3], f"r{i}", 10) for i in range(4)]
    assert picks == [picks[0], 1 - picks[0]] * 2  # pure least-load: they alternate


def test_unhealthy_workers_are_skipped_and_forgotten() -> None:
    b, workers = balancer(), make_workers(2)
    home = route(b, workers, prompt(3), "a", 10)
    workers[home].healthy = False
    assert b.pick(prompt(3, tail=1), workers) == 1 - home
    workers[1 - home].healthy = False
    assert b.pick(prompt(3, tail=2), workers) is None
    workers[0].healthy = workers[1].healthy = True
    b.forget_worker(home)
    assert b.load(workers[home]) == 0
    assert home not in b.affine_ranks(prompt(3))


def test_prefix_table_is_bounded() -> None:
    b, workers = balancer(affinity_blocks=1, max_prefix_entries=4), make_workers(2)
    for p in range(10):
        route(b, workers, prompt(p), f"r{p}", 1)
    assert [p for p in range(10) if b.affine_ranks(prompt(p))] == [6, 7, 8, 9]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"affinity_blocks": -1}, "routing.affinity_blocks"),
        ({"balance_abs_threshold": -1}, "routing.balance_abs_threshold"),
        ({"balance_rel_threshold": 0.5}, "routing.balance_rel_threshold"),
        ({"kv_weight": -1.0}, "routing.kv_weight"),
        ({"max_prefix_entries": 0}, "routing.max_prefix_entries"),
    ],
)
def test_config_errors_name_the_key(fields: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=f"^{needle}"):
        BalanceConfig(**fields)  # type: ignore[arg-type]
