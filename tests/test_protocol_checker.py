"""The exhaustive handoff-protocol checker: the correct protocol passes, each broken variant fails."""

from __future__ import annotations

import io
from typing import Any

import pytest

from kvrelay.memory_model.verify.checker import EXPECTED, CheckResult, check, format_trace, run_checker
from kvrelay.memory_model.verify.checker_model import (
    WAITING,
    Invariant,
    ModelParams,
    State,
    Variant,
    Violation,
    initial_state,
    pack,
)
from kvrelay.memory_model.verify.checker_steps import successors, terminal_violation

BROKEN = [v for v in Variant if v is not Variant.CORRECT]


@pytest.fixture(scope="module")
def results() -> dict[Variant, CheckResult]:
    return {v: check(v) for v in Variant}


def replay(variant: Variant, params: ModelParams, trace: tuple[str, ...]) -> Violation:
    """Follow a counterexample step by step from the initial state; its last step must be the violation."""
    s: State | Violation = initial_state(params)
    for label in trace:
        assert isinstance(s, State), f"trace continues past a violation at {label!r}"
        nexts = [nxt for lab, nxt in successors(s, variant, params) if lab == label]
        assert nexts, f"step {label!r} is not enabled"
        s = nexts[0]
    assert isinstance(s, Violation)
    return s


def test_correct_protocol_passes_exhaustively(results: dict[Variant, CheckResult]) -> None:
    res = results[Variant.CORRECT]
    assert res.passed and res.as_expected
    assert res.trace == ()
    assert res.states >= 40_000  # 44,377 with the default parameters
    assert res.transitions > res.states
    assert res.seconds < 30


def test_correct_search_reaches_every_behavior(results: dict[Variant, CheckResult]) -> None:
    # Guards against a vacuous model: each feature of the protocol is exercised somewhere.
    labels = results[Variant.CORRECT].labels
    for needle in (
        "C: poll SIGNAL=e0s1, acquire",  # normal completion
        "C: poll SIGNAL=e0s2, acquire",  # slot reuse
        "C: poll SIGNAL=e1s1, acquire",  # after a restart
        "C: timeout",
        "late SIGNAL=e0s1 seen, not applied",  # late completion or abort ack
        "skip copy, ack SIGNAL",
        "P0 dies",
        "pool: P0 is dead",
        "worker restarts",
        "drops its mappings",
        "other request takes free block 0",
        "becomes visible at .sys scope",
        "P0 CTA0: store to block 0 (epoch 0) becomes visible",
    ):
        assert any(needle in label for label in labels), needle


@pytest.mark.parametrize("variant", BROKEN, ids=lambda v: v.value)
def test_broken_variant_fails_with_expected_invariant(
    results: dict[Variant, CheckResult], variant: Variant
) -> None:
    res = results[variant]
    assert res.violation is not None
    assert res.violation.invariant is EXPECTED[variant]
    assert res.as_expected
    assert res.trace[0] == "C: reserve blocks, slot seq=1, expect e0s1; pool sends to P0"
    assert replay(variant, ModelParams(), res.trace) == res.violation


def test_expected_table_covers_every_variant() -> None:
    assert set(EXPECTED) == set(Variant)
    assert [v for v, inv in EXPECTED.items() if inv is None] == [Variant.CORRECT]


def test_relaxed_release_lets_signal_overtake_data(results: dict[Variant, CheckResult]) -> None:
    res = results[Variant.RELAXED_RELEASE]
    assert res.trace[-3:] == (
        "P0 CTA1: st.relaxed.sys SIGNAL=e0s1",
        "P0 CTA1: store to SIGNAL becomes visible",
        "C: poll SIGNAL=e0s1, acquire, read payload and blocks",
    )
    assert res.violation == Violation(Invariant.I1, "read block 0 = 0, want e0s1")


def test_relaxed_counter_leaves_other_cta_write_uncovered(results: dict[Variant, CheckResult]) -> None:
    res = results[Variant.RELAXED_COUNTER]
    assert "P0 CTA0: atom.add.relaxed counter -> 1" in res.trace
    assert "P0 CTA1: st.release.sys SIGNAL=e0s1" in res.trace
    assert res.violation == Violation(Invariant.I1, "read block 0 = 0, want e0s1")


