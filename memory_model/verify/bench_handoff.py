# Kernel parameters are Triton-typed (pointers, constexprs), not Python-typed.
# mypy: disable-error-code="no-untyped-def"
"""``kvrelay bench handoff``: the KV handoff data path without the serving stack.

(a) One-way signal latency: two processes (torch.multiprocessing spawn; Ray actors are not
    used here), one per GPU, play ping-pong: each publishes with st.release.sys into the
    *peer's* flag word and spins with ld.acquire.sys on its *own*; ``rounds`` round trips
    run inside one kernel launch per side, and one-way = round trip / 2, with percentiles
    over launches. Twice: flags in GPU memory (opened by CUDA IPC), and flags in one mapped
    pinned host page (POSIX shm registered by both). Then a GPU kernel against a CPU process
    on that page: the path by which a decode worker's scheduler learns of a completed copy.
    One GPU runs only that last mode: two processes spinning on one GPU time-slice (one round
    per ~2 ms slice unless MPS runs), which would measure the driver's scheduler.
(b) Handoff bandwidth: ``copy_blocks_and_signal`` over an 8B-shaped pool (32 layers, 8 KV
    heads, 128 dims, bf16, 16-token blocks) from cuda:0 into cuda:1, contiguous and scattered
    block ids, next to a peer copy of one contiguous buffer of the same size measured in the
    same run (cudaMemcpyPeer through ``Tensor.copy_``). With one GPU both run device-local.
    Bandwidth counts bytes copied (not read + written), over GPU time (events around 10
    back-to-back launches), then of the kernel alone (the launches replayed from a CUDA graph):
    below ~16 MB a copy is shorter than its host launch cost, reported beside it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import ipc
from .cuda_timing import median_cuda_ms

TARGET_ONE_WAY_US = 2.0
TARGET_CONTIGUOUS_RATIO = 0.80  # for copies >= 64 MB
TARGET_SCATTERED_RATIO = 0.60
_PING_TIMEOUT_NS = 5_000_000_000
_FLAG_STRIDE = 128  # bytes between the two flags: separate cache lines


def _percentiles(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    at = {q: s[min(len(s) - 1, int(q * len(s)))] for q in (0.5, 0.9, 0.99)}
    return {"p50": at[0.5], "p90": at[0.9], "p99": at[0.99], "min": s[0]}


def _pingpong_worker(rank: int, cfg: dict[str, Any], conn: Any) -> None:
    """One side of the ping-pong (rank 0 initiates). Flags: in GPU memory, each side's
    own word exported to the other by IPC; or in the shm page named ``cfg["shm"]``."""
    from multiprocessing import shared_memory

    if cfg["where"] == "cpu" and rank == 1:
        _cpu_responder(cfg, conn)
        return
    dev = torch.device("cuda", cfg["devices"][rank])
    torch.cuda.set_device(dev)
    out = torch.zeros(2, dtype=torch.int64, device=dev)
    if cfg["where"] == "gpu":
        own = torch.zeros(_FLAG_STRIDE // 8, dtype=torch.int64, device=dev)
        torch.cuda.synchronize(dev)
        conn.send(ipc.export_tensors([own], owner_key=f"pingpong-{rank}"))
        peer = ipc.open_tensors(conn.recv(), dev)[0]
        my_addr, peer_addr = own.data_ptr(), peer.data_ptr()
    else:
        shm = shared_memory.SharedMemory(name=cfg["shm"])
        host = _shm_address(shm)
        dptr = ipc.register_host(host, shm.size)
        my_addr, peer_addr = dptr + rank * _FLAG_STRIDE, dptr + (1 - rank) * _FLAG_STRIDE
    rounds = cfg["rounds"]
    one_way_us = []
    for launch in range(cfg["launches"] + 1):  # launch 0 compiles and warms up
        conn.send("ready")
        conn.recv()  # both sides launch after both are ready: neither times out compiling
        from .bench_kernels import pingpong_kernel

        pingpong_kernel[(1,)](
            out,
            my_addr,
            peer_addr,
            1 + launch * rounds,
            rounds,
            _PING_TIMEOUT_NS,
            INITIATOR=rank == 0,
            num_warps=1,
        )
        ns, done = out.tolist()
        if done != rounds:
            raise RuntimeError(f"rank {rank}: ping-pong launch {launch} completed {done}/{rounds} rounds")
        if launch:
            one_way_us.append(ns / rounds / 2 / 1e3)
    conn.send(one_way_us)
    if cfg["where"] == "gpu":
        ipc.close_peer(f"pingpong-{1 - rank}")
    else:
        ipc.unregister_host(host)
        shm.close()


def _cpu_responder(cfg: dict[str, Any], conn: Any) -> None:
    """The CPU side of a GPU <-> CPU ping-pong: what a decode worker's scheduler does when it
    polls its host-visible mailbox. Spins with acquire loads on its own word of the shm page
    and answers with a release store into the GPU's (CPU atomics, memory_model.atomics)."""
    from multiprocessing import shared_memory

    from .. import atomics

    shm = shared_memory.SharedMemory(name=cfg["shm"])
    host = _shm_address(shm)
    mine, peer = host + _FLAG_STRIDE, host
    rounds = cfg["rounds"]
    load, store, acquire, release = atomics.load, atomics.store, atomics.Order.ACQUIRE, atomics.Order.RELEASE
    for launch in range(cfg["launches"] + 1):
        conn.send("ready")
        conn.recv()
        deadline = time.monotonic() + _PING_TIMEOUT_NS / 1e9
        for r in range(rounds):
            v = 1 + launch * rounds + r
            while load(mine, acquire) != v:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cpu responder: launch {launch} round {r} timed out")
            store(peer, v, release)
    conn.send([])
    shm.close()


