"""The engine one worker owns: schedule, run, sample, update; one `step()` at a time.

Not thread-safe: one thread drives `step()` (the worker actor's loop, or `generate`), and
requests are added and aborted from that same thread between steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .attention.backend import AttentionBackend
from .attention.torch_backend import TorchPagedAttention
from .config import EngineConfig, resolve_device, resolve_dtype
from .disagg.role import KvRole, role_class
from .kv_cache.block_allocator import BlockAllocator
from .memory_plan import MemoryPlanner
from .model.config import ModelConfig
from .model.gemv import set_gemv_impl
from .model.gguf_loader import is_gguf_path, open_gguf
from .model.loader import load_model, resolve_model
from .model.presets import is_random_model, random_model
from .model_runner import ModelRunner
from .overlap import InflightStep, drop_placeholders, launch, resolve
from .penalties import PenaltyState
from .protocol import EngineStats, HandoffTarget, TokenLogprobs, check_prompt_fits
from .request import CompletionOutput, FinishReason, Request, RequestOutput, RequestStatus
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .step_timer import StepTimer
from .text.detokenizer import IncrementalDetokenizer
from .text.tokenizer import Tokenizer

log = logging.getLogger("kvrelay")
_DEFAULT_PARAMS = SamplingParams()


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer: Tokenizer | None = None
        if is_random_model(config.model):
            self.model, self.model_config = random_model(
                config.model, self.dtype, self.device, self._attention_backend()
            )
        else:
            model_dir = resolve_model(config.model)
            # A GGUF file is opened once for its weights and its tokenizer (parsing its metadata
            # takes seconds for a large vocabulary); the reader, and its memory map, end here.
            reader = open_gguf(model_dir) if is_gguf_path(model_dir) else None
            self.model, self.model_config = load_model(
                model_dir, self.dtype, self.device, self._attention_backend(), reader
            )
            self.tokenizer = Tokenizer.load(model_dir, reader)
        # Before graphs are captured: the captured kernels are the ones this picks.
        set_gemv_impl(self.model, "auto" if config.narrow_gemv else "torch")
        self.max_model_len = self._max_model_len(self.model_config)
        self.step_timer = StepTimer()
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)

        # Disaggregated serving: what this worker does with its KV besides decoding from it.
        role = role_class(config.kv_role)
        planner = MemoryPlanner(
            config, self.model, self.model_config, self.device, self.dtype, self.max_model_len
        )
        decode_buckets, token_buckets = planner.decode_buckets(role), planner.token_buckets()
        pool = planner.make_kv_pool(role, decode_buckets, token_buckets)
        num_blocks = pool.layout.num_blocks
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.allocator,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.runner = ModelRunner(
            self.model,
            pool.caches,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            device=self.device,
        )
        if decode_buckets or token_buckets:
            self.runner.capture_cuda_graphs(
                decode_buckets,
                hidden_size=self.model_config.hidden_size,
                dtype=self.dtype,
                token_buckets=token_buckets,
            )
        self.sampler = Sampler(seed=config.seed)  # seeds the requests that bring none
        # Token counts of penalized requests, on the device across steps (no memory until one comes).
        self.penalties = PenaltyState(self.model_config.vocab_size, self.device)
        # A decode worker receives KV (handoff), a prefill worker sends it, a colocated one neither.
        self.role: KvRole = role(self, config, pool)
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        # Overlapped scheduling: the step launched last, its tokens not yet read by the host.
        self._inflight: InflightStep | None = None

    def _attention_backend(self) -> AttentionBackend:
        name = self.config.attention_backend
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "torch"
        if name == "torch":
            return TorchPagedAttention()
        from .attention.triton_backend import TritonPagedAttention

        return TritonPagedAttention()

    def _max_model_len(self, mc: ModelConfig) -> int:
        limit = mc.max_model_len
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.config.max_model_len} exceeds the model's limit of {limit} tokens"
            )
        return self.config.max_model_len

    # ---- requests ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                "prompt: this model has no tokenizer.json, so text prompts are refused; send token ids"
            )
        return self.tokenizer.encode(text)

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None = None,
        handoff: HandoffTarget | None = None,
    ) -> None:
        """Queue a request; raises ValueError naming the field and the limit when it cannot be served."""
        self.role.check_new(request_id, params, handoff)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt: text must not be empty")
        if self.role.holds(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        req = self.new_request(request_id, ids, params, deadline)
        req.handoff = handoff
        self.scheduler.add(req)
        self.role.added(req)

    def new_request(
        self, request_id: str, ids: list[int], params: SamplingParams, deadline: float | None
    ) -> Request:
        """A validated request, registered but not yet scheduled."""
        req = Request(request_id, ids, params, eos_token_ids=self.eos_token_ids, deadline=deadline)
        req.sampling_seed = params.seed if params.seed is not None else self.sampler.new_seed()
        if self.tokenizer is not None and self.config.detokenize:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, stop=params.stop)
        self.requests[request_id] = req
        return req

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt: must hold at least 1 token, got an empty prompt")
        check_prompt_fits(
            ids,
            params.max_tokens,
            vocab_size=vocab,
            max_model_len=self.max_model_len,
            kv_capacity_tokens=self.allocator.num_blocks * self.allocator.block_size,
            ids_field="prompt",
            total_field=None,
            capacity_name="the KV cache capacity",
        )
        if params.top_k > vocab:
            raise ValueError(f"top_k must be <= the vocabulary size {vocab}, got {params.top_k}")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        waiting_for_kv = self.role.cancel(request_id)
        if waiting_for_kv is not None:
            return waiting_for_kv
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.scheduler.remove(req)
        return self._finish(req, FinishReason.ABORT, [], "", [])

    def has_unfinished_requests(self) -> bool:
        """True while a step() could still produce something (a launched step counts)."""
        return self.scheduler.num_unfinished > 0 or self.role.num_pending > 0 or self._inflight is not None

    # ---- disaggregated serving: what the receiver calls (worker/disagg/receiver.py) ----------------
    def admit_handed_off(self, req: Request, first: tuple[int, TokenLogprobs | None]) -> RequestOutput:
        """The prompt's KV arrived (blocks already held by req): decode from the producer's token."""
        req.num_computed_tokens = req.num_prompt_tokens
        self.allocator.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        self.scheduler.admit_running(req)
        return self.append_token(req, first[0], first[1])

    def requeue_locally(self, req: Request) -> None:
        """A handoff given up under the recompute policy: prefill the request here instead."""
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.scheduler.add(req)

    def finish_unscheduled(self, req: Request, reason: FinishReason) -> RequestOutput:
        """End a request that is in no scheduler queue (its blocks are the caller's business)."""
        return self._finish(req, reason, [], "", [])

    # ---- one step ---------------------------------------------------------------------
    def step(
        self, *, on_kv_arrival: Callable[[list[RequestOutput]], None] | None = None
    ) -> list[RequestOutput]:
        """Schedule, run the model once, sample; returns an output per request that advanced.

        The KV mailbox is polled here, once per step (its one call site): handed-off requests whose
        KV arrived join this step's batch with the producer's first token. on_kv_arrival, when
        given, takes those first tokens before the model runs (the engine loop streams them while
        the step runs: TTFT); otherwise they lead the returned list.

        With async_scheduling (worker/overlap.py) the step is launched and the outputs returned
        are the previous step's: its tokens are read only once this one is queued."""
        outputs = self.role.poll()
        if outputs and on_kv_arrival is not None:
            on_kv_arrival(outputs)
            outputs = []
        sched = self.scheduler.schedule()
        outputs += [
            self._finish(r, FinishReason.ABORT, [], "", [], deadline_exceeded=True) for r in sched.expired
        ]
        if self.async_scheduling:
            return outputs + self._step_overlapped(sched)
        if sched.is_empty:
            return outputs
        self.num_steps += 1
        started = time.perf_counter()
        inp = self.runner.prepare(sched, self.allocator)
        logits = self.runner.execute(inp)  # [S, vocab], the model dtype
        sampling = [s for s in sched.scheduled if s.samples]
        sampled = self.sampler(
            logits,
            [s.request.params for s in sampling],
            seeds=[s.request.sampling_seed for s in sampling],
            counters=[s.request.num_output_tokens for s in sampling],
            penalties=self.penalties.batch([s.request for s in sampling]),
        )
        token_ids = sampled.token_ids.tolist()
        cache_full_blocks, append_token = self.allocator.cache_full_blocks, self.append_token
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        for s, tok, lp in zip(sampling, token_ids, sampled.logprobs, strict=True):
            outputs.append(append_token(s.request, tok, lp))
        # Prepare to the last token appended (the tolist() above waits for the device).
        self.step_timer.record(time.perf_counter() - started)
        return outputs

    def _step_overlapped(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """Launch this step, then resolve the previous one (worker/overlap.py): the host work of
        step N runs while the device computes step N+1. Outputs are step N's."""
        launched = None
        started = time.perf_counter()
        if not sched.is_empty:
            self.num_steps += 1
            launched = launch(self, sched, self._inflight)
        done, self._inflight = self._inflight, launched
        outputs = resolve(self, done) if done is not None else []
        if launched is not None:  # launch to the previous step's tokens: the step's period when busy
            self.step_timer.record(time.perf_counter() - started)
        return outputs

    def append_token(self, req: Request, token: int, lp: TokenLogprobs | None) -> RequestOutput:
        """Deliver one sampled token of req: append it, check stops and length, detokenize, hand
        off a prefill worker's request, finish the request if it ends here; returns its output.

        Package-internal: called for every sampled token by the synchronous step, the overlapped
        step's resolve (worker/overlap.py) and admit_handed_off, between steps, on the stepping
        thread. req's computed-token count must already cover the step that sampled token."""
        # Runs once per output token: the request's lengths are read once, its params bound once.
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        # A prefill worker's request: its KV goes to the decode worker (None: sent, or no handoff;
        # export returns None without a handoff, so the common case skips the call).
        handoff_error = None if req.handoff is None else self.role.export(self.allocator, req, token, lp)
        ids, params = req.all_token_ids, req.params
        ids.append(token)
        num_tokens = len(ids)
        num_output = num_tokens - len(req.prompt_token_ids)
        logprobs = [lp] if lp is not None else []
        reason: FinishReason | None = None
        if token in params.stop_token_ids or (token in req.eos_token_ids and not params.ignore_eos):
            reason = FinishReason.STOP
        elif num_output >= params.max_tokens or num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        text = ""
        if req.detokenizer is not None:  # the router's ResponseBuilder makes the same step call
            delta = req.detokenizer.step([token], last=reason is not None)
            text = delta.new_text
            if delta.stopped:
                reason = FinishReason.STOP
        if reason is None:
            assert handoff_error is None, "a handed-off request must end at its first token"
            return self._output(req, [token], text, logprobs, None)
        self.scheduler.remove(req)
        out = self._finish(req, reason, [token], text, logprobs)
        out.error = handoff_error
        return out

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        tokens: list[int],
        text: str,
        logprobs: list[TokenLogprobs],
        *,
        deadline_exceeded: bool = False,
    ) -> RequestOutput:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        drop_placeholders(req)  # tokens of steps still in flight are never delivered
        del self.requests[req.request_id]
        self.penalties.release(req.request_id)
        out = self._output(req, tokens, text, logprobs, reason)
        out.deadline_exceeded = deadline_exceeded
        return out

    def _output(
        self,
        req: Request,
        tokens: list[int],
        text: str,
        logprobs: list[TokenLogprobs],
        reason: FinishReason | None,
    ) -> RequestOutput:
        # Once per output token: positional (TokenDelta's field order, as TokenDelta.empty) costs
        # half of the keyword form, and the counts are read without the properties.
        num_prompt = len(req.prompt_token_ids)
        return RequestOutput(
            req.request_id,
            tokens,
            logprobs,
            reason,
            False,  # deadline_exceeded
            num_prompt,  # prompt_tokens
            len(req.all_token_ids) - num_prompt,  # completion_tokens
            max(req.num_cached_prompt_tokens, 0),  # cached_prompt_tokens
            None,  # error
            text,
        )

    # ---- offline use ------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = _DEFAULT_PARAMS,
    ) -> list[CompletionOutput]:
        """Submit every prompt at once (so they batch), step until all finish; outputs in input order."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        ids = [f"gen-{self.num_steps}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, per_prompt, strict=True):
            self.add_request(rid, prompt, p)
        acc: dict[str, CompletionOutput] = {
            rid: CompletionOutput(rid, [], "", FinishReason.ABORT, 0, 0) for rid in ids
        }
        while self.has_unfinished_requests():
            for out in self.step():
                c = acc[out.request_id]
                c.token_ids += out.token_ids
                c.text += out.text
                c.logprobs += out.logprobs
                c.prompt_tokens = out.prompt_tokens
                c.cached_prompt_tokens = out.cached_prompt_tokens
                if out.finish_reason is not None:
                    c.finish_reason = out.finish_reason
        return [acc[rid] for rid in ids]

    # ---- introspection ----------------------------------------------------------------
    def stats(self) -> EngineStats:
        a = self.allocator
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=a.num_blocks,
            num_used_blocks=a.num_used_blocks,
            num_free_blocks=a.num_free_blocks,
            kv_usage=a.usage,
            prefix_cache_queries=a.prefix_cache_queries,
            prefix_cache_hits=a.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_graph_replays=self.runner.graphs.num_replays if self.runner.graphs else 0,
            num_prefill_graph_replays=pg.num_replays if (pg := self.runner.prefill_graphs) else 0,
            num_eager_steps=self.runner.num_eager_steps,
            graph_memory_bytes=self.runner.graph_memory_bytes,
            graph_capture_s=self.runner.graph_capture_seconds,
            step_time_counts=tuple(self.step_timer.counts),
            step_time_sum_s=self.step_timer.sum_s,
            **self.role.stats(),
        )

    def check_integrity(self) -> None:
        """Allocator invariants, plus: every block in use belongs to a live request."""
        self.allocator.check_integrity()
        self.role.check_integrity()
        if not self.has_unfinished_requests() and self.allocator.num_used_blocks:
            raise RuntimeError(f"{self.allocator.num_used_blocks} KV blocks in use with no request live")
