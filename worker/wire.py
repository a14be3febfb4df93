"""The data plane's wire format: every message between a router and a worker's `DataPlaneServer`.

One zmq frame per message: a version byte, then one msgpack array `[kind, *fields]`. Dataclasses
travel as compact positional arrays (no field names, no pickles), so nothing a peer sent is ever
unpickled, and decoding rebuilds our own dataclasses, whose constructors validate
(`SamplingParams` checks its ranges). A frame that is not well formed raises `WireError`;
the receiver logs and drops it.

    router -> worker   HELLO(router_id)  SUBMIT(seq, [request])  ABORT([id])  BYE()
    worker -> router   SUBMITTED(seq, {id: message})  DELTAS([delta], load)
                       LOAD(load, incarnation)  ERROR(message)

and, inside one worker, between its engine loop and its data plane's process (worker/loop_link.py)
the kinds from OUT on (a router that sends one is refused like any malformed frame).

The field order of each array is the dataclass's field order; a change to a dataclass that
crosses here bumps VERSION (peers of different versions refuse each other's frames).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import msgpack

from .protocol import (
    EngineStats,
    FinishReason,
    HandoffTarget,
    TokenDelta,
    TokenLogprobs,
    WorkerLoad,
    WorkRequest,
)
from .sampling_params import SamplingParams

VERSION = 1
_VERSION_BYTE = bytes([VERSION])


class Kind(enum.IntEnum):
    HELLO = 1
    SUBMIT = 2
    ABORT = 3
    BYE = 4
    SUBMITTED = 10
    DELTAS = 11
    LOAD = 12
    ERROR = 13
    # Between a worker's engine loop and its data plane's own process (worker/loop_link.py), on a
    # local ipc link; never accepted from a router. Loop -> data plane:
    OUT = 20  # [delta], load (engine counters or None), loop thread CPU s, loop process CPU s
    ANSWER = 21  # token, {request_id: refusal}: a SUBMIT applied
    BROKEN = 22  # message: the loop broke or was shut down, after its final OUT
    STOP = 23  # close the data plane and exit
    CLAIM = 24  # [request_id], router_id (WorkerActor.reserve)
    RELEASE = 25  # [request_id]
    RELEASE_ALL = 26
    # Data plane -> loop: READY(address) once bound, then SUBMIT(token, [request]) and ABORT([id]).
    READY = 27


class WireError(ValueError):
    """A frame that is not a well-formed message of this version."""


_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))
_FINISH = {r.value: r for r in FinishReason}


# ---- frames ------------------------------------------------------------------------------------
def pack(kind: Kind, *fields: Any) -> bytes:
    return _VERSION_BYTE + msgpack.packb([int(kind), *fields], use_bin_type=True)


def unpack(frame: bytes) -> tuple[Kind, list[Any]]:
    """(kind, fields) of one frame; WireError when it is not a message of this version."""
    if not frame or frame[0] != VERSION:
        raise WireError(f"version byte {frame[:1]!r} is not {VERSION}")
    try:
        msg = msgpack.unpackb(frame[1:], raw=False, strict_map_key=False, use_list=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise WireError(f"not msgpack: {e}") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
        raise WireError("a message is an array [kind, ...]")
    try:
        return Kind(msg[0]), msg[1:]
    except ValueError:
        raise WireError(f"unknown message kind {msg[0]}") from None


# ---- router -> worker --------------------------------------------------------------------------
def encode_request(r: WorkRequest) -> list[Any]:
    p = r.params
    params = [list(v) if isinstance(v, tuple) else v for v in (getattr(p, f) for f in _PARAM_FIELDS)]
    h = r.handoff
    handoff = None if h is None else [h.peer, h.slot, h.expected, h.dst_block_ids, h.skip_blocks]
    return [r.request_id, r.prompt_token_ids, params, r.timeout_s, handoff]


def decode_request(x: Any) -> WorkRequest:
    """Raises WireError naming what is malformed (SamplingParams' own ValueError included)."""
    try:
        rid, prompt, params, timeout_s, handoff = x
        _check(isinstance(rid, str), "request_id is a string")
        _check(isinstance(prompt, list) and all(type(t) is int for t in prompt), "prompt is a list of ints")
        _check(isinstance(params, list) and len(params) == len(_PARAM_FIELDS), "params has every field")
        _check(timeout_s is None or isinstance(timeout_s, (int, float)), "timeout_s is a number")
        kw: dict[str, Any] = {
            f: tuple(v) if isinstance(v, list) else v for f, v in zip(_PARAM_FIELDS, params, strict=True)
        }
        target = None
        if handoff is not None:
            peer, slot, expected, dst, skip = handoff
            target = HandoffTarget(str(peer), int(slot), int(expected), [int(b) for b in dst], int(skip))
        return WorkRequest(rid, prompt, SamplingParams(**kw), timeout_s, target)
    except WireError:
        raise
    except (TypeError, ValueError) as e:
        raise WireError(f"malformed request: {e}") from None


def submit(seq: int, requests: Sequence[WorkRequest]) -> bytes:
    return pack(Kind.SUBMIT, seq, [encode_request(r) for r in requests])


# ---- worker -> router --------------------------------------------------------------------------
def encode_delta(d: TokenDelta) -> list[Any]:
    lps = [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in d.logprobs]
    finish = None if d.finish_reason is None else d.finish_reason.value
    return [
        d.request_id,
        d.token_ids,
        lps,
        finish,
        d.deadline_exceeded,
        d.prompt_tokens,
        d.completion_tokens,
        d.cached_prompt_tokens,
        d.error,
    ]


def decode_delta(x: Any) -> TokenDelta:
    try:
        rid, ids, lps, finish, expired, prompt, completion, cached, error = x
        logprobs = [
            TokenLogprobs(int(t), float(lp), tuple((int(i), float(v)) for i, v in top)) for t, lp, top in lps
        ]
        reason = None if finish is None else _FINISH[finish]
        return TokenDelta(
            str(rid),
            list(ids),
            logprobs,
            reason,
            bool(expired),
            int(prompt),
            int(completion),
            int(cached),
            error,
        )
    except (TypeError, ValueError, KeyError) as e:
        raise WireError(f"malformed delta: {e}") from None


def encode_load(load: WorkerLoad, *, with_stats: bool = True) -> list[Any]:
    """with_stats=False: the engine's counters are left out (None), as in DELTAS: they ride on the
    heartbeats only, since they cost more to encode than a step's deltas."""
    s = load.stats
    stats = (
        [list(v) if isinstance(v, tuple) else v for v in (getattr(s, f) for f in _STATS_FIELDS)]
        if with_stats
        else None
    )
    return [
        load.num_running,
        load.num_waiting,
        load.kv_usage,
        load.num_free_blocks,
        load.outstanding_tokens,
        load.num_kv_blocks,
        stats,
    ]


def decode_load(x: Any) -> tuple[WorkerLoad, bool]:
    """(load, whether it carried the engine's counters; else its stats are all zero)."""
    try:
        running, waiting, usage, free, outstanding, blocks, stats = x
        engine_stats = EngineStats()
        if stats is not None:
            _check(len(stats) == len(_STATS_FIELDS), "stats has every field")
            kw: dict[str, Any] = {
                f: tuple(v) if isinstance(v, list) else v for f, v in zip(_STATS_FIELDS, stats, strict=True)
            }
            engine_stats = EngineStats(**kw)
        load = WorkerLoad(
            int(running), int(waiting), float(usage), int(free), int(outstanding), int(blocks), engine_stats
        )
        return load, stats is not None
    except WireError:
        raise
    except (TypeError, ValueError) as e:
        raise WireError(f"malformed load: {e}") from None


def deltas(items: Sequence[TokenDelta], load: WorkerLoad) -> bytes:
    return pack(Kind.DELTAS, [encode_delta(d) for d in items], encode_load(load, with_stats=False))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise WireError(f"malformed message: expected {what}")