def _shm_address(shm: Any) -> int:
    # The ctypes view is dropped at return, so that shm.close() finds no exported buffer.
    return ctypes.addressof(ctypes.c_char.from_buffer(shm.buf))


def measure_signal_latency(
    devices: tuple[int, int], where: str, rounds: int, launches: int
) -> dict[str, Any]:
    """Ping-pong between two spawned processes; ``where`` is "gpu" or "host" (flag memory of
    two GPU kernels), or "cpu" (a GPU kernel on devices[0] and a CPU process, host flags)."""
    from multiprocessing import shared_memory

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=4096) if where in ("host", "cpu") else None
    # A new segment reads as zeros: no flag value (all >= 1) is there yet.
    cfg = {"devices": devices, "where": where, "rounds": rounds, "launches": launches}
    cfg["shm"] = shm.name if shm is not None else ""
    # The parent relays: each child talks to it through its own pipe.
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_pingpong_worker, args=(r, cfg, pipes[r][1])) for r in range(2)]
    for p in procs:
        p.start()
    for _, child_end in pipes:
        child_end.close()  # a dead child then shows as EOFError here, not a hang
    try:
        ends = [pipes[r][0] for r in range(2)]
        if where == "gpu":
            exports = [e.recv() for e in ends]
            ends[0].send(exports[1])
            ends[1].send(exports[0])
        for _ in range(launches + 1):
            for e in ends:
                e.recv()
            for e in ends:
                e.send("go")
        one_way = ends[0].recv()
        ends[1].recv()
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        if shm is not None:
            shm.close()
            shm.unlink()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"ping-pong processes exited with {[p.exitcode for p in procs]}")
    if where == "cpu":
        mode = "GPU kernel <-> CPU process (the scheduler's mailbox poll)"
    elif devices[0] != devices[1]:
        mode = "two GPUs"
    else:
        mode = "one GPU shared by two processes (time-sliced)"
    return {
        "where": where,
        "mode": mode,
        "rounds": rounds,
        "launches": launches,
        "one_way_us": _percentiles(one_way),
    }


# --------------------------------------------------------------------------- bandwidth


_BATCH = 10  # back-to-back launches per timed sample: GPU time, not the host's launch cost


def _median_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    with torch.cuda.device(device):
        return median_cuda_ms(fn, iters, warmup=2, batch=_BATCH)


