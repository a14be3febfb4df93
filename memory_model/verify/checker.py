"""Exhaustive interleaving checker for the KV handoff protocol (issue #5).

Breadth-first search over every interleaving of the model in `checker_model.py` (memory) and `checker_steps.py` (protocol)
(producer CTAs' stores, their late visibility, the counter atomic, release/acquire,
consumer poll/timeout/abort, producer death, slot reuse, consumer restart, another
request reusing freed blocks), with a visited set of hashable states. Every step is
checked against I1-I4 of the contract and every terminal state against I5. On a
violation it returns the shortest counterexample trace (breadth-first). The correct
protocol must pass; each broken variant must fail with the invariant in `EXPECTED`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from .checker_model import (
    Invariant,
    ModelParams,
    State,
    Variant,
    Violation,
    initial_state,
)
from .checker_steps import successors, terminal_violation

__all__ = [
    "EXPECTED",
    "CheckResult",
    "Invariant",
    "ModelParams",
    "Variant",
    "check",
    "run_checker",
]

# The invariant the shortest counterexample of each variant breaks (None: must pass).
EXPECTED: dict[Variant, Invariant | None] = {
    Variant.CORRECT: None,
    Variant.RELAXED_RELEASE: Invariant.I1,
    Variant.NO_ACQUIRE: Invariant.I1,
    Variant.NONZERO_WAIT: Invariant.I2,
    Variant.FREE_ON_TIMEOUT: Invariant.I3,
    Variant.RELAXED_COUNTER: Invariant.I1,
    Variant.RESTART_NO_FENCE: Invariant.I1,
    Variant.APPLY_LATE: Invariant.I4,
}


@dataclass(frozen=True)
class CheckResult:
    variant: Variant
    states: int  # distinct states visited
    transitions: int
    seconds: float
    violation: Violation | None
    trace: tuple[str, ...]  # steps from the initial state to the violation; empty when it passed
    labels: frozenset[str]  # every distinct step taken: shows which behaviors the search reached

    @property
    def passed(self) -> bool:
        return self.violation is None

    @property
    def as_expected(self) -> bool:
        want = EXPECTED[self.variant]
        return (
            self.passed if want is None else self.violation is not None and self.violation.invariant is want
        )


def _trace(parents: dict[State, tuple[State, str] | None], s: State) -> list[str]:
    steps: list[str] = []
    link = parents[s]
    while link is not None:
        s, label = link
        steps.append(label)
        link = parents[s]
    return steps[::-1]


def check(variant: Variant, params: ModelParams | None = None) -> CheckResult:
    """Explore every reachable state of `variant`; stop at the first violation."""
    params = params or ModelParams()
    start = time.perf_counter()
    init = initial_state(params)
    parents: dict[State, tuple[State, str] | None] = {init: None}
    queue = deque([init])
    transitions = 0
    labels: set[str] = set()

    def result(violation: Violation | None, trace: list[str]) -> CheckResult:
        secs = time.perf_counter() - start
        return CheckResult(
            variant, len(parents), transitions, secs, violation, tuple(trace), frozenset(labels)
        )

    while queue:
        s = queue.popleft()
        enabled = False
        for label, nxt in successors(s, variant, params):
            enabled = True
            transitions += 1
            labels.add(label)
            if isinstance(nxt, Violation):
                return result(nxt, [*_trace(parents, s), label])
            if nxt not in parents:
                parents[nxt] = (s, label)
                queue.append(nxt)
        if not enabled:
            stuck = terminal_violation(s, params)
            if stuck is not None:
                return result(stuck, [*_trace(parents, s), "(no step enabled)"])
    return result(None, [])


def format_result(res: CheckResult) -> str:
    inv = "-" if res.violation is None else res.violation.invariant.name
    verdict = "pass" if res.passed else "FAIL"
    ok = "yes" if res.as_expected else "NO"
    return f"{res.variant.value:<18} {res.states:>9} {res.seconds:>7.1f} {verdict:<6} {inv:<9} {ok}"


def format_trace(res: CheckResult) -> str:
    if res.violation is None:
        return ""
    lines = [
        f"counterexample for {res.variant.value}: {res.violation.invariant.name} {res.violation.invariant.value}"
    ]
    lines += [f"  {n:>2}. {step}" for n, step in enumerate(res.trace, 1)]
    lines.append(f"  => {res.violation.detail}")
    return "\n".join(lines)


def run_checker(
    variant_names: list[str] | None = None, *, show_traces: bool = False, out: TextIO | None = None
) -> int:
    """Check the named variants (all when None), print a table; 0 when each behaves as expected."""
    out = out or sys.stdout
    names = {v.value: v for v in Variant}
    if variant_names is None:
        variants = list(Variant)
    else:
        unknown = [n for n in variant_names if n not in names]
        if unknown:
            raise ValueError(f"variant_names: unknown {unknown}, choose from {sorted(names)}")
        variants = [names[n] for n in variant_names]
    print(f"{'variant':<18} {'states':>9} {'seconds':>7} {'result':<6} {'violated':<9} expected", file=out)
    results = [check(v) for v in variants]
    for res in results:
        print(format_result(res), file=out)
    if show_traces:
        for res in results:
            if res.violation is not None:
                print(format_trace(res), file=out)
    return 0 if all(r.as_expected for r in results) else 1
