"""``kvrelay litmus``: message passing (MP), store buffering (SB) and load buffering (LB)
litmus tests on the GPU, between two CTAs of one GPU and between two GPUs.

Each test has two roles on locations ``x`` and ``y`` (both 0 at the start); the outcome is
the pair of values read, ``(r0, r1)``. Each test has one *weak* outcome, which sequential
consistency forbids; whether the PTX memory model forbids it depends on the variant:

    test  role 0            role 1            weak   relaxed  relacq     fence_acq_rel  fence_sc
    MP    st x; st y        r0=ld y; r1=ld x  (1,0)  allowed  forbidden  forbidden      forbidden
    SB    st x; r0=ld y     st y; r1=ld x     (0,0)  allowed  allowed    allowed        forbidden
    LB    r0=ld x; st y     r1=ld y; st x     (1,1)  allowed  forbidden  forbidden      forbidden

(stores write 1). Variants: ``relaxed`` (every access ``ld/st.relaxed.<scope>``: strong, unordered),
``relacq`` (MP: ``st.release`` y and ``ld.acquire`` y, x relaxed; SB and LB: every store
``.release``, every load ``.acquire``), ``fence_acq_rel`` and ``fence_sc`` (relaxed accesses with ``fence.acq_rel.<scope>``
or ``fence.sc.<scope>`` between the two of each role). Scopes: ``gpu`` and ``sys`` run the
roles in two CTAs of one GPU with ``.gpu`` or ``.sys`` operations; ``peer`` runs them on two
GPUs (``.sys``), the locations in the first GPU's memory.

Only the variants the model forbids are asserted: a forbidden outcome seen there is a bug
(in the hardware, the compiler, or this tool) and makes the exit status 1; the weak outcomes
of the allowed variants are what the hardware shows, reported as data (docs/LITMUS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

TESTS = ("mp", "sb", "lb")
VARIANTS = ("relaxed", "relacq", "fence_acq_rel", "fence_sc")
SCOPES = ("gpu", "sys", "peer")
OUTCOMES = ((0, 0), (0, 1), (1, 0), (1, 1))  # counts are indexed by 2 * r0 + r1

# One op a string: "st.<sem> <loc>", "ld.<sem> <loc> <reg>" or "fence.<sem>".
Program = tuple[str, ...]
_REL = "st.relaxed"
_LDR = "ld.relaxed"
PROGRAMS: dict[tuple[str, str], tuple[Program, Program]] = {
    ("mp", "relaxed"): ((f"{_REL} x", f"{_REL} y"), (f"{_LDR} y r0", f"{_LDR} x r1")),
    ("mp", "relacq"): ((f"{_REL} x", "st.release y"), ("ld.acquire y r0", f"{_LDR} x r1")),
    ("sb", "relaxed"): ((f"{_REL} x", f"{_LDR} y r0"), (f"{_REL} y", f"{_LDR} x r1")),
    ("sb", "relacq"): (("st.release x", "ld.acquire y r0"), ("st.release y", "ld.acquire x r1")),
    ("lb", "relaxed"): ((f"{_LDR} x r0", f"{_REL} y"), (f"{_LDR} y r1", f"{_REL} x")),
    ("lb", "relacq"): (("ld.acquire x r0", "st.release y"), ("ld.acquire y r1", "st.release x")),
}
for _test in TESTS:
    for _fence in ("acq_rel", "sc"):
        _r0, _r1 = PROGRAMS[(_test, "relaxed")]
        PROGRAMS[(_test, f"fence_{_fence}")] = (
            (_r0[0], f"fence.{_fence}", _r0[1]),
            (_r1[0], f"fence.{_fence}", _r1[1]),
        )

WEAK_OUTCOME = {"mp": (1, 0), "sb": (0, 0), "lb": (1, 1)}

# Whether the PTX memory model (PTX ISA, "Memory Consistency Model"; formalised in Lustig et
# al., ASPLOS 2019) forbids the weak outcome. All accesses are strong and of one scope that
# holds both threads, so every pair of them is morally strong. The reasoning:
# * relaxed, all tests: no release or acquire pattern, so nothing synchronizes and causality
#   order has no edge between the threads: every outcome is allowed. LB (1,1) is allowed too:
#   the No-Thin-Air axiom only forbids cycles through dependencies, and LB has none.
# * MP relacq / fence_*: if r0 == 1, role 1's acquire pattern (ld.acquire y, or ld y + fence)
#   read role 0's release pattern (st.release y, or fence + st y), so they synchronize, and
#   st x -> (program order) release -> (sync) acquire -> ld x is base causality order. By the
#   Causality axiom ld x cannot then read a write coherence-before st x (the initial 0).
# * LB relacq / fence_*: if r1 == 1 role 0's release synchronizes with role 1's acquire, so
#   role 0's ld x precedes role 1's st x in causality order, and a read cannot read from a
#   write it precedes in causality order: r0 == 0.
# * SB relacq / fence_acq_rel: in (0, 0) neither read reads the other role's write, so no
#   release pattern synchronizes with anything: allowed (as for C++ release/acquire).
# * SB fence_sc: fence.sc operations are totally ordered (Fence-SC order), and the earlier of
#   two morally strong fence.sc synchronizes with the later. If role 0's fence is first,
#   st x -> fence -> (sync) fence -> ld x orders role 1's read after st x: r1 == 1; the other
#   order gives r0 == 1. So (0, 0) is forbidden.
# fence.sc is also an acq_rel fence, so what fence_acq_rel forbids, fence_sc forbids too.
FORBIDDEN: dict[tuple[str, str], bool] = {
    ("mp", "relaxed"): False,
    ("mp", "relacq"): True,
    ("mp", "fence_acq_rel"): True,
    ("mp", "fence_sc"): True,
    ("sb", "relaxed"): False,
    ("sb", "relacq"): False,
    ("sb", "fence_acq_rel"): False,
    ("sb", "fence_sc"): True,
    ("lb", "relaxed"): False,
    ("lb", "relacq"): True,
    ("lb", "fence_acq_rel"): True,
    ("lb", "fence_sc"): True,
}

VERDICT_OK = "OK"
VERDICT_FORBIDDEN = "FORBIDDEN OUTCOME SEEN"
VERDICT_WEAK = "weak behaviour observed (allowed)"
VERDICT_NOT_SEEN = "weak behaviour not seen (allowed)"


def ptx_instructions(test: str, variant: str, scope: str, role: int) -> tuple[str, ...]:
    """The role's PTX, with the placeholders of ``litmus_kernels.body_asm``: ``{x}``, ``{y}``
    (addresses), ``{r0}``, ``{r1}`` (destinations), ``{one}`` (a register holding 1)."""
    if scope not in ("gpu", "sys"):
        raise ValueError(f"PTX scope must be 'gpu' or 'sys', got {scope!r}")
    lines = []
    for op in PROGRAMS[(test, variant)][role]:
        kind, _, rest = op.partition(" ")
        args = rest.split()
        if kind.startswith("fence."):
            lines.append(f"{kind}.{scope};")
        elif kind.startswith("st."):
            lines.append(f"{kind}.{scope}.global.u32 [{{{args[0]}}}], {{one}};")
        else:
            assert kind.startswith("ld."), op
            lines.append(f"{kind}.{scope}.global.u32 {{{args[1]}}}, [{{{args[0]}}}];")
    return tuple(lines)


def reader_roles(test: str) -> tuple[int, int]:
    """The roles whose programs read r0 and r1."""
    programs = PROGRAMS[(test, "relaxed")]
    found = [
        next(role for role in (0, 1) if any(op.endswith(f" {reg}") for op in programs[role]))
        for reg in ("r0", "r1")
    ]
    return found[0], found[1]


def tally(out: torch.Tensor, test: str) -> tuple[int, int, int, int]:
    """Counts of (r0, r1) = 00, 01, 10, 11 in one launch's results ``out``
    [2 (role), pairs, iterations, 2 (r0, r1)] (int32)."""
    role0, role1 = reader_roles(test)
    r0 = out[role0, ..., 0].flatten().long()
    r1 = out[role1, ..., 1].flatten().long()
    for name, r in (("r0", r0), ("r1", r1)):
        if r.numel() and not bool(((r == 0) | (r == 1)).all()):
            raise RuntimeError(
                f"{test}: a read returned {sorted(set(r.tolist()) - {0, 1})[:4]} as {name}, not 0 or 1"
            )
    counts = torch.bincount(2 * r0 + r1, minlength=4)
    return (int(counts[0]), int(counts[1]), int(counts[2]), int(counts[3]))


@dataclass(frozen=True)
class LitmusResult:
    test: str
    scope: str
    variant: str
    counts: tuple[int, int, int, int]  # iterations that ended in (r0, r1) = 00, 01, 10, 11
    seconds: float

    @property
    def iterations(self) -> int:
        return sum(self.counts)

    @property
    def weak_count(self) -> int:
        r0, r1 = WEAK_OUTCOME[self.test]
        return self.counts[2 * r0 + r1]

    @property
    def forbidden(self) -> bool:
        return FORBIDDEN[(self.test, self.variant)]

    @property
    def forbidden_count(self) -> int:
        return self.weak_count if self.forbidden else 0

    @property
    def verdict(self) -> str:
        if self.forbidden:
            return VERDICT_FORBIDDEN if self.weak_count else VERDICT_OK
        return VERDICT_WEAK if self.weak_count else VERDICT_NOT_SEEN

    def to_json(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "scope": self.scope,
            "variant": self.variant,
            "iterations": self.iterations,
            "outcomes": {f"{r0}{r1}": c for (r0, r1), c in zip(OUTCOMES, self.counts, strict=True)},
            "weak_outcome": "".join(map(str, WEAK_OUTCOME[self.test])),
            "weak_count": self.weak_count,
            "forbidden_by_model": self.forbidden,
            "forbidden_count": self.forbidden_count,
            "verdict": self.verdict,
            "seconds": round(self.seconds, 3),
        }


_COLUMNS = f"{'test':4} {'scope':5} {'variant':13} {'iterations':>10} {'00':>10} {'01':>10} {'10':>10} {'11':>10} {'weak':>4} {'model':9}  verdict"


def format_row(r: LitmusResult) -> str:
    weak = "".join(map(str, WEAK_OUTCOME[r.test]))
    model = "forbidden" if r.forbidden else "allowed"
    counts = " ".join(f"{c:>10}" for c in r.counts)
    return (
        f"{r.test:4} {r.scope:5} {r.variant:13} {r.iterations:>10} {counts} {weak:>4} {model:9}  {r.verdict}"
    )


def format_table(results: Sequence[LitmusResult]) -> str:
    return "\n".join([_COLUMNS, *(format_row(r) for r in results)])


# --------------------------------------------------------------------------- configuration


def _names(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of {', '.join(allowed)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class LitmusConfig:
    tests: tuple[str, ...] = TESTS
    variants: tuple[str, ...] = VARIANTS
    scopes: tuple[str, ...] = ("gpu", "sys")
    iterations: int = 1 << 20  # per (test, scope, variant), rounded up to whole launches
    pairs: int = 8  # test-CTA pairs that run the test at once, each on its own locations
    launch_iterations: int = 4096  # per pair per launch: keeps each launch well under a second
    stress_ctas: int | None = None  # per kernel; None: one CTA on each SM left by the test CTAs
    jitter: int = 256  # clock cycles: each role waits uniform [0, jitter] after the barrier
    timeout_s: float = 5.0  # the longest a barrier waits for the partner CTA
    seed: int = 0
    devices: tuple[int, int] = (0, 1)  # gpu and sys scopes run on the first; peer on both

    def __post_init__(self) -> None:
        for field, names, allowed in (
            ("tests", self.tests, TESTS),
            ("variants", self.variants, VARIANTS),
            ("scopes", self.scopes, SCOPES),
        ):
            if not names or any(n not in allowed for n in names):
                raise ValueError(f"{field} must be a non-empty subset of {allowed}, got {names}")
        for field, value, low, high in (
            ("iterations", self.iterations, 1, 1 << 32),
            ("pairs", self.pairs, 1, 64),
            ("launch_iterations", self.launch_iterations, 1, 1 << 16),
            ("jitter", self.jitter, 0, 1 << 20),
        ):
            if not low <= value <= high:
                raise ValueError(f"{field} must be in [{low}, {high}], got {value}")
        if self.pairs * self.launch_iterations > 1 << 18:  # 2 lines of 128 B each: 64 MiB
            raise ValueError(
                f"pairs * launch_iterations must be at most {1 << 18}, got {self.pairs} * {self.launch_iterations}"
            )
        if self.stress_ctas is not None and not 0 <= self.stress_ctas <= 1024:
            raise ValueError(f"stress_ctas must be in [0, 1024] or None, got {self.stress_ctas}")
        if not 0.001 <= self.timeout_s <= 600:
            raise ValueError(f"timeout_s must be in [0.001, 600], got {self.timeout_s}")
        if len(self.devices) != 2 or self.devices[0] == self.devices[1] or min(self.devices) < 0:
            raise ValueError(f"devices must be two different GPU indices, got {self.devices}")

    @property
    def plan(self) -> tuple[int, int]:
        """(launches, iterations per pair per launch) that cover ``iterations``."""
        launches = -(-self.iterations // (self.pairs * self.launch_iterations))
        return launches, -(-self.iterations // (self.pairs * launches))

    @property
    def iterations_run(self) -> int:
        launches, per_pair = self.plan
        return launches * self.pairs * per_pair


def add_litmus_args(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of `kvrelay litmus` to its (sub)parser."""
    d = LitmusConfig()
    parser.add_argument("--tests", default=",".join(TESTS), help="comma-separated: mp,sb,lb")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)}"
    )
    parser.add_argument(
        "--scopes",
        default=None,
        help="comma-separated: gpu, sys (two CTAs of one GPU, .gpu or .sys operations), peer (two GPUs, "
        ".sys); default gpu,sys and peer where two GPUs can access each other",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help=f"per test, scope and variant (default {d.iterations})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="16384 iterations each unless --iterations is given"
    )
    parser.add_argument("--pairs", type=int, default=d.pairs, help="test-CTA pairs running at once")
    parser.add_argument(
        "--launch-iterations", type=int, default=d.launch_iterations, help="per pair per launch"
    )
    parser.add_argument(
        "--stress-ctas", type=int, default=None, help="memory-stress CTAs (default: the idle SMs)"
    )
    parser.add_argument("--jitter", type=int, default=d.jitter, help="most clock cycles of random delay")
    parser.add_argument(
        "--timeout", type=float, default=d.timeout_s, help="seconds a barrier waits for its partner"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--devices", default="0,1", help="GPUs of the peer scope; gpu and sys run on the first"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results, device and date here")


