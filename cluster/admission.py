"""Admission: a bound on the requests in flight and on their tokens, checked before any work starts.

A request costs one slot and `prompt tokens + max_tokens` tokens (the most KV it can ever need) from
the moment it is admitted until its stream ends, whichever way (finished, failed, cancelled, its
worker died). Past either bound a request is refused at once with RESOURCE_EXHAUSTED: a client
should back off rather than queue behind work the pool cannot absorb. A request larger than the
whole token budget could never be admitted, so it is bad input instead (INVALID_ARGUMENT).
"""

from __future__ import annotations

from dataclasses import dataclass


class AdmissionFull(Exception):
    """The bound is reached now; the message says which (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False, slots=True)
class Ticket:
    """What one admitted request holds; released exactly once."""

    tokens: int
    released: bool = False


class Admission:
    """Not thread-safe: used from the router's event loop only."""

    def __init__(self, max_requests: int, max_tokens: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_requests}")
        if max_tokens < 1:
            raise ValueError(f"max_queued_tokens must be >= 1, got {max_tokens}")
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.num_requests = 0
        self.num_tokens = 0

    def has_room(self) -> bool:
        """A cheap check before costly work (tokenizing): is a request slot free right now?"""
        return self.num_requests < self.max_requests

    def check_room(self) -> None:
        """AdmissionFull unless a request slot is free right now."""
        if self.num_requests >= self.max_requests:
            raise AdmissionFull(f"server busy: {self.num_requests} requests in flight (max_queued_requests)")

    def check_fits(self, tokens: int) -> None:
        """ValueError (INVALID_ARGUMENT) when a request of this size could never be admitted."""
        if tokens > self.max_tokens:
            raise ValueError(
                f"prompt + max_tokens = {tokens} tokens exceeds the server's max_queued_tokens {self.max_tokens}"
            )

    def admit(self, tokens: int) -> Ticket:
        """A ticket for a request of `tokens`; AdmissionFull when either bound would be passed."""
        assert tokens > 0, tokens
        self.check_fits(tokens)
        self.check_room()
        if self.num_tokens + tokens > self.max_tokens:
            raise AdmissionFull(
                f"server busy: {self.num_tokens} of {self.max_tokens} tokens in flight (max_queued_tokens); "
                f"this request needs {tokens}"
            )
        self.num_requests += 1
        self.num_tokens += tokens
        return Ticket(tokens)

    def release(self, ticket: Ticket) -> None:
        """Idempotent: a stream may end on several paths at once (worker death, then its handler)."""
        if ticket.released:
            return
        ticket.released = True
        self.num_requests -= 1
        self.num_tokens -= ticket.tokens
        if self.num_requests < 0 or self.num_tokens < 0:
            raise RuntimeError(
                f"admission counts went negative: {self.num_requests} requests, {self.num_tokens} tokens"
            )
