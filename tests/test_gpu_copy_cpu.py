"""The handoff copy, publish and wait kernels in Triton's interpreter (no GPU), and the pure
Python around them: work planning, argument validation, the IPC export record, the bench
table. The interpreter runs CTAs one after another, so the done-counter and the last-CTA
publish are exercised with several CTAs; the inline-asm paths only run on a GPU."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before the import
pytest.importorskip("triton")

from kvrelay.memory_model import gpu_copy, ipc
from kvrelay.memory_model.verify import bench_handoff

CPU = torch.device("cpu")
interp = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs on CPU-only machines")


def make_pool(
    layers: int, blocks: int, *, block_size: int = 4, heads: int = 2, dim: int = 8, seed: int = 0
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, blocks, block_size, heads, dim)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(layers)]


def zeros_like_pool(pool: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    shape = (2, blocks, *pool[0].shape[2:])
    return [torch.zeros(shape, dtype=pool[0].dtype) for _ in pool]


# --------------------------------------------------------------------------- planning


def test_plan_8b_shape_uses_16k_chunks_and_caps_grid() -> None:
    # 16 tokens x 8 heads x 128 dims bf16 = 32 KB per (layer, kv, block): two 16 KB chunks.
    plan = gpu_copy.plan_copy(32, 64, 16 * 8 * 128, 2, max_ctas=528)
    assert (plan.chunk_elems, plan.chunks_per_block) == (8192, 2)
    assert plan.num_items == 32 * 2 * 64 * 2
    assert plan.grid == 528 and plan.num_warps == 4
    assert plan.nbytes == 128 << 20  # 2 MB per block id over 32 layers


def test_plan_small_copy_shrinks_chunks_to_feed_every_cta() -> None:
    plan = gpu_copy.plan_copy(1, 1, 16 * 8 * 128, 2, max_ctas=528)
    assert plan.chunk_elems * 2 == gpu_copy.MIN_CHUNK_BYTES  # 2 regions x 16 chunks = 32 items
    assert (plan.num_items, plan.grid, plan.num_warps) == (32, 32, 4)


def test_plan_chunk_is_largest_power_of_two_dividing_block() -> None:
    plan = gpu_copy.plan_copy(2, 3, 16 * 8 * 80, 2, max_ctas=4)  # 10240 = 2^11 * 5
    assert plan.chunk_elems == 2048 and plan.chunks_per_block == 5


def test_plan_empty_copy_still_launches_one_cta() -> None:
    plan = gpu_copy.plan_copy(4, 0, 1024, 2, max_ctas=100)
    assert (plan.num_items, plan.grid) == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_blocks": -1}, "num_blocks"),
        ({"block_elems": 0}, "block_elems"),
        ({"elem_bytes": 3}, "elem_bytes"),
        ({"max_ctas": 0}, "max_ctas"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs: dict[str, int], field: str) -> None:
    args = {"num_layers": 2, "num_blocks": 2, "block_elems": 64, "elem_bytes": 2, "max_ctas": 4} | kwargs
    with pytest.raises(ValueError, match=field):
        gpu_copy.plan_copy(
            args["num_layers"],
            args["num_blocks"],
            args["block_elems"],
            args["elem_bytes"],
            max_ctas=args["max_ctas"],
        )


def test_layer_table_holds_addresses_and_is_cached() -> None:
    pool = make_pool(3, 2)
    table = gpu_copy.build_layer_table(pool, CPU)
    assert table.tolist() == [t.data_ptr() for t in pool]
    assert gpu_copy.build_layer_table(pool, CPU) is table


# --------------------------------------------------------------------------- validation


# Kernels write through raw addresses: the memory behind them must outlive the test.
_KEEP: list[torch.Tensor] = []


def copy_args(**over: object) -> dict[str, object]:
    src = make_pool(2, 5)
    dst = zeros_like_pool(src, 6)
    sig = torch.zeros(1, dtype=torch.int64)
    _KEEP[:] = [*dst, sig]
    args: dict[str, object] = {
        "src_layers": src,
        "dst_table": gpu_copy.build_layer_table(dst, CPU),
        "src_block_ids": torch.tensor([0, 1]),
        "dst_block_ids": torch.tensor([2, 3]),
        "counter": torch.zeros(1, dtype=torch.int32),
        "signal_addr": sig.data_ptr(),
        "value": 5,
        "dst_num_blocks": 6,
    }
    return args | over


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"src_layers": []}, "src_layers"),
        ({"src_layers": [torch.zeros(2, 5, 4, 2, 8), torch.zeros(2, 4, 4, 2, 8)]}, r"src_layers\[1\]"),
        ({"src_layers": [torch.zeros(5, 4, 2, 8)]}, r"src_layers\[0\]"),
        ({"dst_table": torch.zeros(3, dtype=torch.int64)}, "dst_table"),
        ({"src_block_ids": torch.tensor([0.0, 1.0])}, "src_block_ids"),
        ({"dst_block_ids": torch.tensor([1])}, "dst_block_ids"),
        ({"counter": torch.zeros(1, dtype=torch.int64)}, "counter"),
        ({"signal_addr": 12}, "signal_addr"),
        ({"value": 1 << 64}, "value"),
        ({"value": -1}, "value"),
        ({"dst_num_blocks": 0}, "dst_num_blocks"),
    ],
)
def test_copy_rejects_bad_arguments(over: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        gpu_copy.copy_blocks_and_signal(**copy_args(**over))  # type: ignore[arg-type]


def test_wait_rejects_negative_timeout() -> None:
    sig = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="timeout_ns"):
        gpu_copy.wait_signal(sig.data_ptr(), 1, None, -1, CPU)


# --------------------------------------------------------------------------- interpreter


@interp
@pytest.mark.parametrize("num_ids", [0, 1, 5])
def test_interpreted_copy_moves_exactly_the_blocks_and_signals(num_ids: int) -> None:
    src = make_pool(3, 7, seed=num_ids)
    dst = zeros_like_pool(src, 9)
    gen = torch.Generator().manual_seed(1)
    src_ids = torch.randperm(7, generator=gen)[:num_ids]
    dst_ids = torch.randperm(9, generator=gen)[:num_ids].to(torch.int32)
    counter = torch.zeros(1, dtype=torch.int32)
    words = torch.zeros(2, dtype=torch.int64)
    value = (3 << 32) | 17
    plan = gpu_copy.copy_blocks_and_signal(
        src,
        gpu_copy.build_layer_table(dst, CPU),
        src_ids,
        dst_ids,
        counter,
        words.data_ptr(),
        value,
        dst_num_blocks=9,
    )
    assert plan.grid == min(4, max(1, plan.num_items))
    untouched = torch.ones(9, dtype=torch.bool)
    untouched[dst_ids.long()] = False
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, dst_ids.long()], s[:, src_ids])  # K and V, bit for bit
        assert not d[:, untouched].any()
    assert counter.item() == 0  # reset by the last CTA for the next launch
    assert words.tolist() == [value, 0]


@interp
def test_interpreted_copy_of_a_full_64_bit_value() -> None:
    args = copy_args(value=(1 << 64) - 1)
    sig = torch.zeros(1, dtype=torch.int64)
    args["signal_addr"] = sig.data_ptr()
    gpu_copy.copy_blocks_and_signal(**args)  # type: ignore[arg-type]
    assert sig.item() == -1  # all 64 bits set


@interp
def test_interpreted_publish_and_wait_statuses() -> None:
    words = torch.zeros(2, dtype=torch.int64)  # [signal, abort]
    sig, abort = words.data_ptr(), words.data_ptr() + 8
    assert gpu_copy.wait_signal(sig, 9, abort, 20_000, CPU).item() == 2  # nothing: timeout
    gpu_copy.publish_signal(sig, 8)
    assert words.tolist() == [8, 0]
    assert gpu_copy.wait_signal(sig, 9, abort, 20_000, CPU).item() == 2  # a stale value is not accepted
    words[1] = 9
    assert gpu_copy.wait_signal(sig, 9, abort, 20_000, CPU).item() == 1
    gpu_copy.publish_signal(sig, 9)
    assert gpu_copy.wait_signal(sig, 9, abort, 20_000, CPU).item() == 0
    assert gpu_copy.wait_signal(sig, 9, None, 0, CPU).item() == 0


# --------------------------------------------------------------------------- ipc


def tensor_export(**over: object) -> ipc.TensorExport:
    fields: dict[str, object] = {
        "device": 1,
        "handle": b"\x01" * 64,
        "storage_size_bytes": 4096,
        "storage_offset_bytes": 512,
        "ref_counter_handle": b"/torch_ref",
        "ref_counter_offset": 0,
        "event_handle": None,
        "event_sync_required": False,
        "shape": (2, 4),
        "stride": (4, 1),
        "storage_offset": 0,
        "dtype": "bfloat16",
    }
    return ipc.TensorExport(**(fields | over))  # type: ignore[arg-type]


def test_ipc_export_is_plain_picklable_data() -> None:
    export = ipc.IpcExport(owner_key="decode-0:1", tensors=(tensor_export(), tensor_export(device=0)))
    back = pickle.loads(pickle.dumps(export))
    assert back == export
    assert back.tensors[0].shape == (2, 4) and back.tensors[1].device == 0


@pytest.mark.parametrize(
    ("over", "field"),
    [({"device": -1}, "device"), ({"stride": (1,)}, "stride"), ({"dtype": "bfloat17"}, "dtype")],
)
def test_ipc_export_rejects_bad_fields(over: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tensor_export(**over)


def test_ipc_rejects_cpu_tensors_and_empty_key() -> None:
    with pytest.raises(ValueError, match="CUDA IPC"):
        ipc.export_tensors([torch.zeros(2)], owner_key="k")
    with pytest.raises(ValueError, match="owner_key"):
        ipc.IpcExport(owner_key="", tensors=())
    assert ipc.close_peer("never-opened") is False


def test_register_host_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="addr"):
        ipc.register_host(0, 8)
    with pytest.raises(ValueError, match="nbytes"):
        ipc.register_host(4096, 0)


# --------------------------------------------------------------------------- bench


def test_bench_args_and_table() -> None:
    parser = argparse.ArgumentParser()
    bench_handoff.add_bench_handoff_args(parser)
    args = parser.parse_args(["--sizes-mb", "1", "64", "--rounds", "10"])
    assert (args.sizes_mb, args.rounds, args.launches) == ([1, 64], 10, 20)
    results = {
        "device": "H100",
        "topology": "cuda:0 -> cuda:1",
        "latency": [
            {
                "where": "gpu",
                "mode": "two GPUs",
                "one_way_us": {"p50": 1.25, "p90": 1.5, "p99": 2.5, "min": 1.0},
            }
        ],
        "bandwidth": [
            {
                "size_mb": 64.0,
                "peer_copy_gbps": 100.0,
                "contiguous_gbps": 85.0,
                "contiguous_ratio": 0.85,
                "scattered_gbps": 50.0,
                "scattered_ratio": 0.5,
            }
        ],
    }
    table = bench_handoff.format_table(results)
    assert "p50 1.25 us" in table and "target <= 2.0 us: ok" in table
    assert "contig ok, scatter MISS" in table


def test_percentiles() -> None:
    got = bench_handoff._percentiles([float(x) for x in range(100, 0, -1)])
    assert got == {"p50": 51.0, "p90": 91.0, "p99": 100.0, "min": 1.0}


def test_bench_handoff_devices_flag() -> None:
    from kvrelay.memory_model.verify.bench_handoff import _devices

    assert _devices(None, 1) == (0, 0) and _devices(None, 8) == (0, 1)
    assert _devices("3,5", 8) == (3, 5)
    with pytest.raises(ValueError, match="SRC,DST"):
        _devices("3", 8)
    with pytest.raises(ValueError, match=r"GPUs 0\.\.1"):
        _devices("0,2", 2)