QUICK_ITERATIONS = 16384


def config_from_args(args: argparse.Namespace, gpu_count: int, peer_ok: bool) -> LitmusConfig:
    """The config the flags ask for, on a machine with ``gpu_count`` GPUs where ``peer_ok``
    says whether the two ``--devices`` can access each other's memory."""
    try:
        devices = tuple(int(t) for t in args.devices.split(","))
    except ValueError:
        raise ValueError(f"--devices: {args.devices!r} is not two comma-separated GPU indices") from None
    if len(devices) != 2:
        raise ValueError(f"--devices: {args.devices!r} is not two comma-separated GPU indices")
    if args.scopes is None:
        scopes: tuple[str, ...] = ("gpu", "sys", "peer") if gpu_count >= 2 and peer_ok else ("gpu", "sys")
    else:
        scopes = _names(args.scopes, SCOPES, "--scopes")
    needed = devices if "peer" in scopes else devices[:1]
    if max(needed) >= gpu_count:
        raise ValueError(f"--devices: GPU {max(needed)} does not exist ({gpu_count} GPU(s) visible)")
    if "peer" in scopes and not peer_ok:
        raise ValueError(
            f"--scopes peer: GPUs {devices[0]} and {devices[1]} cannot access each other's memory"
        )
    if args.iterations is not None:
        iterations = args.iterations
    else:
        iterations = QUICK_ITERATIONS if args.quick else LitmusConfig.iterations
    return LitmusConfig(
        tests=_names(args.tests, TESTS, "--tests"),
        variants=_names(args.variants, VARIANTS, "--variants"),
        scopes=scopes,
        iterations=iterations,
        pairs=args.pairs,
        launch_iterations=args.launch_iterations,
        stress_ctas=args.stress_ctas,
        jitter=args.jitter,
        timeout_s=args.timeout,
        seed=args.seed,
        devices=(devices[0], devices[1]),
    )


