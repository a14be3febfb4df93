"""KV block transports: how a producer (prefill worker) writes into a consumer's (decode
worker's) KV pool and publishes completion in the consumer's mailbox.

    kind        consumer's pool lives in            producer copies with                publishes with
    cuda_ipc    its GPU; exported by CUDA IPC      one Triton launch, many CTAs          the last CTA's st.release.sys
                handles, opened once per peer      (memory_model.gpu_copy)               into the mapped mailbox
    shm         shared host memory (CPU workers)   torch index copies on the host        libatomic release store
    relay       anywhere (another node, GPUs       gathers the blocks to host memory     the consumer, after it wrote
                without peer access)               and sends them through Ray            them: the same mailbox word

`relay` is chosen automatically when the consumer is on another node (shared memory and CUDA
IPC only work within one), or always with EngineConfig.kv_transport="relay". Its data path has
host round trips by construction; its protocol and failure semantics are the others': the
consumer applies a delivery only while the use it was meant for is still pending with the
same value, so a delivery after a give-up, a restart or a producer's death writes nothing.

The consumer describes itself once per incarnation with a `PeerDescriptor` (plain data: it
crosses Ray); producers `connect` to it (opening handles and mappings once, cached) and
`send` per request. A consumer restart changes the descriptor's key and epoch, so handles of
the old incarnation are never reused: the pool tells producers to `disconnect` it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .mailbox import MailboxWriter, Payload, Status
from .shm import SharedRegion

if TYPE_CHECKING:  # gpu_copy imports Triton: only where a GPU sends
    from .gpu_copy import BlockCopier

log = logging.getLogger("kvrelay")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def node_id() -> str:
    """This host: shared memory and CUDA IPC only work between processes of one node."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class PoolLayout:
    """Shape of one layer tensor: [2, num_blocks, block_size, num_kv_heads, head_dim]."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def layer_shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_bytes(self) -> int:
        return int(np.prod(self.layer_shape)) * torch.empty((), dtype=_DTYPES[self.dtype]).element_size()

    def compatible(self, other: PoolLayout) -> bool:
        """Same block geometry (the block counts of the two pools may differ)."""
        return (self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype) == (
            other.num_layers,
            other.block_size,
            other.num_kv_heads,
            other.head_dim,
            other.dtype,
        )


@dataclass(frozen=True)
class PeerDescriptor:
    key: str  # unique per consumer incarnation: "<rank>:<incarnation>"
    epoch: int  # the consumer's mailbox epoch (high 32 bits of every value it expects)
    mailbox: str  # shared memory name of the mailbox
    num_slots: int
    layout: PoolLayout
    kind: str  # "shm" or "cuda_ipc"
    node: str  # node_id() of the consumer
    shm_name: str | None = None  # kind == "shm": the pool's region
    ipc: Any = None  # kind == "cuda_ipc": memory_model.ipc.IpcExport of the layer tensors


def allocate_shared_pool(layout: PoolLayout) -> tuple[list[torch.Tensor], SharedRegion]:
    """CPU pool tensors carved out of one shared region (zeroed, like `KVCacheSpec.allocate`)."""
    region = SharedRegion.create("kvrelay-kv", layout.num_layers * layout.layer_bytes)
    return layer_views(region, layout), region


def layer_views(region: SharedRegion, layout: PoolLayout) -> list[torch.Tensor]:
    """The pool's layer tensors over a shared region: layer i at byte i * layer_bytes."""
    dtype, nbytes = _DTYPES[layout.dtype], layout.layer_bytes
    return [
        torch.frombuffer(region.array[i * nbytes : (i + 1) * nbytes], dtype=dtype).view(layout.layer_shape)
        for i in range(layout.num_layers)
    ]


class _Peer:
    def __init__(self, desc: PeerDescriptor, device: torch.device) -> None:
        self.desc = desc
        self.mailbox = MailboxWriter(desc.mailbox, desc.num_slots)
        self.region: SharedRegion | None = None
        self.dst: list[torch.Tensor] = []
        self.dst_table: torch.Tensor | None = None
        self.copier: BlockCopier | None = None  # made by the sender at its first GPU send
        self.signal_base = 0  # device-usable address of the mailbox (GPU producers)
        if desc.kind == "shm":
            assert desc.shm_name is not None
            self.region = SharedRegion(
                desc.shm_name, desc.layout.num_layers * desc.layout.layer_bytes, create=False
            )
            self.dst = layer_views(self.region, desc.layout)
        elif desc.kind == "cuda_ipc":
            from . import gpu_copy, ipc

            self.dst = ipc.open_tensors(desc.ipc)
            self.dst_table = gpu_copy.build_layer_table(self.dst, device)
            self.signal_base = ipc.register_host(self.mailbox.region.address, self.mailbox.region.nbytes)
        else:
            raise ValueError(f"unknown KV transport kind {desc.kind!r}")

    def close(self) -> None:
        if self.desc.kind == "cuda_ipc":
            from . import ipc

            ipc.unregister_host(self.mailbox.region.address)
            ipc.close_peer(self.desc.ipc.owner_key)
        self.dst = []
        self.dst_table = None
        self.copier = None
        self.mailbox.close()
        if self.region is not None:
            self.region.close()


