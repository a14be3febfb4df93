"""The KV handoff protocol as steps of the model in `checker_model.py`.

Protocol model: one mailbox slot (SIGNAL, ABORT, payload) reused by `rounds` rounds;
each round has its own producer P_r (a host thread plus `ctas` CTAs, CTA i writes
blocks [i*m, (i+1)*m) with m = blocks/ctas) and reserves all `blocks` destination
blocks (the same ones every round of an epoch: reuse happens only when they are free).
The consumer may time out/cancel at any step before it accepts, any live producer may
die at any step while it has work left, the consumer may restart once (epoch bump; the
mailbox memory is kept, the worst case; the block pool is new memory), and another
request may take a free block and write it. State is a tuple of immutable tuples so
that the search can hash it.
"""

from __future__ import annotations

from collections.abc import Iterator

from .checker_model import (
    ABANDONED,
    ABORTED,
    ABT,
    ADMITTED,
    FREE,
    HOST_ACKED,
    HOST_IDLE,
    HOST_LAUNCHED,
    IDLE,
    IN_USE,
    OK,
    OTHER_DONE,
    OTHER_IDLE,
    OTHER_VALUE,
    PAY,
    QUARANTINED,
    RESERVED,
    SIG,
    TAKEN,
    WAITING,
    Consumer,
    Invariant,
    ModelParams,
    Producer,
    State,
    Step,
    Value,
    Variant,
    Violation,
    block_loc,
    drain_steps,
    drained,
    fmt_signal,
    loc_name,
    may_write,
    pack,
    set_at,
    store_at,
    with_producer,
    work_left,
)


def _free_round_blocks(s: State, params: ModelParams, why: str) -> State | Violation:
    """Free the current round's blocks (not those already freed and maybe taken by another request)."""
    alloc = list(s.alloc)
    for b, st in enumerate(alloc):
        if st in (RESERVED, QUARANTINED, IN_USE):
            if params.check_free and may_write(s, params, block_loc(params, s.cons.epoch, b)):
                return Violation(Invariant.I3, f"{why}: freed block {b} while a producer may still write it")
            alloc[b] = FREE
    return s._replace(alloc=tuple(alloc))


def _accept(s: State, params: ModelParams, sig: Value) -> State | Violation:
    c = s.cons
    if sig != c.expected:
        return Violation(
            Invariant.I2, f"accepted SIGNAL={fmt_signal(sig)}, expected {fmt_signal(c.expected)}"
        )
    early = dict(c.prefetched)
    pay = early.get(PAY, s.mem[PAY])
    if pay != (c.expected, OK):
        if isinstance(pay, tuple) and pay[0] == c.expected:
            return Violation(Invariant.I4, f"applied payload {fmt_signal(pay)} of an aborted round")
        return Violation(Invariant.I1, f"read payload {fmt_signal(pay)}, want {fmt_signal((c.expected, OK))}")
    if s.mem[ABT] == c.expected:
        return Violation(Invariant.I4, "admitted a round whose ABORT was already written")
    for b in range(params.blocks):
        loc = block_loc(params, c.epoch, b)
        got = early.get(loc, s.mem[loc])
        if got != c.expected:
            return Violation(
                Invariant.I1, f"read block {b} = {fmt_signal(got)}, want {fmt_signal(c.expected)}"
            )
    return s._replace(cons=c._replace(phase=ADMITTED, prefetched=()), alloc=(IN_USE,) * params.blocks)


def _start_round(s: State, v: Variant, params: ModelParams) -> Iterator[Step]:
    c = s.cons
    if len(s.prods) >= params.rounds or any(a != FREE for a in s.alloc):
        return
    old = [p for p in s.prods if p.epoch < c.epoch]
    fenced = all((p.stopped or not work_left(p, params)) and drained(p) for p in old)
    if not fenced and v is not Variant.RESTART_NO_FENCE:
        return
    expected = pack(c.epoch, c.seq + 1)
    prod = Producer(expected, c.epoch, HOST_IDLE, (0,) * params.ctas, ((),) * params.ctas, (), 0, False)
    cons = c._replace(seq=c.seq + 1, phase=WAITING, expected=expected, prefetched=())
    label = f"C: reserve blocks, slot seq={c.seq + 1}, expect {fmt_signal(expected)}; pool sends to P{len(s.prods)}"
    yield label, s._replace(cons=cons, prods=(*s.prods, prod), alloc=(RESERVED,) * params.blocks)


