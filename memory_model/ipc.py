"""Sharing memory between worker processes: CUDA IPC of tensors, and pinned shared host memory.

CUDA IPC (``export_tensors`` in the owner, ``open_tensors`` in a peer): the export is plain
picklable data (handle bytes, offsets, shape, dtype, device index) that travels over Ray. The
peer maps each allocation into its *own* device's context (as vLLM's custom all-reduce does):
``cudaIpcOpenMemHandle`` with lazy peer access enables peer access from that device to the
owner's, so the peer's kernels can write the owner's memory directly. The opened tensors are
therefore labelled with the opener's device although the bytes live on ``TensorExport.device``.

Both processes must see every GPU of the node, in the same order, so that the device index
in an export is physical and means the same GPU in both: start Ray actors with
``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` and pick the device from
``ray.get_gpu_ids()`` (`cluster/pool.py` does both). ``open_tensors`` checks peer access.

The owner must keep the exported tensors alive (torch also counts the peer's references
before it reuses the memory). A peer's mappings are cached per ``owner_key`` (one key per
owner incarnation, e.g. ``"decode-3:epoch-2"``): opened once, dropped by ``close_peer`` when
the owner restarts or on shutdown.

Pinned shared host memory (``register_host``): page-locks and maps an existing host range
(the consumer's POSIX shm mailbox, mapped by each process) for every device, and returns
the address device code uses, which equals the host address under UVA (64-bit Linux).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

# cudaHostRegisterPortable | cudaHostRegisterMapped: usable from every device's context.
_HOST_REGISTER_FLAGS = 0x01 | 0x02


@dataclass(frozen=True)
class TensorExport:
    """One tensor as torch's CUDA IPC sends it (``UntypedStorage._share_cuda_``)."""

    device: int  # physical index of the GPU holding the bytes
    handle: bytes  # cudaIpcMemHandle of the allocation (segment) holding the storage
    storage_size_bytes: int
    storage_offset_bytes: int  # of the storage inside that allocation
    ref_counter_handle: bytes  # torch's shared reference counter for the owner's allocator
    ref_counter_offset: int
    event_handle: bytes | None  # the owner's last-write event, waited on at open
    event_sync_required: bool
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # of the tensor inside its storage, in elements
    dtype: str  # e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.device < 0:
            raise ValueError(f"device must be >= 0, got {self.device}")
        if len(self.shape) != len(self.stride):
            raise ValueError(f"shape {self.shape} and stride {self.stride} differ in rank")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype {self.dtype!r} is not a torch dtype")


@dataclass(frozen=True)
class IpcExport:
    owner_key: str  # the owner process and incarnation; the peer's cache key
    tensors: tuple[TensorExport, ...]

    def __post_init__(self) -> None:
        if not self.owner_key:
            raise ValueError("owner_key must be non-empty")


def export_tensors(tensors: list[torch.Tensor], owner_key: str) -> IpcExport:
    out = []
    for i, t in enumerate(tensors):
        if not t.is_cuda:
            raise ValueError(f"tensors[{i}] is on {t.device}: CUDA IPC shares CUDA tensors only")
        storage = t.untyped_storage()
        (
            device,
            handle,
            size_bytes,
            offset_bytes,
            ref_handle,
            ref_offset,
            event_handle,
            event_sync,
        ) = storage._share_cuda_()
        out.append(
            TensorExport(
                device=int(device),
                handle=bytes(handle),
                storage_size_bytes=int(size_bytes),
                storage_offset_bytes=int(offset_bytes),
                ref_counter_handle=bytes(ref_handle),
                ref_counter_offset=int(ref_offset),
                event_handle=bytes(event_handle) if event_handle else None,
                event_sync_required=bool(event_sync),
                shape=tuple(t.shape),
                stride=tuple(t.stride()),
                storage_offset=int(t.storage_offset()),
                dtype=str(t.dtype).removeprefix("torch."),
            )
        )
    return IpcExport(owner_key=owner_key, tensors=tuple(out))