def _host_launch_us(fn: Callable[[], object], device: torch.device, calls: int = 50) -> float:
    """Host microseconds per call of `fn` while the GPU keeps up (it only enqueues): the cost a
    prefill worker's step loop pays per handoff, which overlaps the copy of the one before."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize(device)
    return us


def _copy_gbps(
    src: list[torch.Tensor],
    dst_table: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    dst_blocks: int,
    iters: int,
) -> tuple[float, float, float]:
    """GB/s of the handoff copy as launched (GPU time of back-to-back launches), the host's
    microseconds per launch, and GB/s of the kernel alone (graph replay)."""
    from .. import gpu_copy

    device = src[0].device
    copier = gpu_copy.BlockCopier(src, dst_table, dst_num_blocks=dst_blocks)
    signal = torch.zeros(1, dtype=torch.int64, device=device)
    value = [0]

    def launch() -> None:
        value[0] += 1
        copier(src_ids, dst_ids, signal.data_ptr(), value[0])

    ms = _median_ms(launch, iters, device)
    launch_us = _host_launch_us(launch, device)
    if signal.item() != value[0] or copier.counter.item() != 0:
        raise RuntimeError(
            f"copy signalled {signal.item()} (want {value[0]}), counter {copier.counter.item()} (want 0)"
        )
    # The kernel alone: launches captured in a CUDA graph, so no host launch cost stalls the GPU
    # (small copies are launch-bound above; this says what the copy itself reaches).
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(_BATCH):
                copier(src_ids, dst_ids, signal.data_ptr(), value[0] + 1)
        torch.cuda.current_stream().wait_stream(stream)
        kernel_ms = median_cuda_ms(graph.replay, iters, warmup=1) / _BATCH
    nbytes = src[0][0, 0].numel() * src[0].element_size() * 2 * len(src) * src_ids.numel()
    return nbytes / ms / 1e6, launch_us, nbytes / kernel_ms / 1e6


def _peer_copy_gbps(nbytes: int, src_dev: torch.device, dst_dev: torch.device, iters: int) -> float:
    """One contiguous buffer copied to the other device (cudaMemcpyPeerAsync), or within one."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_dev)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)
    return nbytes / _median_ms(lambda: dst.copy_(src, non_blocking=True), iters, src_dev) / 1e6