def _waiting_steps(s: State, v: Variant, params: ModelParams, seen: bool) -> Iterator[Step]:
    c = s.cons
    sig = s.mem[SIG]
    if seen:
        how = "no acquire" if v is Variant.NO_ACQUIRE else "acquire"
        yield f"C: poll SIGNAL={fmt_signal(sig)}, {how}, read payload and blocks", _accept(s, params, sig)
    if v is Variant.NO_ACQUIRE:
        done = {loc for loc, _ in c.prefetched}
        for loc in (PAY, *(block_loc(params, c.epoch, b) for b in range(params.blocks))):
            if loc not in done:
                pre = tuple(sorted((*c.prefetched, (loc, s.mem[loc])), key=lambda e: e[0]))
                yield (
                    f"C: load of {loc_name(params, loc)} performed early",
                    s._replace(cons=c._replace(prefetched=pre)),
                )
    if params.timeout:
        aborted = s._replace(mem=store_at(s.mem, ABT, c.expected), cons=c._replace(phase=ABANDONED))
        if v is Variant.FREE_ON_TIMEOUT:
            yield "C: timeout, st.release ABORT, free blocks", _free_round_blocks(aborted, params, "timeout")
        else:
            quarantined = aborted._replace(alloc=(QUARANTINED,) * params.blocks)
            yield f"C: timeout, st.release ABORT={fmt_signal(c.expected)}, quarantine blocks", quarantined


def _resolve_steps(s: State, v: Variant, params: ModelParams, seen: bool) -> Iterator[Step]:
    """An abandoned round ends on its late completion / abort ack, or on the producer's death."""
    c = s.cons
    sig = s.mem[SIG]
    idle = s._replace(cons=c._replace(phase=IDLE))
    if seen and v is Variant.APPLY_LATE:
        yield f"C: late SIGNAL={fmt_signal(sig)} seen, applied to the request", _accept(s, params, sig)
    elif seen and sig != c.expected:
        yield (
            "C: abandoned round sees SIGNAL",
            Violation(Invariant.I2, f"resolved on stale {fmt_signal(sig)}"),
        )
    elif seen:
        resolved = _free_round_blocks(idle, params, "late completion")
        yield f"C: late SIGNAL={fmt_signal(sig)} seen, not applied; free blocks, slot resolved", resolved


def _consumer_steps(s: State, v: Variant, params: ModelParams) -> Iterator[Step]:
    c = s.cons
    r = len(s.prods) - 1
    sig = s.mem[SIG]
    seen = sig == c.expected or (v is Variant.NONZERO_WAIT and sig != 0)
    idle = s._replace(cons=c._replace(phase=IDLE))
    if c.phase == IDLE:
        yield from _start_round(s, v, params)
    elif c.phase == WAITING:
        yield from _waiting_steps(s, v, params, seen)
    elif c.phase == ABANDONED:
        yield from _resolve_steps(s, v, params, seen)
    elif c.phase == ADMITTED:
        # Decode kernels read the blocks until the request finishes: nobody may have written them since.
        bad = [b for b in range(params.blocks) if s.mem[block_loc(params, c.epoch, b)] != c.expected]
        if bad:
            yield (
                "C: decode reads blocks",
                Violation(Invariant.I3, f"block {bad[0]} overwritten while in use"),
            )
        else:
            yield "C: request finishes, free blocks", _free_round_blocks(idle, params, "finish")
    if c.phase in (WAITING, ABANDONED) and s.prods[r].stopped and drained(s.prods[r]):
        freed = _free_round_blocks(idle, params, "death notice")
        yield f"pool: P{r} is dead; C fails/recomputes the request, frees blocks, slot resolved", freed
    if params.restart and not c.restarted and s.prods:
        cons = Consumer(c.epoch + 1, 0, IDLE, 0, (), True)
        other = OTHER_DONE if s.other >= 0 else s.other
        yield (
            "C: worker restarts (epoch bump, new block pool, same mailbox memory)",
            State(s.mem, cons, s.prods, (FREE,) * params.blocks, other),
        )


