"""Cross-worker signaling for KV handoff: the only code of kvrelay that touches flag memory.

THE ORDERING CONTRACT

Parties. P, the producer: a prefill worker's host thread and the CTAs of its copy kernel.
C, the consumer: a decode worker's engine thread (and, after it, the kernels it launches).
The pool (router side) carries control messages over Ray and reports deaths; it never
touches flag memory.

Memory. C owns (a) its KV pool, the destination blocks, in its GPU memory (exported to P by
CUDA IPC handles) or, for CPU workers, in shared host memory; (b) its mailbox
(`mailbox.py`): slots in shared host memory, each a SIGNAL word, an ABORT word (another cache
line) and payload words (status, first token, its logprobs). On a GPU producer the mailbox
is registered with CUDA (mapped pinned memory) so the copy kernel can store into it.

Values. A signal value is 64 bits, (epoch << 32) | seq: epoch is C's incarnation (random,
non-zero, new at every worker start), seq the slot's use count (starts at 1, bumped at every
reuse). A waiter waits for EQUALITY with the value it expects, never for "non-zero", so a
stale value (an earlier use of the slot, an earlier incarnation of C) can never release it.

One handoff, in order:
  1. C reserves destination blocks D (held by its allocator, not free) and a slot s with
     value v. The pool sends (D, s, v) to P: control path, Ray.
  2. P computes the prompt's KV and first token. P loads ABORT[s] with ACQUIRE; if it equals v,
     C gave up: P copies nothing, writes status ABORTED and publishes SIGNAL[s] = v (RELEASE).
  3. Else P writes the payload with plain stores, then copies: CPU, torch index copies (plain
     stores) into C's shared pool, then SIGNAL[s] = v by a libatomic store with RELEASE
     (`atomics.py`: stlr on AArch64, a plain mov behind a compiler barrier on x86-64);
     GPU, ONE kernel launch (`gpu_copy.py`) whose CTAs store D's blocks (weak stores, over
     NVLink into C's HBM), then each CTA increments a done counter with atom.add.acq_rel.gpu;
     the CTA that takes the counter to the total resets it and stores SIGNAL[s] = v with
     st.release.sys into C's mapped mailbox. Its acquire half (gpu scope) observed every other
     CTA's release half, so by cumulativity the system-scope release publishes every block
     write of the launch, not only its own.
  4. C polls SIGNAL[s] with RELAXED loads between engine steps (no CUDA synchronization);
     when the value equals v it issues an ACQUIRE fence, and only then reads the payload and
     admits the request, whose kernels read D. Host acquire -> kernel launch is ordered by the
     launch itself.
  5. Give-ups: past its handoff timeout (or on cancel / deadline) C stores ABORT[s] = v with
     RELEASE and stops waiting. D is QUARANTINED, not freed: it is freed, and s reused, only
     when SIGNAL[s] == v is observed later (a late completion, or P's abort acknowledgement:
     never applied to any request) or when the pool reports P's incarnation dead (a dead
     process, and its CUDA context, write nothing more).

  6. Restarts: a consumer that restarts gets a NEW mailbox region and a new pool (and a new
     random epoch); the pool tells producers to drop the old mappings. Equality waits alone
     would not be enough if the memory were kept: an old-epoch producer's late payload or
     SIGNAL store could overwrite a fresh use of the slot (the checker's `restart-no-fence`
     variant shows it), so old and new incarnations never share flag memory.
  7. Relay (across nodes, `transport.py`): the producer gathers the blocks to host memory and
     sends them through Ray; the consumer writes them and publishes in its own mailbox, only
     while that use is still pending with the same value. A lost call (a producer that may or
     may not have started) is treated like a timeout: quarantine until completion or death.

Scopes. Everything crossing processes or GPUs is system scope (.sys / C11 atomics on shared
memory); the done counter is GPU scope because only CTAs of P's launch touch it.

Verification (`verify/`): `verify/checker.py` enumerates the interleavings of this protocol under a
release/acquire model where plain writes may be seen late and shows each weakened variant
fails; `verify/litmus.py` measures what the hardware does; tests/test_handoff*.py run the protocol
for real (CPU processes in CI; GPUs on the lent machines).
"""

# One file, one module: imported as `memory_model` (the checkout's top-level folder on sys.path) this
# package would load a second copy of every module beside `kvrelay.memory_model`, with its own classes and
# globals (isinstance fails, Ray unpickles the other copy). Only the `kvrelay/` link is allowed.
if __name__ != "kvrelay.memory_model":
    raise ImportError(
        f"import {__name__} as kvrelay.{__name__}: kvrelay's top-level folders load only through the kvrelay package"
    )
