"""Shared by the overlapped-scheduling tests (CPU and GPU): a mixed workload, and a check of every
step's uploaded inputs against values rebuilt from the scheduler output and the allocator."""

from __future__ import annotations

from typing import Any

import torch
from engine_helpers import random_prompts

from kvrelay.worker.engine import Engine
from kvrelay.worker.request import CompletionOutput
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.scheduler import SchedulerOutput


def mixed_workload(make: Any) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts and params covering greedy, seeded sampling with filters, penalties, logprobs, stop ids,
    stop strings and max_tokens 1 and 2. Stop ids and strings are taken from a free run of `make()`,
    so they are hit."""
    prompts = random_prompts(10, [3, 40, 70, 17, 100], 256, seed=16)
    free = make().generate(prompts[4:6], SamplingParams(max_tokens=24, ignore_eos=True))
    long_run = SamplingParams(max_tokens=24, ignore_eos=True)
    params = [
        long_run,
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, min_p=0.05, seed=12, logprobs=3),
        SamplingParams(max_tokens=24, stop_token_ids=(free[0].token_ids[6],), ignore_eos=True),
        SamplingParams(max_tokens=24, stop=(free[1].text[4:7],), ignore_eos=True),
        SamplingParams(max_tokens=20, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3),
        SamplingParams(max_tokens=20, temperature=0.9, seed=13, frequency_penalty=0.5, logprobs=2),
        SamplingParams(max_tokens=2, ignore_eos=True),
        SamplingParams(max_tokens=20, logprobs=1),
    ]
    return prompts, params


def assert_same_outputs(got: list[CompletionOutput], want: list[CompletionOutput]) -> None:
    """Token-identical, same finish reasons and text; logprobs equal to float rounding (the batch
    around a request differs between the two paths, which may change the last bits)."""
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids, (g.request_id, g.token_ids, w.token_ids)
        assert (g.finish_reason, g.text, g.prompt_tokens) == (w.finish_reason, w.text, w.prompt_tokens)
        assert [lp.token_id for lp in g.logprobs] == [lp.token_id for lp in w.logprobs]
        assert [[t for t, _ in lp.top] for lp in g.logprobs] == [[t for t, _ in lp.top] for lp in w.logprobs]
        torch.testing.assert_close(
            [lp.logprob for lp in g.logprobs], [lp.logprob for lp in w.logprobs], rtol=1e-4, atol=1e-4
        )


def check_every_prepare(engine: Engine) -> list[int]:
    """Wrap engine.runner.prepare so each step's device inputs are compared with values rebuilt from
    the scheduler output and the allocator. Returns a list that counts the checked steps."""
    runner = engine.runner
    original = runner.prepare
    checked: list[int] = []

    def prepare(sched: SchedulerOutput, allocator: Any, prev_sampled: torch.Tensor | None = None) -> Any:
        inp = original(sched, allocator, prev_sampled)
        _compare(engine, sched, inp.meta.num_tokens, prev_sampled)
        checked.append(len(sched.scheduled))
        return inp

    runner.prepare = prepare  # type: ignore[method-assign]
    return checked


def _compare(engine: Engine, sched: SchedulerOutput, t: int, prev: torch.Tensor | None) -> None:
    buf, bs = engine.runner.buffers, engine.runner.block_size
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    qsl, seq_lens = [0], []
    width = buf.block_tables.shape[1]
    table = torch.zeros((len(sched.scheduled), width), dtype=torch.int32)
    prev_host = prev.cpu().tolist() if prev is not None else []
    for i, s in enumerate(sched.scheduled):
        blocks = list(engine.allocator.block_ids_view(s.request.request_id))
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for p in range(s.start, s.start + s.num_new_tokens):
            tok = s.request.all_token_ids[p]
            ids.append(prev_host[-1 - tok] if tok < 0 else tok)  # a placeholder: the previous sample
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + s.num_new_tokens)
        seq_lens.append(s.start + s.num_new_tokens)
    n = len(sched.scheduled)
    assert t == len(ids)
    assert buf.input_ids[:t].cpu().tolist() == ids
    assert buf.positions[:t].cpu().tolist() == pos
    assert buf.slot_mapping[:t].cpu().tolist() == slots
    assert buf.query_start_loc[: n + 1].cpu().tolist() == qsl
    assert buf.seq_lens[:n].cpu().tolist() == seq_lens
    assert torch.equal(buf.block_tables[:n].cpu(), table)