def _cta_step(s: State, v: Variant, params: ModelParams, r: int, i: int) -> Iterator[Step]:
    p = s.prods[r]
    m = params.blocks_per_cta
    pc = p.ctas[i]
    who = f"P{r} CTA{i}"
    if 1 <= pc <= m:
        b = i * m + pc - 1
        buf = (*p.bufs[i], (block_loc(params, p.epoch, b), p.expected))
        yield (
            f"{who}: plain store block {b}",
            with_producer(s, r, p._replace(ctas=set_at(p.ctas, i, pc + 1), bufs=set_at(p.bufs, i, buf))),
        )
    elif pc == m + 1:
        if v is Variant.RELAXED_COUNTER:
            q = p
        else:
            q = p._replace(gpu_buf=p.gpu_buf + p.bufs[i], bufs=set_at(p.bufs, i, ()))
        last = p.counter + 1 == params.ctas
        q = q._replace(counter=p.counter + 1, ctas=set_at(p.ctas, i, m + 2 if last else m + 3))
        sem = "relaxed" if v is Variant.RELAXED_COUNTER else "acq_rel.gpu"
        yield f"{who}: atom.add.{sem} counter -> {p.counter + 1}", with_producer(s, r, q)
    elif pc == m + 2:
        done = set_at(p.ctas, i, m + 3)
        if v is Variant.RELAXED_RELEASE:
            q = p._replace(ctas=done, bufs=set_at(p.bufs, i, (*p.bufs[i], (SIG, p.expected))))
            yield f"{who}: st.relaxed.sys SIGNAL={fmt_signal(p.expected)}", with_producer(s, r, q)
        elif not p.bufs[i] and not p.gpu_buf:
            q = p._replace(ctas=done)
            yield (
                f"{who}: st.release.sys SIGNAL={fmt_signal(p.expected)}",
                with_producer(s, r, q, SIG, p.expected),
            )


def _producer_steps(s: State, v: Variant, params: ModelParams, r: int) -> Iterator[Step]:
    p = s.prods[r]
    if not p.stopped:
        if p.host == HOST_IDLE:
            abt = s.mem[ABT]
            if abt == p.expected:
                q = p._replace(host=HOST_ACKED)
                st = with_producer(s, r, q, PAY, (p.expected, ABORTED))
                yield (
                    f"P{r} host: ld.acquire ABORT={fmt_signal(abt)}: skip copy, ack SIGNAL",
                    with_producer(st, r, q, SIG, p.expected),
                )
            else:
                q = p._replace(host=HOST_LAUNCHED, ctas=(1,) * params.ctas)
                yield (
                    f"P{r} host: ld.acquire ABORT={fmt_signal(abt)}: write payload, launch copy",
                    with_producer(s, r, q, PAY, (p.expected, OK)),
                )
        for i in range(params.ctas):
            yield from _cta_step(s, v, params, r, i)
        if work_left(p, params):
            if params.producer_death:
                yield f"P{r} dies", with_producer(s, r, p._replace(stopped=True))
            if p.epoch < s.cons.epoch:
                yield (
                    f"pool tells P{r} that C restarted: P{r} drops its mappings",
                    with_producer(s, r, p._replace(stopped=True)),
                )
    yield from drain_steps(s, params, r)


def _other_steps(s: State, params: ModelParams) -> Iterator[Step]:
    if s.other == OTHER_IDLE:
        for b, st in enumerate(s.alloc):
            if st == FREE:
                loc = block_loc(params, s.cons.epoch, b)
                yield (
                    f"other request takes free block {b} and writes it",
                    s._replace(
                        mem=store_at(s.mem, loc, OTHER_VALUE), alloc=set_at(s.alloc, b, TAKEN), other=b
                    ),
                )
    elif s.other >= 0:
        b = s.other
        got = s.mem[block_loc(params, s.cons.epoch, b)]
        if got != OTHER_VALUE:
            yield (
                "other request reads its block",
                Violation(Invariant.I3, f"block {b} overwritten by a late producer store: {fmt_signal(got)}"),
            )
        else:
            yield (
                f"other request finishes, frees block {b}",
                s._replace(alloc=set_at(s.alloc, b, FREE), other=OTHER_DONE),
            )


def successors(s: State, v: Variant, params: ModelParams) -> Iterator[Step]:
    """Every step enabled in `s`, labeled for a counterexample trace; a step may be a violation."""
    yield from _consumer_steps(s, v, params)
    for r in range(len(s.prods)):
        yield from _producer_steps(s, v, params, r)
    yield from _other_steps(s, params)


def terminal_violation(s: State, params: ModelParams) -> Violation | None:
    """I5: a state with no enabled step must have every round run and nothing left pending or held."""
    c = s.cons
    if c.phase != IDLE:
        return Violation(
            Invariant.I5, f"stuck with the slot pending (phase {c.phase}, expect {fmt_signal(c.expected)})"
        )
    if len(s.prods) < params.rounds:
        return Violation(Invariant.I5, f"deadlock: only {len(s.prods)} of {params.rounds} rounds could start")
    if any(a != FREE for a in s.alloc) or s.other >= 0:
        return Violation(Invariant.I5, f"blocks left held: {s.alloc}")
    return None
