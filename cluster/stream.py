"""One request's stream inside the router, and how its deltas are gathered into responses.

`Stream` is the router's state for a request from admission to its end (`RouterCore` creates,
routes and ends it); the pool's callbacks put the worker's deltas, or a `RouterError`, on its
queue. `gather` takes what the next response carries:

- every delta that queued up while the stream's reader was busy (writing to its client, or waiting
  for the event loop under load), merged into one, as vLLM's output collector merges a request's
  outputs its consumer has not taken yet: per-message costs (the protobuf, the gRPC write, the
  client's read) then fall as load rises, instead of the backlog growing; a reader that keeps up
  still sends every delta on its own;
- with `stream_interval` N > 1 (SGLang's and vLLM's --stream-interval), at least N tokens after the
  first, which goes at once (TTFT), as does the last delta and one that carries a failure.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kvrelay.worker.protocol import TokenDelta
from kvrelay.worker.sampling_params import SamplingParams

from .admission import Ticket
from .router_errors import RouterError
from .text import ResponseBuilder


@dataclass(eq=False)
class Stream:
    """One request from admission to its end; touched on the event loop only."""

    request_id: str  # the client's
    worker_request_id: str  # the router's id for it on the worker, unique for the router's lifetime
    prompt_ids: list[int]
    params: SamplingParams
    ticket: Ticket
    arrival: float  # time.monotonic()
    deadline: float | None  # time.monotonic() after which the request is over; None = none
    out: ResponseBuilder
    events: asyncio.Queue[TokenDelta | RouterError] = field(default_factory=asyncio.Queue)
    rank: int = -1
    queued: bool = False  # in a pending submit batch (counted in num_queued)
    sent: bool = False  # handed to a worker's submit (the worker may hold it)
    submit_returned: bool = False  # that submit answered, so an abort now cannot overtake it
    worker_done: bool = False  # nothing left on the worker: it finished, died, or was told to abort
    failed: bool = False  # a failure is queued; later deltas are ignored
    closed: bool = False  # the adapter ended it; the ticket is released
    first_token_at: float | None = None
    last_token_at: float = 0.0

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


async def gather(s: Stream, interval: int) -> tuple[TokenDelta | None, RouterError | None]:
    """(what the stream's next response carries, or None; a failure to raise after it, or None).

    Waits for the first delta, then takes every delta already queued behind it; with interval > 1
    it waits on for more until `interval` tokens are gathered (see the module's doc). The deltas
    are merged into the first one, which is the caller's from then on."""
    pending: TokenDelta | None = None
    while True:
        event = await s.events.get()
        if isinstance(event, RouterError):
            return pending, event  # what was gathered goes out first
        if pending is None:
            pending = event
        else:
            pending.merge(event)
        while not s.events.empty() and pending.finish_reason is None:
            later = s.events.get_nowait()
            if isinstance(later, RouterError):
                return pending, later
            pending.merge(later)
        if (
            len(pending.token_ids) >= interval
            or s.first_token_at is None  # the first token goes at once
            or pending.finish_reason is not None
            or pending.deadline_exceeded
            or pending.error is not None
        ):
            return pending, None