# --------------------------------------------------------------------------- running


def run_cases(
    config: LitmusConfig, on_result: Callable[[LitmusResult], None] | None = None
) -> list[LitmusResult]:
    """Runs every (scope, test, variant) of ``config`` on the GPU(s). Raises
    ``LitmusTimeoutError`` (a RuntimeError) when a test CTA loses its partner."""
    from .litmus_kernels import (
        LaunchShape,
        LitmusLauncher,
        body_asm,
        enable_peer_access,
    )

    launches, per_pair = config.plan
    shape = LaunchShape(
        pairs=config.pairs,
        max_iters=per_pair,
        stress_ctas=config.stress_ctas,
        jitter=config.jitter,
        timeout_ns=int(config.timeout_s * 1e9),
    )
    generator = torch.Generator().manual_seed(config.seed)
    results = []
    for scope in config.scopes:
        devices: tuple[int, ...] = config.devices if scope == "peer" else config.devices[:1]
        if scope == "peer":
            enable_peer_access(config.devices[1], config.devices[0])  # role 1 reaches devices[0]
        launcher = LitmusLauncher(devices, shape, generator)
        ptx_scope = "sys" if scope == "peer" else scope
        for test in config.tests:
            for variant in config.variants:
                body0, body1 = (body_asm(ptx_instructions(test, variant, ptx_scope, role)) for role in (0, 1))
                counts = [0, 0, 0, 0]
                start = time.perf_counter()
                for _ in range(launches):
                    launch_counts = tally(launcher.launch(body0, body1, ptx_scope, per_pair), test)
                    counts = [a + b for a, b in zip(counts, launch_counts, strict=True)]
                result = LitmusResult(
                    test,
                    scope,
                    variant,
                    (counts[0], counts[1], counts[2], counts[3]),
                    time.perf_counter() - start,
                )
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


