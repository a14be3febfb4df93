"""`kvrelay litmus`: the model table, PTX rendering, tally, verdicts, flags (CPU); the kernel
compiled for sm_90 through ptxas (CPU, where Triton ships ptxas); the runs (GPU)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvrelay.memory_model.verify import litmus
from kvrelay.memory_model.verify.litmus import (
    FORBIDDEN,
    OUTCOMES,
    PROGRAMS,
    TESTS,
    VARIANTS,
    WEAK_OUTCOME,
    LitmusConfig,
    LitmusResult,
    add_litmus_args,
    config_from_args,
    format_table,
    ptx_instructions,
    reader_roles,
    tally,
)

# --------------------------------------------------------------------------- helpers


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_litmus_args(parser)
    return parser.parse_args(list(argv))


def _sc_outcomes(test: str, variant: str) -> set[tuple[int, int]]:
    """Outcomes of every sequentially consistent interleaving of the two role programs
    (fences are no-ops under SC): an independent reference for the weak outcome."""
    role0, role1 = PROGRAMS[(test, variant)]
    seen = set()
    for picks in set(itertools.permutations([0] * len(role0) + [1] * len(role1))):
        memory, regs, pcs = {"x": 0, "y": 0}, {"r0": -1, "r1": -1}, [0, 0]
        for role in picks:
            op = (role0, role1)[role][pcs[role]]
            pcs[role] += 1
            kind, *args = op.split()
            if kind.startswith("st."):
                memory[args[0]] = 1
            elif kind.startswith("ld."):
                regs[args[1]] = memory[args[0]]
        seen.add((regs["r0"], regs["r1"]))
    return seen


def _out(rows: list[tuple[int, int, int, int]], pairs: int = 2) -> torch.Tensor:
    """Results of one launch as the launcher returns them, [2, pairs, iterations, 2], from
    rows (role 0's r0, r1, role 1's r0, r1) in (pair, iteration) order."""
    t = torch.tensor(rows, dtype=torch.int32).view(pairs, -1, 2, 2)  # [P, N, role, reg]
    return t.permute(2, 0, 1, 3).contiguous()


def _result(test: str, variant: str, counts: tuple[int, int, int, int]) -> LitmusResult:
    return LitmusResult(test=test, scope="gpu", variant=variant, counts=counts, seconds=0.5)


# --------------------------------------------------------------------------- the model


def test_forbidden_table_is_the_ptx_model() -> None:
    forbidden = {key for key, value in FORBIDDEN.items() if value}
    assert set(FORBIDDEN) == set(itertools.product(TESTS, VARIANTS)) == set(PROGRAMS)
    assert forbidden == {
        ("mp", "relacq"),
        ("mp", "fence_acq_rel"),
        ("mp", "fence_sc"),
        ("sb", "fence_sc"),  # release/acquire and acq_rel fences allow SB's (0, 0)
        ("lb", "relacq"),
        ("lb", "fence_acq_rel"),
        ("lb", "fence_sc"),
    }
    assert not any(FORBIDDEN[(test, "relaxed")] for test in TESTS)


@pytest.mark.parametrize(("test", "variant"), sorted(PROGRAMS))
def test_weak_outcome_is_the_only_one_sc_forbids(test: str, variant: str) -> None:
    assert _sc_outcomes(test, variant) == set(OUTCOMES) - {WEAK_OUTCOME[test]}


def test_programs_differ_only_in_ordering() -> None:
    # Every variant of a test does the same accesses in the same order; only semantics and
    # fences change.
    for test in TESTS:
        base = [[op.split(" ", 1)[1] for op in role] for role in PROGRAMS[(test, "relaxed")]]
        for variant in VARIANTS:
            roles = PROGRAMS[(test, variant)]
            accesses = [[op.split(" ", 1)[1] for op in role if not op.startswith("fence")] for role in roles]
            assert accesses == base, (test, variant)
            fences = {op for role in roles for op in role if op.startswith("fence")}
            assert fences == ({f"fence.{variant[6:]}"} if variant.startswith("fence_") else set())


def test_ptx_of_mp_relacq() -> None:
    assert ptx_instructions("mp", "relacq", "gpu", 0) == (
        "st.relaxed.gpu.global.u32 [{x}], {one};",
        "st.release.gpu.global.u32 [{y}], {one};",
    )
    assert ptx_instructions("mp", "relacq", "sys", 1) == (
        "ld.acquire.sys.global.u32 {r0}, [{y}];",
        "ld.relaxed.sys.global.u32 {r1}, [{x}];",
    )


def test_ptx_of_fenced_lb_and_sb() -> None:
    assert ptx_instructions("lb", "fence_acq_rel", "sys", 1) == (
        "ld.relaxed.sys.global.u32 {r1}, [{y}];",
        "fence.acq_rel.sys;",
        "st.relaxed.sys.global.u32 [{x}], {one};",
    )
    assert ptx_instructions("sb", "fence_sc", "gpu", 0) == (
        "st.relaxed.gpu.global.u32 [{x}], {one};",
        "fence.sc.gpu;",
        "ld.relaxed.gpu.global.u32 {r0}, [{y}];",
    )
    with pytest.raises(ValueError, match="'cta'"):
        ptx_instructions("mp", "relaxed", "cta", 0)


def test_reader_roles() -> None:
    assert reader_roles("mp") == (1, 1)
    assert reader_roles("sb") == (0, 1)
    assert reader_roles("lb") == (0, 1)


# --------------------------------------------------------------------------- tally and report


def test_tally_counts_each_outcome() -> None:
    # SB: r0 is role 0's first output, r1 role 1's second; the other outputs are ignored.
    rows = [(0, 9, 9, 1), (1, 9, 9, 0), (1, 9, 9, 1), (1, 9, 9, 1), (0, 9, 9, 0), (0, 9, 9, 1)]
    expected = Counter((r[0], r[3]) for r in rows)
    assert tally(_out(rows), "sb") == tuple(expected[o] for o in OUTCOMES) == (1, 2, 1, 2)
    # MP: both reads are role 1's.
    rows = [(9, 9, 1, 0), (9, 9, 1, 1), (9, 9, 0, 0), (9, 9, 1, 0)]
    assert tally(_out(rows), "mp") == (1, 0, 2, 1)


def test_tally_rejects_a_value_no_store_wrote() -> None:
    rows = [(0, 0, 0, 1), (2, 0, 0, 1)]
    with pytest.raises(RuntimeError, match=r"\[2\] as r0"):
        tally(_out(rows), "lb")


def test_verdicts() -> None:
    assert _result("mp", "relacq", (5, 5, 0, 6)).verdict == litmus.VERDICT_OK
    seen = _result("mp", "relacq", (5, 5, 1, 6))
    assert (seen.verdict, seen.forbidden_count, seen.weak_count) == (litmus.VERDICT_FORBIDDEN, 1, 1)
    allowed = _result("sb", "fence_acq_rel", (3, 5, 5, 6))
    assert (allowed.verdict, allowed.forbidden_count, allowed.weak_count) == (litmus.VERDICT_WEAK, 0, 3)
    assert _result("lb", "relaxed", (3, 5, 5, 0)).verdict == litmus.VERDICT_NOT_SEEN
    assert _result("sb", "fence_sc", (1, 0, 0, 0)).verdict == litmus.VERDICT_FORBIDDEN


def test_result_json_and_table() -> None:
    r = _result("lb", "fence_sc", (7, 2, 3, 0))
    assert r.to_json() == {
        "test": "lb",
        "scope": "gpu",
        "variant": "fence_sc",
        "iterations": 12,
        "outcomes": {"00": 7, "01": 2, "10": 3, "11": 0},
        "weak_outcome": "11",
        "weak_count": 0,
        "forbidden_by_model": True,
        "forbidden_count": 0,
        "verdict": "OK",
        "seconds": 0.5,
    }
    lines = format_table([r, _result("mp", "relaxed", (1, 2, 3, 4))]).splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:8] == ["test", "scope", "variant", "iterations", "00", "01", "10", "11"]
    assert lines[1].split() == ["lb", "gpu", "fence_sc", "12", "7", "2", "3", "0", "11", "forbidden", "OK"]
    assert lines[2].endswith(" 10 allowed    weak behaviour observed (allowed)")


# --------------------------------------------------------------------------- config and flags


def test_plan_covers_the_iterations_in_bounded_launches() -> None:
    assert LitmusConfig(iterations=1000).plan == (1, 125)
    big = LitmusConfig(iterations=1 << 20)
    assert (big.plan, big.iterations_run) == ((32, 4096), 1 << 20)
    odd = LitmusConfig(iterations=100_001, pairs=3, launch_iterations=1000)
    launches, per_pair = odd.plan
    assert (launches, per_pair, odd.iterations_run) == (34, 981, 100_062)
    assert per_pair <= 1000 and odd.iterations_run >= 100_001


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tests": ("mp", "iriw")}, "tests"),
        ({"variants": ()}, "variants"),
        ({"scopes": ("cluster",)}, "scopes"),
        ({"iterations": 0}, "iterations .* got 0"),
        ({"pairs": 65}, "pairs .* got 65"),
        ({"launch_iterations": -1}, "launch_iterations"),
        ({"pairs": 64, "launch_iterations": 8192}, r"pairs \* launch_iterations .* 64 \* 8192"),
        ({"jitter": -5}, "jitter .* got -5"),
        ({"stress_ctas": -1}, "stress_ctas"),
        ({"timeout_s": 0.0}, "timeout_s"),
        ({"devices": (1, 1)}, r"devices .* \(1, 1\)"),
    ],
)
def test_config_rejects(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LitmusConfig(**kwargs)  # type: ignore[arg-type]


def test_flags_defaults_and_quick() -> None:
    config = config_from_args(_args(), gpu_count=1, peer_ok=False)
    assert config == LitmusConfig(scopes=("gpu", "sys"))
    assert config_from_args(_args(), gpu_count=2, peer_ok=True).scopes == ("gpu", "sys", "peer")
    assert config_from_args(_args(), gpu_count=2, peer_ok=False).scopes == ("gpu", "sys")
    quick = config_from_args(_args("--quick", "--tests", "sb,mp,sb", "--variants", "fence_sc"), 1, False)
    assert (quick.iterations, quick.tests, quick.variants) == (
        litmus.QUICK_ITERATIONS,
        ("sb", "mp"),
        ("fence_sc",),
    )
    assert config_from_args(_args("--quick", "--iterations", "77"), 1, False).iterations == 77
    flags = ["--pairs", "2", "--stress-ctas", "0", "--jitter", "0", "--timeout", "2", "--devices", "1,0"]
    custom = config_from_args(_args(*flags, "--scopes", "peer"), 2, True)
    assert (custom.pairs, custom.stress_ctas, custom.jitter, custom.timeout_s) == (2, 0, 0, 2.0)
    assert (custom.devices, custom.scopes) == ((1, 0), ("peer",))


@pytest.mark.parametrize(
    ("argv", "gpus", "peer_ok", "match"),
    [
        (["--tests", "mp,iriw"], 1, False, "--tests: 'mp,iriw'"),
        (["--variants", ""], 1, False, "--variants"),
        (["--scopes", "peer"], 1, False, "GPU 1 does not exist"),
        (["--scopes", "peer"], 2, False, "cannot access each other's memory"),
        (["--devices", "0"], 1, False, "--devices: '0'"),
        (["--devices", "a,b"], 1, False, "--devices: 'a,b'"),
        (["--devices", "3,0"], 2, False, "GPU 3 does not exist"),
        (["--iterations", "0"], 1, False, "iterations"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], gpus: int, peer_ok: bool, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config_from_args(_args(*argv), gpus, peer_ok)


def test_no_gpu_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert litmus.run_litmus(_args("--quick")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == ["kvrelay: error: kvrelay litmus needs a CUDA GPU"]


# --------------------------------------------------------------------------- the kernel's PTX


def test_asm_blocks_predicate_every_access_on_lane_0() -> None:
    from kvrelay.memory_model.verify.litmus_kernels import arrive_asm, body_asm, poll_asm

    body = body_asm(ptx_instructions("mp", "fence_sc", "sys", 0))
    accesses = [line for line in body.splitlines() if re.search(r"\b(ld|st|fence|red)\.", line)]
    assert accesses == [
        "@lt_p st.relaxed.sys.global.u32 [$2], lt_one;",
        "@lt_p fence.sc.sys;",
        "@lt_p st.relaxed.sys.global.u32 [$3], lt_one;",
    ]
    assert body.count("{") == body.count("}") and "{x}" not in body
    assert body.splitlines()[-3:] == [
        "shfl.sync.idx.b32 $0, lt_r0, 0, 0x1f, 0xffffffff;",
        "shfl.sync.idx.b32 $1, lt_r1, 0, 0x1f, 0xffffffff;",
        "}",
    ]
    assert "@lt_p red.relaxed.gpu.global.add.u32 [$1], lt_one;" in arrive_asm("gpu").splitlines()
    assert "@lt_p ld.relaxed.sys.global.u32 lt_v, [$1];" in poll_asm("sys").splitlines()


@pytest.fixture
def compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """litmus_kernels decorated for compilation even when another test module set
    TRITON_INTERPRET=1 first (the decorator reads it); restored afterwards."""
    import importlib

    from kvrelay.memory_model.verify import litmus_kernels

    interpreting = os.environ.get("TRITON_INTERPRET")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    importlib.reload(litmus_kernels)
    yield
    if interpreting is not None:
        monkeypatch.setenv("TRITON_INTERPRET", interpreting)
        importlib.reload(litmus_kernels)


def _ptxas_available() -> bool:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _ptxas_available(), reason="Triton without its bundled ptxas")
@pytest.mark.parametrize(
    ("test", "variant", "scope", "role"), [("mp", "relacq", "gpu", -1), ("sb", "fence_sc", "sys", 1)]
)
def test_kernel_compiles_for_sm90_with_the_body_in_order(
    test: str, variant: str, scope: str, role: int, compiled_kernels: object
) -> None:
    # Through ptxas, without a GPU: the asm is valid PTX and the body's accesses reach the PTX
    # in program order, lane 0 only.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvrelay.memory_model.verify import litmus_kernels as lk

    bodies = [lk.body_asm(ptx_instructions(test, variant, scope, r)) for r in (0, 1)]
    i64, ptr = "i64", "*i32"
    signature = dict.fromkeys(["data_addr", "counter_addr", "done_addr"], i64)
    signature |= dict.fromkeys(["perm_ptr", "delay_ptr", "out_ptr", "status_ptr", "scratch_ptr"], ptr)
    signature |= {"n_iters": "i32", "n_pairs": "i32", "timeout_ns": i64, "stop_ns": i64}
    constexprs = {
        "ROLE": role, "BODY0": bodies[0], "BODY1": bodies[1], "ARRIVE": lk.arrive_asm(scope),
        "POLL": lk.poll_asm(scope), "ARRIVE_GPU": lk.arrive_asm("gpu"), "POLL_GPU": lk.poll_asm("gpu"), "BLOCK": 128,
    }  # fmt: skip
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = ASTSource(fn=lk.litmus_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    assert compiled.asm["cubin"]
    # Each body block's predicated lines, addresses masked: one block per role, in order.
    blocks = [
        [
            re.sub(r"\[%rd\d+\]", "[A]", line.strip())
            for line in block.splitlines()
            if line.startswith("@lt_p")
        ]
        for block in re.findall(
            r"\.reg \.b32 lt_t, lt_r0, lt_r1, lt_one;(.*?)shfl", compiled.asm["ptx"], re.DOTALL
        )
    ]
    expected = [
        ["@lt_p " + re.sub(r"\[\{[xy]\}\]", "[A]", ins).format(r0="lt_r0", r1="lt_r1", one="lt_one") for ins in
         ptx_instructions(test, variant, scope, r)]
        for r in ([0, 1] if role < 0 else [role])
    ]  # fmt: skip
    assert sorted(blocks) == sorted(expected)


# --------------------------------------------------------------------------- GPU


def _check_runs(results: list[LitmusResult], config: LitmusConfig) -> None:
    assert [(r.scope, r.test, r.variant) for r in results] == list(
        itertools.product(config.scopes, config.tests, config.variants)
    )
    for r in results:
        assert r.iterations == config.iterations_run, r
        assert r.forbidden_count == 0, format_table([r])
        assert r.verdict != litmus.VERDICT_FORBIDDEN


@pytest.mark.gpu
def test_quick_on_one_gpu_sees_no_forbidden_outcome() -> None:
    config = LitmusConfig(scopes=("gpu", "sys"), iterations=litmus.QUICK_ITERATIONS)
    results = litmus.run_cases(config)
    _check_runs(results, config)
    # The barrier makes the roles overlap: SB relaxed sees more than one outcome (with no
    # overlap one role would always finish first and only 01 or 10 would appear).
    sb = next(r for r in results if (r.test, r.variant, r.scope) == ("sb", "relaxed", "gpu"))
    assert sum(c > 0 for c in sb.counts) >= 2, sb.counts


@pytest.mark.multi_gpu
def test_quick_across_two_gpus_sees_no_forbidden_outcome() -> None:
    if not torch.cuda.can_device_access_peer(1, 0):
        pytest.skip("GPUs 0 and 1 have no peer access")
    config = LitmusConfig(scopes=("peer",), iterations=litmus.QUICK_ITERATIONS)
    _check_runs(litmus.run_cases(config), config)


@pytest.mark.gpu
def test_cli_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "litmus.json"
    argv = [
        "--quick",
        "--tests",
        "mp",
        "--variants",
        "relaxed,relacq",
        "--scopes",
        "gpu",
        "--json",
        str(path),
    ]
    assert litmus.run_litmus(_args(*argv)) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in table[2:]] == [["mp", "gpu", "relaxed"], ["mp", "gpu", "relacq"]]
    report = json.loads(path.read_text())
    assert report["devices"] == {"0": torch.cuda.get_device_name(0)}
    assert report["forbidden_outcomes_seen"] is False
    assert [r["variant"] for r in report["results"]] == ["relaxed", "relacq"]
    assert all(
        sum(r["outcomes"].values()) == r["iterations"] == litmus.QUICK_ITERATIONS for r in report["results"]
    )