_lock = threading.Lock()
_opened: dict[str, tuple[IpcExport, list[torch.Tensor]]] = {}


def open_tensors(export: IpcExport, device: torch.device | None = None) -> list[torch.Tensor]:
    """The owner's tensors, mapped into ``device`` (default: the current CUDA device) of this
    process. Opened once per ``owner_key``; a key reused with other handles is an error
    (the owner restarted without a new key, or ``close_peer`` was skipped)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    if dev.type != "cuda" or dev.index is None:
        raise ValueError(f"device must be an indexed CUDA device, got {dev}")
    with _lock:
        cached = _opened.get(export.owner_key)
        if cached is not None:
            if cached[0] != export:
                raise RuntimeError(
                    f"owner_key {export.owner_key!r} is already open with other handles: close_peer first"
                )
            return list(cached[1])
        tensors = [_open_one(te, dev) for te in export.tensors]
        _opened[export.owner_key] = (export, tensors)
        return list(tensors)


def _open_one(te: TensorExport, dev: torch.device) -> torch.Tensor:
    assert dev.index is not None
    if te.device != dev.index and not torch.cuda.can_device_access_peer(dev.index, te.device):
        raise RuntimeError(f"cuda:{dev.index} has no peer access to cuda:{te.device}: cannot map its memory")
    dtype = getattr(torch, te.dtype)
    with torch.cuda.device(dev):
        storage = torch.UntypedStorage._new_shared_cuda(
            dev.index,
            te.handle,
            te.storage_size_bytes,
            te.storage_offset_bytes,
            te.ref_counter_handle,
            te.ref_counter_offset,
            te.event_handle,
            te.event_sync_required,
        )
        t = torch.empty(0, dtype=dtype, device=dev)
        t.set_(storage, te.storage_offset, te.shape, te.stride)
    return t


def close_peer(owner_key: str) -> bool:
    """Drop the mappings of ``owner_key`` (False if none were open). Synchronizes their
    device first: a kernel still writing through a mapping must finish before it closes."""
    with _lock:
        cached = _opened.pop(owner_key, None)
    if cached is None:
        return False
    for t in cached[1]:
        torch.cuda.synchronize(t.device)
    return True


def open_peer_keys() -> list[str]:
    with _lock:
        return sorted(_opened)


# --------------------------------------------------------------------------- host memory


def register_host(addr: int, nbytes: int) -> int:
    """Page-lock and map ``[addr, addr + nbytes)`` for every device; returns the address
    kernels use for it (checked with cuMemHostGetDevicePointer where the driver library is
    reachable; under UVA it equals ``addr``)."""
    if addr <= 0:
        raise ValueError(f"addr must be a non-null host address, got {addr:#x}")
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0, got {nbytes}")
    torch.cuda.init()
    err = torch.cuda.cudart().cudaHostRegister(addr, nbytes, _HOST_REGISTER_FLAGS)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister({addr:#x}, {nbytes}) failed with CUDA error {int(err)}")
    dptr = _device_pointer(addr)
    return addr if dptr is None else dptr


def unregister_host(addr: int) -> None:
    err = torch.cuda.cudart().cudaHostUnregister(addr)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostUnregister({addr:#x}) failed with CUDA error {int(err)}")


def _device_pointer(addr: int) -> int | None:
    """cuMemHostGetDevicePointer through the driver library (loaded by any CUDA process);
    None where the driver cannot be reached, and the UVA identity is assumed."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        fn = libcuda.cuMemHostGetDevicePointer_v2
    except (OSError, AttributeError):
        return None
    torch.cuda.current_stream().query()  # makes torch's primary context current on this thread
    dptr = ctypes.c_uint64(0)
    res = fn(ctypes.byref(dptr), ctypes.c_void_p(addr), ctypes.c_uint(0))
    if res != 0:
        raise RuntimeError(f"cuMemHostGetDevicePointer({addr:#x}) failed with CUresult {res}")
    return int(dptr.value)