def report_json(config: LitmusConfig, results: Sequence[LitmusResult]) -> dict[str, Any]:
    used = sorted({d for r in results for d in (config.devices if r.scope == "peer" else config.devices[:1])})
    import triton

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "devices": {str(d): torch.cuda.get_device_name(d) for d in used},
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "config": asdict(config),
        "forbidden_outcomes_seen": any(r.verdict == VERDICT_FORBIDDEN for r in results),
        "results": [r.to_json() for r in results],
    }


def run_litmus(args: argparse.Namespace) -> int:
    """`kvrelay litmus`: prints a row per (test, scope, variant) as it finishes. Exit status
    0; 1 when the model forbids an outcome that was seen or a test CTA lost its partner; 2
    without a GPU. Bad flags raise ValueError (the CLI prints it as one line)."""
    if not torch.cuda.is_available():
        print("kvrelay: error: kvrelay litmus needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu_count = torch.cuda.device_count()
    peer_ok = False
    try:
        a, b = (int(t) for t in args.devices.split(","))
        peer_ok = max(a, b) < gpu_count and a != b and torch.cuda.can_device_access_peer(b, a)
    except ValueError:
        pass  # config_from_args names the bad --devices
    config = config_from_args(args, gpu_count, peer_ok)
    print(
        f"# {config.iterations_run} iterations per row on {torch.cuda.get_device_name(config.devices[0])}",
        flush=True,
    )
    print(_COLUMNS, flush=True)
    results: list[LitmusResult] = []

    def on_result(result: LitmusResult) -> None:
        results.append(result)
        print(format_row(result), flush=True)

    status = 0
    try:
        run_cases(config, on_result)
    except RuntimeError as e:  # a lost partner or a corrupted read: report what finished
        print(f"kvrelay litmus: {e}", file=sys.stderr)
        status = 1
    if any(r.verdict == VERDICT_FORBIDDEN for r in results):
        print("kvrelay litmus: an outcome the PTX memory model forbids was observed", file=sys.stderr)
        status = 1
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report_json(config, results), indent=2) + "\n")
    return status
