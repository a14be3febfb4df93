"""cluster/admission.py: bounds in requests and tokens; tickets released once, whatever the path."""

from __future__ import annotations

import pytest

from kvrelay.cluster.admission import Admission, AdmissionFull


def test_request_bound() -> None:
    a = Admission(max_requests=2, max_tokens=1000)
    t1, t2 = a.admit(10), a.admit(20)
    assert (a.num_requests, a.num_tokens, a.has_room()) == (2, 30, False)
    with pytest.raises(AdmissionFull, match="2 requests in flight"):
        a.admit(1)
    a.release(t1)
    assert (a.num_requests, a.num_tokens, a.has_room()) == (1, 20, True)
    a.admit(5)
    a.release(t2)
    assert (a.num_requests, a.num_tokens) == (1, 5)


def test_token_bound() -> None:
    a = Admission(max_requests=10, max_tokens=100)
    t = a.admit(60)
    with pytest.raises(AdmissionFull, match=r"60 of 100 tokens in flight .* needs 41"):
        a.admit(41)
    a.admit(40)  # exactly full
    assert a.num_tokens == 100
    a.release(t)
    a.admit(60)
    assert a.num_tokens == 100


def test_a_request_larger_than_the_budget_is_bad_input() -> None:
    a = Admission(max_requests=10, max_tokens=100)
    with pytest.raises(ValueError, match="101 tokens exceeds the server's max_queued_tokens 100"):
        a.admit(101)
    assert (a.num_requests, a.num_tokens) == (0, 0)


def test_release_is_idempotent() -> None:
    a = Admission(max_requests=3, max_tokens=100)
    t = a.admit(30)
    other = a.admit(10)
    a.release(t)
    a.release(t)
    assert (a.num_requests, a.num_tokens) == (1, 10)
    a.release(other)
    assert (a.num_requests, a.num_tokens) == (0, 0)


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queued_requests must be >= 1, got 0"):
        Admission(0, 10)
    with pytest.raises(ValueError, match="max_queued_tokens must be >= 1, got 0"):
        Admission(1, 0)