# relay(slot, expected, dst_block_ids, blocks, payload): hands the gathered blocks (one CPU
# tensor per layer, [2, n, block_size, kv_heads, head_dim]) to the consumer; does not wait.
Relay = Callable[[int, int, list[int], list[torch.Tensor], Payload], None]


class KVSender:
    """Producer side: writes a request's KV blocks into a connected consumer and publishes."""

    def __init__(
        self, src_layers: Sequence[torch.Tensor], layout: PoolLayout, *, force_relay: bool = False
    ) -> None:
        self.src = list(src_layers)
        self.layout = layout
        self.force_relay = force_relay
        self._relays: dict[str, Relay] = {}
        self.device = self.src[0].device
        self._peers: dict[str, _Peer] = {}
        self._counter: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._counter = torch.zeros(1, dtype=torch.int32, device=self.device)

    def connect(self, desc: PeerDescriptor, relay: Relay | None = None) -> None:
        """Open the consumer's pool and mailbox, or, across nodes (or when forced), remember how
        to relay to it."""
        if desc.key in self._peers or desc.key in self._relays:
            return
        if not self.layout.compatible(desc.layout):
            raise ValueError(f"KV layout of peer {desc.key} {desc.layout} does not match ours {self.layout}")
        if self.force_relay or desc.node != node_id():
            if relay is None:
                raise ValueError(f"peer {desc.key} is on another node ({desc.node}) and no relay was given")
            self._relays[desc.key] = relay
            log.info("KV transport: relaying to %s through the host", desc.key)
            return
        want = "cuda_ipc" if self.device.type == "cuda" else "shm"
        if desc.kind != want:
            raise ValueError(
                f"peer {desc.key} offers {desc.kind}; a {self.device.type} producer needs {want}"
            )
        self._peers[desc.key] = _Peer(desc, self.device)
        log.info("KV transport: connected to %s (%s, %d layers)", desc.key, desc.kind, desc.layout.num_layers)

    def disconnect(self, key: str) -> None:
        self._relays.pop(key, None)
        peer = self._peers.pop(key, None)
        if peer is not None:
            peer.close()

    def connected(self, key: str) -> bool:
        return key in self._peers or key in self._relays

    def send(
        self,
        key: str,
        slot: int,
        expected: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        payload: Payload,
    ) -> bool:
        """Copy the blocks and publish `expected` in the peer's slot; False when the consumer had
        already aborted this use (then nothing is copied and an ABORTED acknowledgement is
        published instead). Returns once the copy is launched (GPU) or done (CPU)."""
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(
                f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks"
            )
        relay = self._relays.get(key)
        if relay is not None:
            ids = torch.tensor(list(src_block_ids), dtype=torch.long, device=self.device)
            blocks = [src.index_select(1, ids).cpu() for src in self.src]  # [2, n, bs, H, D] each
            relay(slot, expected, list(dst_block_ids), blocks, payload)
            return True
        peer = self._peers.get(key)
        if peer is None:
            raise KeyError(f"KV transport: not connected to {key}")
        if peer.mailbox.abort_requested(slot, expected):
            peer.mailbox.write_payload(slot, Payload(Status.ABORTED))
            peer.mailbox.publish(slot, expected)
            return False
        peer.mailbox.write_payload(slot, payload)
        if self.device.type == "cuda":
            self._send_gpu(peer, slot, expected, src_block_ids, dst_block_ids)
        else:
            if src_block_ids:
                src_ids = torch.tensor(src_block_ids, dtype=torch.long)
                dst_ids = torch.tensor(dst_block_ids, dtype=torch.long)
                for src, dst in zip(self.src, peer.dst, strict=True):
                    dst.index_copy_(1, dst_ids, src.index_select(1, src_ids))
            peer.mailbox.publish(slot, expected)
        return True

    def _send_gpu(
        self,
        peer: _Peer,
        slot: int,
        expected: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        from . import gpu_copy

        signal = peer.signal_base + peer.mailbox.signal_address(slot) - peer.mailbox.region.address
        if not src_block_ids:
            gpu_copy.publish_signal(signal, expected)
            return
        # Both id lists in one pinned buffer (torch's caching host allocator keeps it alive
        # until the copy has run) and one host-to-device copy.
        ids = torch.tensor([*src_block_ids, *dst_block_ids], dtype=torch.int32).pin_memory()
        ids = ids.to(self.device, non_blocking=True)
        n = len(src_block_ids)
        if peer.copier is None:
            assert peer.dst_table is not None and self._counter is not None
            peer.copier = gpu_copy.BlockCopier(
                self.src, peer.dst_table, dst_num_blocks=peer.desc.layout.num_blocks, counter=self._counter
            )
        peer.copier(ids[:n], ids[n:], signal, expected)

    def close(self) -> None:
        for key in [*self._peers, *self._relays]:
            self.disconnect(key)
