"""Per-host request slots shared by every download worker process on one machine.

``max_per_host`` bounds the requests in flight to one host from the whole machine, not from each
worker: while two workers download, they share a host's slots first come, first served; when
one worker is done, the other may use all of them (so the last shard of a run is not held to a
fraction of the cap while the rest of the machine is idle).

The table is a small file in shared memory (``/dev/shm``, else the temp dir), one row of
int16 counters per process and one column per host bucket (``crc32(host) % BUCKETS``; two
hosts in one bucket share a cap, which only ever makes us more polite). A process owns its row
while it holds a POSIX record lock on that row's byte of a lock file, so the OS frees the row
when the process dies, even by ``kill -9``; the next process that looks zeroes a dead row.
Taking a slot sums the bucket's column under one machine-wide record lock and adds one to the
caller's own row; giving it back subtracts one. Both are a few microseconds.

``CLIPCURATE_HOST_SLOTS`` names another table file (tests use a private one).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
import threading
import time
import zlib

import numpy as np

ROWS = 128  # processes on one machine that can share (more fall back to a cap of their own)
BUCKETS = 8192
_SIZE = ROWS * BUCKETS * 2
_GLOBAL = ROWS  # byte of the lock file that serialises check-and-take
_SWEEP_EVERY = 2.0  # seconds between looks for rows of dead processes while a cap binds


def default_path() -> str:
    env = os.environ.get("CLIPCURATE_HOST_SLOTS")
    if env:
        return env
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"clipcurate-hostslots-{os.getuid()}")


class HostSlots:
    """This process's view of the machine's table (``for_process`` gives the one per path and pid)."""

    _cache: dict[tuple[str, int], HostSlots | None] = {}
    _cache_lock = threading.Lock()

    @classmethod
    def for_process(cls, path: str | None = None) -> HostSlots | None:
        """The shared table, or None where it cannot be set up (then each worker caps alone)."""
        path = path or default_path()
        key = (path, os.getpid())
        with cls._cache_lock:
            if key not in cls._cache:
                try:
                    cls._cache[key] = cls(path)
                except (OSError, ValueError):
                    cls._cache[key] = None
            return cls._cache[key]

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.table = np.frombuffer(self._map, dtype=np.int16).reshape(ROWS, BUCKETS)
        # One descriptor for every record lock: closing any descriptor of the file would drop them all.
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._mutex = threading.Lock()
        self._last_sweep = 0.0
        self.row = -1
        self._claim_row()

    def _try_lock(self, byte: int) -> bool:
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            return True
        except OSError:
            return False

    def _claim_row(self) -> int:
        with self._global():
            for r in range(ROWS):
                if self._try_lock(r):  # free: its owner (if any) is gone
                    self.table[r, :] = 0
                    self.row = r
                    self._sweep()
                    return r
        raise ValueError(f"all {ROWS} rows of {self.path} are taken")

    def _sweep(self) -> None:
        """Zero the rows of dead processes (caller holds the machine-wide lock)."""
        self._last_sweep = time.monotonic()
        for r in np.flatnonzero(self.table.any(axis=1)):
            r = int(r)
            if r != self.row and self._try_lock(r):
                self.table[r, :] = 0
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, r)

    class _Held:
        def __init__(self, slots: HostSlots):
            self.slots = slots

        def __enter__(self):
            fcntl.lockf(self.slots._lock_fd, fcntl.LOCK_EX, 1, _GLOBAL)

        def __exit__(self, *exc):
            fcntl.lockf(self.slots._lock_fd, fcntl.LOCK_UN, 1, _GLOBAL)

    def _global(self) -> HostSlots._Held:
        return HostSlots._Held(self)

    @staticmethod
    def bucket(host: str) -> int:
        return zlib.crc32(host.encode()) % BUCKETS

    def in_flight(self, host: str) -> int:
        """Requests in flight to ``host``'s bucket from the whole machine."""
        return int(self.table[:, self.bucket(host)].sum())

    def try_take(self, host: str, cap: int) -> bool:
        """Take one of ``host``'s ``cap`` machine-wide slots; False when all are in use."""
        b = self.bucket(host)
        with self._mutex, self._global():
            if int(self.table[:, b].sum()) >= cap:
                if time.monotonic() - self._last_sweep < _SWEEP_EVERY:
                    return False
                self._sweep()
                if int(self.table[:, b].sum()) >= cap:
                    return False
            self.table[self.row, b] += 1
            return True

    def give(self, host: str) -> None:
        """Give back a slot taken by ``try_take``."""
        b = self.bucket(host)
        with self._mutex:
            if self.table[self.row, b] > 0:
                self.table[self.row, b] -= 1