def measure_bandwidth(
    src_dev: torch.device, dst_dev: torch.device, sizes_mb: list[int], iters: int, pool_blocks: int = 1024
) -> list[dict[str, Any]]:
    """GB/s of the handoff copy (contiguous and scattered ids) and of a contiguous peer copy
    of the same bytes, per size. Sizes below one block id of all 32 layers use fewer layers."""
    from .. import gpu_copy

    layers, heads, dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    region = block_size * heads * dim * 2  # bytes of one (layer, kv, block)
    shape = (2, pool_blocks, block_size, heads, dim)
    src = [torch.randn(shape, device=src_dev).to(dtype) for _ in range(layers)]
    dst = [torch.zeros(shape, dtype=dtype, device=dst_dev) for _ in range(layers)]
    gpu_copy.enable_peer_access(src_dev, dst_dev)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for mb in sizes_mb:
        nbytes = mb << 20
        n_layers = max(1, min(layers, nbytes // (2 * region)))
        n_blocks = max(1, nbytes // (2 * region * n_layers))
        if n_blocks > pool_blocks:
            raise ValueError(f"--sizes-mb {mb} needs {n_blocks} blocks, pool has {pool_blocks}")
        table = gpu_copy.build_layer_table(dst[:n_layers], src_dev)
        ids = {
            "contiguous": (torch.arange(n_blocks), torch.arange(n_blocks)),
            "scattered": (
                torch.randperm(pool_blocks, generator=gen)[:n_blocks],
                torch.randperm(pool_blocks, generator=gen)[:n_blocks],
            ),
        }
        moved = 2 * region * n_layers * n_blocks
        row: dict[str, Any] = {"size_mb": moved / 2**20, "layers": n_layers, "blocks": n_blocks}
        row["peer_copy_gbps"] = _peer_copy_gbps(moved, src_dev, dst_dev, iters)
        for kind, (s_ids, d_ids) in ids.items():
            gbps, launch_us, kernel_gbps = _copy_gbps(
                src[:n_layers], table, s_ids.to(src_dev), d_ids.to(src_dev), pool_blocks, iters
            )
            row[f"{kind}_gbps"] = gbps
            row[f"{kind}_launch_us"] = launch_us
            row[f"{kind}_kernel_gbps"] = kernel_gbps
            row[f"{kind}_ratio"] = gbps / row["peer_copy_gbps"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- CLI


def add_bench_handoff_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=1000, help="round trips per ping-pong launch")
    parser.add_argument("--launches", type=int, default=20, help="ping-pong launches (percentiles over them)")
    parser.add_argument("--iters", type=int, default=20, help="timed copies per bandwidth point")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument(
        "--devices", default=None, help="SRC,DST GPU indices (default 0,1, or 0,0 on one GPU)"
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="also every ordered GPU pair: one-way latency and 64 MB bandwidth",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")


def format_table(results: dict[str, Any]) -> str:
    lines = [f"handoff bench on {results['device']} ({results['topology']})"]
    for lat in results.get("latency", []):
        p = lat["one_way_us"]
        ok = "ok" if p["p50"] <= TARGET_ONE_WAY_US else "MISS"
        lines.append(
            f"signal one-way, {lat['where']:4s}: {lat['mode']}: p50 {p['p50']:.2f} us  "
            f"p90 {p['p90']:.2f}  p99 {p['p99']:.2f}  (target <= {TARGET_ONE_WAY_US} us: {ok})"
        )
    if results.get("bandwidth"):
        lines.append(
            f"{'MB':>7} {'peer GB/s':>10} {'contig GB/s':>12} {'ratio':>6} {'scatter GB/s':>13} {'ratio':>6} "
            f"{'launch us':>10} {'kernel GB/s':>12}  targets"
        )
    for r in results.get("bandwidth", []):
        c_ok = r["contiguous_ratio"] >= TARGET_CONTIGUOUS_RATIO if r["size_mb"] >= 64 else None
        s_ok = r["scattered_ratio"] >= TARGET_SCATTERED_RATIO
        verdict = (
            f"contig {'-' if c_ok is None else 'ok' if c_ok else 'MISS'}, scatter {'ok' if s_ok else 'MISS'}"
        )
        lines.append(
            f"{r['size_mb']:7.1f} {r['peer_copy_gbps']:10.1f} {r['contiguous_gbps']:12.1f} "
            f"{r['contiguous_ratio']:6.2f} {r['scattered_gbps']:13.1f} {r['scattered_ratio']:6.2f} "
            f"{r.get('scattered_launch_us', float('nan')):10.1f} "
            f"{r.get('scattered_kernel_gbps', float('nan')):12.1f}  {verdict}"
        )
    return "\n".join(lines)


def run_bench_handoff(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("bench handoff needs a CUDA GPU", file=sys.stderr)
        return 2
    for name in ("rounds", "launches", "iters"):
        if getattr(args, name) < 1:
            print(f"--{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    count = torch.cuda.device_count()
    devices = _devices(args.devices, count)
    two = devices[0] != devices[1]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(devices[0]),
        "topology": f"cuda:{devices[0]} -> cuda:{devices[1]}" if two else "one GPU: device-local",
        "latency": [],
        "bandwidth": [],
        "targets": {
            "one_way_us": TARGET_ONE_WAY_US,
            "contiguous_ratio_ge_64mb": TARGET_CONTIGUOUS_RATIO,
            "scattered_ratio": TARGET_SCATTERED_RATIO,
        },
    }
    if not args.skip_latency:
        # Two processes spinning on one GPU time-slice (one round per ~2 ms slice, unless MPS
        # runs): that measures the driver's scheduler, so one GPU runs the CPU mode only.
        for where in ("gpu", "host", "cpu") if two else ("cpu",):
            results["latency"].append(measure_signal_latency(devices, where, args.rounds, args.launches))
    if not args.skip_bandwidth:
        src, dst = torch.device("cuda", devices[0]), torch.device("cuda", devices[1])
        results["bandwidth"] = measure_bandwidth(src, dst, args.sizes_mb, args.iters)
    if args.matrix and count >= 2:
        results["matrix"] = measure_matrix(count, args.rounds, args.launches, args.iters)
    print(format_table(results))
    for row in results.get("matrix", []):
        print(
            f"cuda:{row['src']} -> cuda:{row['dst']}: one-way p50 {row['one_way_us_p50']:.2f} us, "
            f"64 MB contiguous {row['contiguous_gbps']:.0f} GB/s ({row['contiguous_ratio']:.2f} of peer copy)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _devices(flag: str | None, count: int) -> tuple[int, int]:
    if flag is None:
        return (0, 1) if count >= 2 else (0, 0)
    try:
        src, dst = (int(x) for x in flag.split(","))
    except ValueError:
        raise ValueError(f"--devices must be SRC,DST GPU indices, got {flag!r}") from None
    if not (0 <= src < count and 0 <= dst < count):
        raise ValueError(f"--devices {flag}: this machine has GPUs 0..{count - 1}")
    return src, dst


def measure_matrix(count: int, rounds: int, launches: int, iters: int) -> list[dict[str, Any]]:
    """Every ordered pair of GPUs: one-way signal latency (GPU flags) and the 64 MB contiguous
    handoff bandwidth against that pair's peer copy: the topology, as the handoff sees it."""
    rows = []
    for src in range(count):
        for dst in range(count):
            if src == dst:
                continue
            lat = measure_signal_latency((src, dst), "gpu", rounds, launches)
            [bw] = measure_bandwidth(torch.device("cuda", src), torch.device("cuda", dst), [64], iters)
            rows.append(
                {
                    "src": src,
                    "dst": dst,
                    "one_way_us_p50": lat["one_way_us"]["p50"],
                    "contiguous_gbps": bw["contiguous_gbps"],
                    "contiguous_ratio": bw["contiguous_ratio"],
                    "peer_copy_gbps": bw["peer_copy_gbps"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrelay bench handoff", description=__doc__)
    add_bench_handoff_args(parser)
    return run_bench_handoff(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
