"""The protocol-neutral router: streams, admission, routing, batched submits and aborts, drain and
metrics over a `WorkerPool`. The gRPC servicer (`cluster/router.py`) and the OpenAI HTTP app
(`cluster/http_api.py`) are thin adapters over it.

One request's life, whatever the protocol:

    stream = await core.open(prompt, sampling, request_id, deadline, arrival)   # or RouterError
    async for response in core.responses(stream): ...                            # or RouterError
    core.close(stream, outcome)                                                  # always, once

`open` validates (INVALID_ARGUMENT naming the field and the limit), renders a chat prompt with the
model's template and tokenizes text off the event loop, admits or refuses (RESOURCE_EXHAUSTED),
picks a worker (`routing.Balancer`; UNAVAILABLE when none is healthy) and queues the request for
submission: every request bound for one worker within one event-loop iteration (or
`batch_window_s`) goes in one `submit` call. The worker's deltas come back through `on_deltas`
into the stream's queue (`cluster/stream.py`); `responses` turns what `stream.gather` takes from it
(one delta, or those that queued up, or `stream_interval` tokens) into one `pb.GenerateResponse`
(new tokens, text, logprobs; on the last, finish reason and usage).

Request ids: the client's (empty: a uuid) is echoed in every response; a second request with the id
of a stream still open is refused with ALREADY_EXISTS. Workers see ids of the router's own
(`Stream.worker_request_id`), so a client reusing an id right after cancelling it never meets the
old request.

Ending a stream, whatever way, releases its admission ticket and, if the worker still runs the
request, aborts it there (batched like submits) so its KV blocks are freed within one step:
- finished by the worker (STOP, LENGTH, or ABORT when the worker gave up on it): OK;
- a stop string matched on the text: OK, STOP;
- the client went away, or its deadline passed here: the adapter closes with CANCELLED /
  DEADLINE_EXCEEDED (the remaining deadline also travels with the request, so the worker stops it
  by itself; a request whose deadline passes before it is sent never reaches a worker);
- the worker died (`on_worker_down`): UNAVAILABLE at once for each of its streams;
- the server drains and the grace period ends: UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker import hop_trace
from kvrelay.worker.protocol import TokenDelta, WorkerLoad
from kvrelay.worker.sampling_params import SamplingParams

from .admission import Admission, AdmissionFull, Ticket
from .config import ServerConfig
from .interfaces import WorkerClient, WorkerPool
from .metrics import ServerMetrics
from .router_errors import RouterError, Status, internal_error
from .routing import Balancer, PerWorkerBatcher
from .stream import Stream, gather
from .text import ResponseBuilder, TextCodec
from .validation import (
    ChatPrompt,
    Limits,
    Prompt,
    check_prompt,
    check_prompt_input,
    check_request_id,
    remaining_context,
    sampling_params,
    work_request,
)

__all__ = ["RouterCore", "RouterError", "Status", "Stream", "internal_error"]
log = logging.getLogger("kvrelay")
# A token id is a uint32 varint of at most 5 bytes on the wire.
_MAX_BYTES_PER_TOKEN_ID = 5


class RouterCore:
    def __init__(self, pool: WorkerPool, config: ServerConfig, *, worker_id_prefix: str = "") -> None:
        """worker_id_prefix: set when several routers share the workers (router processes), so
        their worker request ids never collide; unique per router incarnation."""
        self._pool = pool
        self._worker_id_prefix = worker_id_prefix
        self.config = config
        self.metrics = ServerMetrics(self._worker_snapshot)
        self._admission = Admission(config.max_queued_requests, config.max_queued_tokens)
        self._codec: TextCodec | None = None
        self._limits: Limits | None = None
        self._balancer: Balancer | None = None
        self._streams: dict[str, Stream] = {}  # by client request id
        self._by_worker_id: dict[str, Stream] = {}  # by worker_request_id
        self._seq = 0
        self._num_queued = 0  # admitted, not yet sent to a worker
        self._num_requests_total = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._submits = PerWorkerBatcher(self._submit, config.batch_window_s)
        self._aborts = PerWorkerBatcher(self._abort)  # at once: every step they wait costs KV
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics.track_gauges(lambda: len(self._streams), lambda: self._num_queued)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pool (every worker ready), load the tokenizer, then report serving."""
        await self._pool.start(self.on_deltas, self.on_worker_down, self.on_worker_up)
        model = self._pool.model
        longest = model.max_model_len * _MAX_BYTES_PER_TOKEN_ID
        if longest > self.config.max_message_bytes:
            log.warning(
                "max_message_bytes %d may refuse prompts near max_model_len %d (up to %d bytes of ids)",
                self.config.max_message_bytes, model.max_model_len, longest,
            )  # fmt: skip
        self._codec = await asyncio.to_thread(TextCodec.load, model)
        self._limits = Limits.of(
            model,
            accepts_text=self._codec.accepts_text,
            default_max_tokens=self.config.default_max_tokens,
            has_chat_template=self._codec.has_chat_template,
        )
        self._balancer = Balancer(self.config.routing, model.block_size, model.kv_capacity_tokens)
        self._update_health()

    async def drain(self, grace_s: float) -> None:
        """Stop serving and refuse new requests at once; let open streams finish for up to grace_s,
        then fail the rest with UNAVAILABLE."""
        self._draining = True
        await self._sync_health()
        if not self._streams:
            return
        log.info("draining: %d streams open, %.1f s grace", len(self._streams), grace_s)
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except asyncio.TimeoutError:
            log.warning("drain grace over: failing %d open streams", len(self._streams))
            for s in list(self._streams.values()):
                self._fail(s, Status.UNAVAILABLE, "the server shut down before the request finished")
            try:
                await asyncio.wait_for(self._idle.wait(), 2.0)
            except asyncio.TimeoutError:
                log.warning("%d streams did not end after the grace period", len(self._streams))

    async def stop(self) -> None:
        """Stop the pool (after drain and after the servers stopped)."""
        self._submits.close()
        self._aborts.close()
        await self._pool.stop()
        for t in list(self._tasks):
            t.cancel()
        if self._codec is not None:
            self._codec.close()

    @property
    def serving(self) -> bool:
        """Started, not draining, and some worker healthy."""
        return not self._draining and self._limits is not None and any(w.healthy for w in self._pool.workers)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def model_name(self) -> str:
        return self._pool.model.model

    @property
    def limits(self) -> Limits | None:
        """None until started."""
        return self._limits

    @property
    def codec(self) -> TextCodec | None:
        """None until started."""
        return self._codec

    # ---- one request ----------------------------------------------------------------------
    async def open(
        self,
        prompt: Prompt,
        sampling: pb.SamplingParams,
        request_id: str = "",
        deadline: float | None = None,
        arrival: float | None = None,
        *,
        max_tokens_to_context: bool = False,
    ) -> Stream:
        """Validate, tokenize, admit, register and route; raises RouterError when refused.
        sampling: the wire-neutral params (proto zeros are defaults), checked against the model's
        limits here. deadline: time.monotonic() after which the request is over (None: none).
        max_tokens_to_context: a max_tokens left 0 means the rest of the context (what one worker's
        KV cache holds at most), not the server's default (OpenAI chat's and vLLM's default)."""
        arrival = time.monotonic() if arrival is None else arrival
        if self._draining:
            raise RouterError(Status.UNAVAILABLE, "the server is shutting down")
        limits, codec, balancer = self._limits, self._codec, self._balancer
        if limits is None or codec is None or balancer is None:
            raise RouterError(Status.UNAVAILABLE, "the server is starting")
        self._num_requests_total += 1
        to_context = max_tokens_to_context and sampling.max_tokens == 0
        request_id, params, ids, ticket = await self._admit(
            prompt, sampling, request_id, limits, codec, to_context
        )
        self._seq += 1
        s = Stream(
            request_id=request_id,
            worker_request_id=f"{self._worker_id_prefix}{self._seq:x}",
            prompt_ids=ids,
            params=params,
            ticket=ticket,
            arrival=arrival,
            deadline=deadline,
            # skip_text: the client decodes itself, so no detokenizer runs for it (no stop strings
            # either: `sampling_params` refuses them together).
            out=ResponseBuilder(
                request_id, None if sampling.skip_text else codec.detokenizer(ids, params.stop)
            ),
        )
        self._streams[request_id] = s
        self._by_worker_id[s.worker_request_id] = s
        self._idle.clear()
        rank = balancer.pick(ids, self._pool.workers)
        if rank is None:
            self._fail(s, Status.UNAVAILABLE, "no worker is available; retry later")
            return s
        s.rank = rank
        balancer.sent(rank, s.worker_request_id, ticket.tokens)
        s.queued = True
        self._num_queued += 1
        self._submits.add(rank, s)
        if hop_trace.ENABLED:
            hop_trace.mark("router_arrival", (s.worker_request_id,), at=arrival)
            hop_trace.mark("router_open", (s.worker_request_id,))
        return s

    async def _admit(
        self,
        prompt: Prompt,
        sampling: pb.SamplingParams,
        request_id: str,
        limits: Limits,
        codec: TextCodec,
        to_context: bool,
    ) -> tuple[str, SamplingParams, list[int], Ticket]:
        """(request id, sampling params, prompt ids, admission ticket), or RouterError."""
        try:
            request_id = check_request_id(request_id, limits) or uuid.uuid4().hex
            params = sampling_params(sampling, limits)
            check_prompt_input(prompt, limits)
            if request_id in self._streams:
                raise RouterError(Status.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight")
            self._admission.check_room()  # before tokenizing: a flood must not queue up tokenizer work
            if isinstance(prompt, ChatPrompt):
                ids = await codec.render_chat(prompt.messages)
            elif isinstance(prompt, str):
                ids = await codec.encode(prompt)
            else:
                ids = prompt
            if to_context:
                params = dataclasses.replace(params, max_tokens=max(1, remaining_context(len(ids), limits)))
            check_prompt(ids, params, limits)
            ticket = self._admission.admit(len(ids) + params.max_tokens)
        except ValueError as e:
            raise RouterError(Status.INVALID_ARGUMENT, str(e)) from None
        except AdmissionFull as e:
            raise RouterError(Status.RESOURCE_EXHAUSTED, str(e)) from None
        if request_id in self._streams or self._draining:  # while the prompt was being tokenized
            self._admission.release(ticket)
            if self._draining:
                raise RouterError(Status.UNAVAILABLE, "the server is shutting down")
            raise RouterError(Status.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight")
        return request_id, params, ids, ticket

    async def responses(self, s: Stream) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The stream's responses until its last (finish reason and usage); RouterError on failure.
        Each response carries what `gather` collected: one delta, or several (a busy reader, or
        `stream_interval`)."""
        while True:
            d, error = await gather(s, self.config.stream_interval)
            if d is not None:
                resp, finished = self._respond(s, d)
                if resp is not None:
                    yield resp
                if finished:
                    return
            if error is not None:
                raise error

    def _respond(self, s: Stream, d: TokenDelta) -> tuple[pb.GenerateResponse | None, bool]:
        """The response for one delta, and whether it is the last."""
        if d.deadline_exceeded:
            raise RouterError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
        if d.error is not None:  # a serving-system failure (a KV handoff under the "fail" policy)
            raise RouterError(Status.UNAVAILABLE, f"{d.error}; retry the request")
        resp, stopped = s.out.build(d)
        if stopped:
            self._release_worker(s)
        if resp is not None and resp.token_ids:
            now = time.monotonic()
            if s.first_token_at is None:
                s.first_token_at = now
                self.metrics.ttft.observe(now - s.arrival)
                hop_trace.mark("router_yield_first", (s.worker_request_id,))
            else:
                self.metrics.inter_token.observe((now - s.last_token_at) / len(resp.token_ids))
            s.last_token_at = now
            self.metrics.generated_tokens.inc(len(resp.token_ids))
        return resp, s.out.finished

    def close(self, s: Stream | None, outcome: Status, arrival: float) -> None:
        """The adapter is done with the request, whatever way (s None: it never opened): release
        everything the stream holds. outcome is what the client was told (for the logs and metrics
        the adapter keeps; the worker is aborted whatever it is)."""
        if s is not None and s.closed:
            return  # closed before (an adapter's safety net may call again)
        self.metrics.e2e.observe(time.monotonic() - arrival)
        if s is None:
            return
        s.closed = True
        self._dequeue(s)  # a pending submit batch skips it
        del self._streams[s.request_id]
        del self._by_worker_id[s.worker_request_id]
        self._admission.release(s.ticket)
        if self._balancer is not None:
            self._balancer.confirmed(s.rank, s.worker_request_id)
        self._release_worker(s)
        if not self._streams:
            self._idle.set()

    def cancel(self, s: Stream) -> None:
        """The client went away while the reader waits: wake it with CANCELLED and abort the request
        on its worker now, not when the reader next runs."""
        if s.closed:
            return
        self._fail(s, Status.CANCELLED, "the client went away")
        self._release_worker(s)

    def _fail(self, s: Stream, status: Status, message: str) -> None:
        """Queue a failure for the stream's reader, and release what it holds now (the reader may be
        blocked writing to a slow client)."""
        if s.failed or s.closed:
            return
        s.failed = True
        self._dequeue(s)
        s.events.put_nowait(RouterError(status, message))
        self._admission.release(s.ticket)
        if self._balancer is not None:
            self._balancer.confirmed(s.rank, s.worker_request_id)

    def _dequeue(self, s: Stream) -> None:
        if s.queued:
            s.queued = False
            self._num_queued -= 1

    def _release_worker(self, s: Stream) -> None:
        """Abort the request on its worker unless nothing is left there."""
        if not s.sent or s.worker_done:
            return
        if s.submit_returned:  # else _submit aborts it when the submit answers
            s.worker_done = True
            self._aborts.add(s.rank, s.worker_request_id)

    # ---- batching submits and aborts per worker ------------------------------------------
    def _worker(self, rank: int) -> WorkerClient:
        w = self._pool.workers[rank]
        assert w.rank == rank, (w.rank, rank)
        return w

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _abort(self, rank: int, worker_request_ids: list[str]) -> None:
        await self._worker(rank).abort(worker_request_ids)

    async def _submit(self, rank: int, streams: list[Stream]) -> None:
        """One submit call for the streams routed to `rank` since the last one."""
        worker = self._worker(rank)
        now = time.monotonic()
        batch: list[Stream] = []
        requests = []
        for s in streams:
            self._dequeue(s)
            if s.closed or s.failed:
                continue
            timeout = None if s.deadline is None else s.deadline - now
            if timeout is not None and timeout <= 0:
                self._fail(
                    s, Status.DEADLINE_EXCEEDED, "deadline exceeded before the request reached a worker"
                )
                continue
            s.sent = True
            self.metrics.queue_time.observe(now - s.arrival)
            batch.append(s)
            requests.append(work_request(s.worker_request_id, s.prompt_ids, s.params, timeout))
        if not batch:
            return
        if hop_trace.ENABLED:
            hop_trace.mark("router_submit", [s.worker_request_id for s in batch])
        try:
            rejected = await worker.submit(requests)
        except ConnectionError:
            for s in batch:
                s.worker_done = True
                self._fail(s, Status.UNAVAILABLE, f"worker {worker.rank} is unavailable; retry the request")
            return
        for s in batch:
            s.submit_returned = True
            why = rejected.get(s.worker_request_id)
            if why is not None:
                s.worker_done = True
                self._fail(s, Status.INVALID_ARGUMENT, why)
            elif s.closed or s.failed:  # ended while the submit was in flight
                self._release_worker(s)

    # ---- pool callbacks (on the event loop) ---------------------------------------------
    def on_deltas(self, rank: int, deltas: list[TokenDelta]) -> None:
        balancer = self._balancer
        for d in deltas:
            s = self._by_worker_id.get(d.request_id)
            if s is None or s.rank != rank or s.failed:
                continue  # e.g. the final ABORT delta of a request this router aborted
            if balancer is not None:
                balancer.confirmed(rank, s.worker_request_id)
            if d.finish_reason is not None:
                s.worker_done = True
            if hop_trace.ENABLED and s.first_token_at is None and d.token_ids:
                hop_trace.mark("router_recv_first", (s.worker_request_id,))
            s.events.put_nowait(d)

    def on_worker_down(self, rank: int, why: str) -> None:
        victims = [s for s in self._streams.values() if s.rank == rank and not s.failed]
        log.warning("worker %d is down (%s): failing its %d streams", rank, why, len(victims))
        if self._balancer is not None:
            self._balancer.forget_worker(rank)
        self._aborts.drop(rank)
        for s in victims:
            s.worker_done = True
            self._fail(s, Status.UNAVAILABLE, f"worker {rank} became unavailable; retry the request")
        self._update_health()

    def on_worker_up(self, rank: int) -> None:
        log.info("worker %d is back", rank)
        if self._balancer is not None:
            self._balancer.forget_worker(rank)  # restarted empty: its prefix cache is gone
        self._update_health()

    # ---- health and stats ---------------------------------------------------------------
    def _update_health(self) -> None:
        self._spawn(self._sync_health())

    async def _sync_health(self) -> None:
        """Publishes `serving` where a protocol reports health by push (gRPC health); HTTP reads it."""

    def worker_of(self, request_id: str) -> int | None:
        """The rank serving an open stream (None: unknown, or not yet routed)."""
        s = self._streams.get(request_id)
        return None if s is None or s.rank < 0 else s.rank

    def _worker_snapshot(self) -> list[tuple[int, bool, WorkerLoad]]:
        if self._limits is None:
            return []
        return [(w.rank, w.healthy, w.load) for w in self._pool.workers]
