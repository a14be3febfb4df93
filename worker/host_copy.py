"""Host <-> device copies that never stall the host on the GPU's queue.

`torch.tensor(values, device="cuda")` and `.to("cpu")` of a device tensor copy through pageable
memory and synchronize the stream: the host waits until every kernel queued before them ran. The
overlapped engine (worker/overlap.py) queues step N+1 while step N runs, so its per-step copies go
through pinned memory with non_blocking=True instead: a host-to-device copy is then ordered on the
stream like a kernel, and a device-to-host copy is waited for only through its event, when (and
if) the host needs the values. On the CPU both are plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """values as a 1-D tensor on `device`; on a GPU staged in pinned memory and copied non-blocking
    (the caching host allocator keeps the staging block until the copy has read it)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class PendingCopy:
    """Device tensors being copied to the host: `wait()` returns the host tensors, in order.

    On a GPU the copies go to pinned tensors with non_blocking=True and an event is recorded after
    them; `wait()` synchronizes on that event alone (not the device, not later work)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, d in zip(self._host, tensors, strict=True):
                h.copy_(d, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = [t.to("cpu") for t in tensors]

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
