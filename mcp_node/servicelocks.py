"""The agent's per-service locks: operations on one service are serialised, different
services run in parallel, across threads and across processes sharing a state dir."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .files import flocked, unlink_quietly


class ServiceLocks:
    def __init__(self, directory: Path, exists: Callable[[str], bool]) -> None:
        self.directory = directory
        self.exists = exists   # whether a service is still there after an operation
        self._locks: dict[str, tuple[threading.Lock, int]] = {}   # name -> (lock, users)
        self._guard = threading.Lock()

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)

    @contextmanager
    def hold(self, name: str, wait: bool = True) -> Iterator[bool]:
        """A thread lock inside this process, and a file lock across processes sharing the
        state dir (``mcp --local`` beside a running daemon). ``wait=False`` (reconcile)
        yields False at once, holding nothing, while an operation has the service.
        Neither outlives the name: the lock file of a service that does not exist after
        the operation (never did, or undeployed) is removed while it is still held, and
        the thread lock goes with its last user, so a thousand stops of typos leave nothing.
        """
        with self._guard:
            lock, users = self._locks.get(name) or (threading.Lock(), 0)
            self._locks[name] = (lock, users + 1)
        try:
            if not lock.acquire(blocking=wait):
                yield False
                return
            try:
                path = self.directory / f"service-{name}.lock"
                with flocked(path, wait) as got:
                    try:
                        yield got
                    finally:
                        if got and not self.exists(name):
                            unlink_quietly(path)
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[name]
                if users > 1:
                    self._locks[name] = (lock, users - 1)
                else:
                    del self._locks[name]
