"""Named shared host memory (POSIX shm under /dev/shm), mapped by several worker processes.

Not `multiprocessing.shared_memory`: before Python 3.13 every process that opens a segment
registers it with its resource tracker, which unlinks it when *that* process exits, so a
prefill worker's exit would delete a decode worker's live mailbox. Here only the creator
unlinks, explicitly, and a crashed creator's segments carry its pid in their name so an
operator can tell them apart.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")


class SharedRegion:
    """A mapped region of `nbytes`; `create=True` makes a fresh, zeroed, uniquely named one."""

    def __init__(self, name: str, nbytes: int, *, create: bool) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        if "/" in name or not name:
            raise ValueError(f"shared memory name must be a plain file name, got {name!r}")
        self.name = name
        self.nbytes = nbytes
        self.owner = create
        path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            elif os.fstat(fd).st_size < nbytes:
                raise ValueError(
                    f"shared memory {name!r} holds {os.fstat(fd).st_size} bytes, expected {nbytes}"
                )
            self._mmap: mmap.mmap | None = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        # One exported view; everything else slices it (so close() has one export to drop).
        self._words: np.ndarray | None = np.frombuffer(self._mmap, dtype=np.uint8)

    @classmethod
    def create(cls, prefix: str, nbytes: int) -> SharedRegion:
        return cls(f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}", nbytes, create=True)

    @property
    def address(self) -> int:
        """Host virtual address of byte 0 in this process (page aligned)."""
        return int(self.array.ctypes.data)

    @property
    def array(self) -> np.ndarray:
        if self._words is None:
            raise RuntimeError(f"shared memory {self.name!r} is closed")
        return self._words

    def view(self, dtype: np.dtype | type, offset: int, count: int) -> np.ndarray:
        return self.array[offset : offset + count * np.dtype(dtype).itemsize].view(dtype)

    def close(self) -> None:
        """Unmap (and unlink, for the creator). Views handed out must be dropped first; a view
        still alive keeps the mapping until it is garbage collected."""
        self._words = None
        if self._mmap is not None:
            # A torch/numpy view still alive keeps the mapping; it dies with the view.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        if self.owner:
            self.owner = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self.name)

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
