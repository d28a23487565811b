"""`limits.max_connections` held exactly, by one server process or summed over every `server.workers` process.

With several workers on one port the kernel, not the server, chooses who takes a connection
(SO_REUSEPORT hashes the peer's address), so a per-worker share of the limit refuses clients
while other workers sit below theirs. `SharedConnectionSlots` keeps every worker's count in one
small file, mapped by each: a connection is taken under an exclusive `flock` on it (the check and
the increment together, microseconds), so the sum never passes the limit and never refuses below
it. Each worker writes only its own count, and the parent zeroes the count of a worker that died
(its connections went with it) before it starts the next one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_COUNT_BYTES = 8  # one int64 per worker


class ConnectionSlots:
    """The connections one server process holds, against `limit` (alone: its own count)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._counts: list[int] | memoryview = [0]
        self._index = 0

    @contextmanager
    def _locked(self) -> Iterator[None]:
        yield  # one process, one event loop: nothing else changes the count meanwhile

    def acquire(self) -> bool:
        """Take a connection slot; False at the limit."""
        with self._locked():
            if sum(self._counts) >= self.limit:
                return False
            self._counts[self._index] += 1
            return True

    def release(self) -> None:
        """Give back a slot taken by `acquire`."""
        with self._locked():
            self._counts[self._index] -= 1

    @property
    def held(self) -> int:
        """Connections this process holds."""
        return self._counts[self._index]

    def total(self) -> int:
        """Connections held now, by every process that shares the limit."""
        return sum(self._counts)

    def close(self) -> None:
        """Release what the slots hold outside the process."""


class SharedConnectionSlots(ConnectionSlots):
    """Worker `index`'s view of every worker's count in the file at `path` (made by `create`)."""

    def __init__(self, path: Path, index: int, limit: int):
        super().__init__(limit)
        workers = path.stat().st_size // _COUNT_BYTES
        if not 0 <= index < workers:
            raise ValueError(f"worker {index} is not one of the {workers} in {path}")
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 0)
        self._counts = memoryview(self._map).cast("q")
        self._index = index

    @staticmethod
    def create(path: Path, workers: int) -> None:
        """The parent: a file of `workers` zero counts."""
        path.write_bytes(bytes(_COUNT_BYTES * workers))

    @staticmethod
    def reset(path: Path, index: int) -> None:
        """The parent: worker `index` died, and its connections with it."""
        with open(path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(index * _COUNT_BYTES)
            f.write(bytes(_COUNT_BYTES))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # the other workers wait here, for microseconds
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap the counts and close the file."""
        self._counts.release()
        self._map.close()
        os.close(self._fd)