def test_free_on_timeout_counterexample_is_minimal(results: dict[Variant, CheckResult]) -> None:
    res = results[Variant.FREE_ON_TIMEOUT]
    assert res.trace == (
        "C: reserve blocks, slot seq=1, expect e0s1; pool sends to P0",
        "C: timeout, st.release ABORT, free blocks",
    )
    assert res.violation == Violation(
        Invariant.I3, "timeout: freed block 0 while a producer may still write it"
    )


def test_nonzero_wait_fails_on_plain_slot_reuse() -> None:
    params = ModelParams(restart=False)
    res = check(Variant.NONZERO_WAIT, params)
    assert res.violation == Violation(Invariant.I2, "accepted SIGNAL=e0s1, expected e0s2")
    assert res.trace[-2:] == (
        "C: reserve blocks, slot seq=2, expect e0s2; pool sends to P1",
        "C: poll SIGNAL=e0s1, acquire, read payload and blocks",
    )
    assert replay(Variant.NONZERO_WAIT, params, res.trace) == res.violation


def test_free_on_timeout_is_visible_through_another_request() -> None:
    # Without the check at the free, the bug shows as a late producer store landing in a reused block.
    params = ModelParams(restart=False, check_free=False)
    res = check(Variant.FREE_ON_TIMEOUT, params)
    assert res.violation == Violation(Invariant.I3, "block 0 overwritten by a late producer store: e0s1")
    assert "other request takes free block 0 and writes it" in res.trace
    assert replay(Variant.FREE_ON_TIMEOUT, params, res.trace) == res.violation
    assert check(Variant.CORRECT, params).passed


@pytest.mark.parametrize(
    "params",
    [
        ModelParams(ctas=1, blocks=2),  # one CTA writing two blocks: intra-CTA reordering
        ModelParams(rounds=1),
        ModelParams(restart=False, other_request=False),
        ModelParams(timeout=False, producer_death=False),
    ],
    ids=["1cta-2blocks", "1round", "no-restart", "no-timeout-no-death"],
)
def test_smaller_models(params: ModelParams) -> None:
    assert check(Variant.CORRECT, params).passed
    res = check(Variant.RELAXED_RELEASE, params)
    assert res.violation is not None and res.violation.invariant is Invariant.I1
    assert replay(Variant.RELAXED_RELEASE, params, res.trace) == res.violation


def test_without_timeout_or_death_the_free_variant_has_nothing_to_break() -> None:
    assert check(Variant.FREE_ON_TIMEOUT, ModelParams(timeout=False)).passed


def test_pack_matches_contract() -> None:
    assert pack(0, 1) == 1
    assert pack(3, 7) == (3 << 32) | 7


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"ctas": 0}, "ctas"), ({"blocks": 3}, "blocks"), ({"rounds": 4}, "rounds")],
)
def test_params_validation_names_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelParams(**kwargs)


def test_run_checker_table_and_exit_code() -> None:
    out = io.StringIO()
    assert run_checker(["correct", "free-on-timeout"], show_traces=True, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["variant", "states", "seconds", "result", "violated", "expected"]
    assert lines[1].split()[0] == "correct" and lines[1].split()[3:] == ["pass", "-", "yes"]
    assert lines[2].split()[1] == "4" and lines[2].split()[3:] == ["FAIL", "I3", "yes"]
    assert lines[3].startswith("counterexample for free-on-timeout: I3")
    assert lines[-1] == "  => timeout: freed block 0 while a producer may still write it"


def test_run_checker_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="variant_names: unknown \\['bogus'\\]"):
        run_checker(["bogus"], out=io.StringIO())


def test_format_trace_empty_when_passed(results: dict[Variant, CheckResult]) -> None:
    assert format_trace(results[Variant.CORRECT]) == ""


def test_terminal_states_must_be_clean() -> None:
    params = ModelParams()
    init = initial_state(params)
    assert terminal_violation(init, params) == Violation(
        Invariant.I5, "deadlock: only 0 of 2 rounds could start"
    )
    waiting = init._replace(cons=init.cons._replace(phase=WAITING, expected=pack(0, 1)))
    stuck = terminal_violation(waiting, params)
    assert stuck is not None and stuck.invariant is Invariant.I5 and "expect e0s1" in stuck.detail
