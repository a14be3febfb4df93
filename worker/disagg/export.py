"""Disaggregated serving, the prefill side: hand a finished prompt's KV blocks and its first token
to the decode worker that reserved them (`HandoffTarget`), through `memory_model`'s `KVSender`."""

from __future__ import annotations

import logging

from ...memory_model.mailbox import Payload, Status
from ...memory_model.transport import KVSender
from ..kv_cache.block_allocator import BlockAllocator
from ..protocol import TokenLogprobs
from ..request import Request

log = logging.getLogger("kvrelay")


def export_prefill(
    sender: KVSender, allocator: BlockAllocator, req: Request, token: int, lp: TokenLogprobs | None
) -> str | None:
    """Copies req's prompt blocks [target.skip_blocks, ceil(prompt / block_size)) into the target's
    blocks and publishes the first token in its mailbox. Returns why it failed (then nothing was
    written to the decode worker), None on success."""
    target = req.handoff
    assert target is not None
    n = -(-req.num_prompt_tokens // allocator.block_size)
    src = allocator.get_block_ids(req.request_id)[target.skip_blocks : n]
    payload = Payload(Status.OK, token, lp.logprob if lp else None, lp.top if lp else ())
    try:
        sender.send(target.peer, target.slot, target.expected, src, target.dst_block_ids, payload)
    except Exception as e:
        log.error("KV handoff of %s to %s failed: %s: %s", req.request_id, target.peer, type(e).__name__, e)
        return f"KV handoff failed: {type(e).__name__}"
    return None
