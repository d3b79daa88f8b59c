"""Connection threads for the API server, reused (see ``Workers``)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Workers:
    """Connection threads, reused. ``Thread.start`` waits until the new thread runs, which
    cost the accept loop ~0.4 ms a connection; under a flood of reconnects that became a
    listen backlog every new client waited in. So the accept loop only queues the
    connection: an idle worker takes it, and when none is idle a spawner thread (not the
    accept loop) starts one. At most ``IDLE_MAX`` wait idle; the others end."""

    IDLE_MAX = 64

    def __init__(self, run: Callable[[Any, Any], None]) -> None:
        self._run = run
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._spawns: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._closed = False
        threading.Thread(target=self._spawner, name="mcp-conn-spawner", daemon=True).start()

    def submit(self, request: Any, client_address: Any) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._queue.put((request, client_address))
        if spawn:
            self._spawns.put(True)

    def _spawner(self) -> None:
        while self._spawns.get():
            threading.Thread(target=self._work, name="mcp-conn", daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)
            with self._lock:
                if self._closed or self._idle >= self.IDLE_MAX:
                    return
                self._idle += 1

    def close(self) -> None:
        """End the spawner and the idle workers (busy ones end with their connection)."""
        self._spawns.put(False)
        with self._lock:
            self._closed = True
            n, self._idle = self._idle, 0
        for _ in range(n):
            self._queue.put(None)
