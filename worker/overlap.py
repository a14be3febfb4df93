"""Overlapped (asynchronous) scheduling: the host prepares step N+1 while the device runs step N.

The synchronous step waits for step N's sampled tokens (`.tolist()`) before it schedules step
N+1, so the GPU idles for the host's scheduling, input packing, stop checks and output building.
Here (as vLLM v1's async scheduling and SGLang's overlap scheduler do) one `Engine.step()` call:

    1. schedules step N+1 as if every request that sampled in step N already had that token;
    2. launches step N+1: inputs packed and copied, the model and the sampler queued; a row whose
       input token is step N's sample reads it from step N's device tensor (a placeholder);
    3. only then waits for step N's tokens (a pinned copy and its event, queued at step N's
       launch) and does the host bookkeeping of step N: stops, logprobs, streaming outputs,
       prefix-cache hashes.

Placeholders. At launch, each request that samples gets a placeholder -(1 + j) appended to its
`all_token_ids`, j being its row in the step's sampled-token tensor, and its
`num_computed_tokens` advanced by what the step computes. So the scheduler sees one token left
to compute (the placeholder) and the model runner fills that input row from the previous step's
tokens on the device (`InputBuffers.resolve_placeholders`); the penalties count it on the device
(`PenaltyState.batch(pending=...)`). A request holds at most two placeholders: step N's (resolved
in this call) and step N+1's.

One step late, and what that changes:
- a request that stops at step N (EOS, a stop id or string) was already given a slot in step N+1;
  that slot is discarded when step N+1 resolves: the extra token is dropped, and its KV blocks
  were freed when it finished (the device writes to them are ordered before any later step that
  reuses them, one stream);
- a request whose step-N token ends it whatever its value (max_tokens, max_model_len, a prefill
  worker's one token) is not scheduled again (`Request.final_token_pending`);
- a block becomes hashable (prefix cache) one step later, when its tokens are all known; a request
  preempted before its step resolves keeps its token but has no blocks left to hash;
- a request aborted (or expired) while its step is in flight finishes at once; its token is dropped.
On the CPU the device work is synchronous, but the code path is this same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .request import Request, RequestOutput, RequestStatus
from .sampler import PendingSample
from .scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class InflightStep:
    """A launched step whose sampled tokens the host has not read yet."""

    # Rows of the step, with each request's preemption count at launch (a change means its blocks
    # were freed since: nothing left to hash).
    scheduled: list[tuple[ScheduledRequest, int]]
    # Row j of token_ids belongs to sampling[j]; its placeholder sits at all_token_ids[placed[j]].
    sampling: list[ScheduledRequest]
    placed: list[int]
    token_ids: torch.Tensor  # [S] int64 on the device: the next step's placeholder rows read it
    pending: PendingSample  # the same tokens (and logprobs) on their way to the host


def is_placeholder(token: int) -> bool:
    return token < 0


def drop_placeholders(req: Request) -> None:
    """A request that finishes with steps in flight: its unresolved tokens are never delivered."""
    while req.all_token_ids and is_placeholder(req.all_token_ids[-1]):
        req.all_token_ids.pop()


def launch(engine: Engine, sched: SchedulerOutput, prev: InflightStep | None) -> InflightStep:
    """Queue one step on the device (nothing here waits for it) and mark its samples as placeholders."""
    prev_tokens = prev.token_ids if prev is not None else None
    inp = engine.runner.prepare(sched, engine.allocator, prev_tokens)
    logits = engine.runner.execute(inp)  # [S, vocab], the model dtype, on the device
    sampling = [s for s in sched.scheduled if s.samples]
    requests = [s.request for s in sampling]
    sample = engine.sampler.sample(
        logits,
        [r.params for r in requests],
        seeds=[r.sampling_seed for r in requests],
        # num_output_tokens, placeholders included: the tokens before this one.
        counters=[len(r.all_token_ids) - len(r.prompt_token_ids) for r in requests],
        penalties=engine.penalties.batch(requests, pending=prev_tokens),
    )
    pending = sample.to_host()
    scheduled: list[tuple[ScheduledRequest, int]] = []
    for s in sched.scheduled:
        req = s.request
        req.num_computed_tokens += s.num_new_tokens
        scheduled.append((s, req.num_preemptions))
    placed: list[int] = []
    max_model_len = engine.max_model_len
    for j, req in enumerate(requests):
        ids = req.all_token_ids
        placed.append(len(ids))
        ids.append(-1 - j)
        num_tokens = len(ids)
        # Whatever the token, it ends the request: no slot for it in the next step.
        req.final_token_pending = (
            num_tokens - len(req.prompt_token_ids) >= req.params.max_tokens  # num_output_tokens
            or num_tokens >= max_model_len
        )
    return InflightStep(scheduled, sampling, placed, sample.token_ids, pending)


def resolve(engine: Engine, step: InflightStep) -> list[RequestOutput]:
    """Wait for a launched step's tokens; hash its full blocks, append its tokens, check stops."""
    out = step.pending.wait()
    tokens = out.token_ids.tolist()
    # Per request per step, hence locals and `status is FINISHED` for the is_finished property.
    finished = RequestStatus.FINISHED
    cache_full_blocks = engine.allocator.cache_full_blocks
    for s, preemptions in step.scheduled:
        req = s.request
        if req.status is finished or req.num_preemptions != preemptions:
            continue
        cache_full_blocks(req.request_id, req.all_token_ids, s.start + s.num_new_tokens)
    outputs: list[RequestOutput] = []
    append_token = engine.append_token
    logprobs = out.logprobs
    for j, (s, at) in enumerate(zip(step.sampling, step.placed, strict=True)):
        req = s.request
        if req.status is finished:  # stopped at the previous step, aborted or expired: the token is dropped
            continue
        ids = req.all_token_ids
        assert ids[at] == -1 - j, (req.request_id, at, ids[at:])
        # The request as the synchronous path sees it: known tokens only, then this one appended.
        later = ids[at + 1 :]  # the next step's placeholder, if it was scheduled
        del ids[at:]
        outputs.append(append_token(req, tokens[j], logprobs[j]))
        if later and req.status is not finished:
            # (final_token_pending, when set, is about that later placeholder: it stays.)
            ids += later
    return outputs
