"""The handoff data path on real GPUs: the copy kernel's data and signal, publish/wait, mapped
pinned host memory, and (two GPUs) the copy into a peer's memory and CUDA IPC between two
processes. Skipped without CUDA (conftest); the CPU parts are in test_gpu_copy_cpu.py."""

from __future__ import annotations

import re
from multiprocessing.connection import Connection

import pytest
import torch

pytest.importorskip("triton")

from kvrelay.memory_model import gpu_copy, ipc

gpu = pytest.mark.gpu
multi_gpu = pytest.mark.multi_gpu
# The 8B shape's block: 16 tokens x 8 KV heads x 128 dims.
BLOCK = (16, 8, 128)


def make_pool(layers: int, blocks: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device).manual_seed(seed)
    return [
        torch.randn((2, blocks, *BLOCK), generator=gen, device=device).to(torch.bfloat16)
        for _ in range(layers)
    ]


def block_checksums(layer: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 [2, n]: the sum of each selected block's raw 16-bit words (K and V)."""
    return layer[:, ids.long()].view(torch.int16).long().sum(dim=(2, 3, 4))


def run_copy(src_dev: torch.device, dst_dev: torch.device, n: int, seed: int = 0) -> None:
    layers, src_blocks, dst_blocks = 4, 40, 50
    src = make_pool(layers, src_blocks, src_dev, seed)
    dst = [torch.zeros((2, dst_blocks, *BLOCK), dtype=torch.bfloat16, device=dst_dev) for _ in range(layers)]
    gen = torch.Generator().manual_seed(seed)
    src_ids = torch.randperm(src_blocks, generator=gen)[:n].to(src_dev)
    dst_ids = torch.randperm(dst_blocks, generator=gen)[:n].to(src_dev)
    counter = torch.zeros(1, dtype=torch.int32, device=src_dev)
    signal = torch.zeros(1, dtype=torch.int64, device=dst_dev)
    gpu_copy.enable_peer_access(src_dev, dst_dev)
    table = gpu_copy.build_layer_table(dst, src_dev)
    for value in (7, (5 << 32) | 9):  # the second launch checks the counter was reset
        gpu_copy.copy_blocks_and_signal(
            src, table, src_ids, dst_ids, counter, signal.data_ptr(), value, dst_num_blocks=dst_blocks
        )
        torch.cuda.synchronize(src_dev)
        assert signal.item() == value
        assert counter.item() == 0
    untouched = torch.ones(dst_blocks, dtype=torch.bool, device=dst_dev)
    untouched[dst_ids.to(dst_dev)] = False
    for s, d in zip(src, dst, strict=True):
        want = s[:, src_ids].to(dst_dev)
        assert torch.equal(d[:, dst_ids.to(dst_dev)], want)
        assert torch.equal(block_checksums(d, dst_ids.to(dst_dev)).cpu(), block_checksums(s, src_ids).cpu())
        assert not d[:, untouched].any()


@gpu
@pytest.mark.parametrize("n", [0, 1, 23])
def test_copy_scattered_blocks_same_gpu(n: int) -> None:
    dev = torch.device("cuda", 0)
    run_copy(dev, dev, n, seed=n)


@gpu
def test_copy_kernel_uses_16_byte_vectors() -> None:
    dev = torch.device("cuda", 0)
    run_copy(dev, dev, 3)
    caches = gpu_copy._copy_blocks_kernel.device_caches.values()
    kernels = [k for cache in caches for k in cache[0].values()]
    assert kernels, "no compiled copy kernel"
    ptx = kernels[-1].asm["ptx"]
    assert re.search(r"ld\.global[.\w:]*\.v4\.b32", ptx), "loads are not 16-byte vectors"
    assert re.search(r"st\.global[.\w:]*\.v4\.b32", ptx), "stores are not 16-byte vectors"


@gpu
def test_publish_then_wait_round_trip() -> None:
    dev = torch.device("cuda", 0)
    words = torch.zeros(2, dtype=torch.int64, device=dev)  # [signal, abort]
    sig, abort = words.data_ptr(), words.data_ptr() + 8
    value = (3 << 32) | 4
    gpu_copy.publish_signal(sig, value, dev)
    status = gpu_copy.wait_signal(sig, value, abort, 1_000_000_000, dev)
    assert status.item() == 0
    assert words.tolist() == [value, 0]


@gpu
def test_wait_times_out_on_stale_value_and_sees_abort() -> None:
    dev = torch.device("cuda", 0)
    words = torch.tensor([41, 0], dtype=torch.int64, device=dev)
    sig, abort = words.data_ptr(), words.data_ptr() + 8
    assert gpu_copy.wait_signal(sig, 42, abort, 200_000, dev).item() == 2
    words[1] = 42
    assert gpu_copy.wait_signal(sig, 42, abort, 1_000_000_000, dev).item() == 1


@gpu
def test_copy_signals_into_mapped_pinned_host_memory() -> None:
    dev = torch.device("cuda", 0)
    host = torch.zeros(512, dtype=torch.int64)  # 4 KB of ordinary (pageable) host memory
    dptr = ipc.register_host(host.data_ptr(), host.numel() * 8)
    try:
        assert dptr == host.data_ptr()  # UVA
        src = make_pool(2, 8, dev, 3)
        dst = [torch.zeros_like(t) for t in src]
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        ids = torch.tensor([6, 1, 4], device=dev)
        value = (1 << 40) | 77
        gpu_copy.copy_blocks_and_signal(
            src, gpu_copy.build_layer_table(dst, dev), ids, ids, counter, dptr + 64, value, dst_num_blocks=8
        )
        torch.cuda.synchronize(dev)
        assert host[8].item() == value and host[0].item() == 0
        assert all(torch.equal(d[:, ids], s[:, ids]) for s, d in zip(src, dst, strict=True))
    finally:
        ipc.unregister_host(host.data_ptr())


@multi_gpu
@pytest.mark.parametrize("n", [1, 37])
def test_copy_into_peer_gpu(n: int) -> None:
    run_copy(torch.device("cuda", 0), torch.device("cuda", 1), n, seed=n)


def _ipc_owner(conn: Connection) -> None:
    """Owns a pool on cuda:1, exports it, waits for the peer's copy, reports checksums."""
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(dev)
    pool = [torch.zeros((2, 12, *BLOCK), dtype=torch.bfloat16, device=dev) for _ in range(3)]
    signal = torch.zeros(1, dtype=torch.int64, device=dev)
    torch.cuda.synchronize(dev)
    conn.send(ipc.export_tensors([*pool, signal], owner_key="owner-1:0"))
    expected = conn.recv()
    status = gpu_copy.wait_signal(signal.data_ptr(), expected, None, 10_000_000_000, dev)
    ids = torch.tensor([9, 2, 5], device=dev)
    conn.send((status.item(), [block_checksums(t, ids).cpu() for t in pool]))
    conn.recv()


@multi_gpu
def test_ipc_export_open_and_copy_between_processes() -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    owner = ctx.Process(target=_ipc_owner, args=(child,))
    owner.start()
    try:
        dev = torch.device("cuda", 0)
        export = parent.recv()
        assert [t.device for t in export.tensors] == [1, 1, 1, 1]
        opened = ipc.open_tensors(export, dev)
        assert ipc.open_tensors(export, dev)[0].data_ptr() == opened[0].data_ptr()  # cached
        *peer_pool, peer_signal = opened
        src = make_pool(3, 6, dev, 11)
        src_ids = torch.tensor([0, 3, 5], device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        value = (2 << 32) | 1
        parent.send(value)
        gpu_copy.copy_blocks_and_signal(
            src,
            gpu_copy.build_layer_table(peer_pool, dev),
            src_ids,
            torch.tensor([9, 2, 5], device=dev),
            counter,
            peer_signal.data_ptr(),
            value,
            dst_num_blocks=12,
        )
        status, sums = parent.recv()
        assert status == 0
        for s, got in zip(src, sums, strict=True):
            assert torch.equal(got, block_checksums(s, src_ids).cpu())
        assert ipc.close_peer("owner-1:0") is True
        assert "owner-1:0" not in ipc.open_peer_keys()
        parent.send("done")
    finally:
        owner.join(timeout=60)
        if owner.is_alive():
            owner.kill()
    assert owner.exitcode == 0
