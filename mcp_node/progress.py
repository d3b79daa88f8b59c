"""What the agent is doing now to each component of a service, for ``mcp`` to show.

A deploy or a stop can take long (a pull, a slow stop, a VM build), and the
CLI waits on one HTTP call meanwhile. The agent notes each component's step
here, in memory only (nothing to persist: it describes a call in flight), and
``GET /v1/services/{name}/progress`` reads it, so a terminal can print each
component's step as it changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    """The operation in flight on each service (one at a time: the service lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, tuple[str, float, dict[str, str]]] = {}

    @contextmanager
    def operation(self, service: str, verb: str) -> Iterator[None]:
        """While the block runs, ``service`` is being ``verb``-ed (e.g. "deploy")."""
        with self._lock:
            self._ops[service] = (verb, time.monotonic(), {})
        try:
            yield
        finally:
            with self._lock:
                self._ops.pop(service, None)

    def step(self, service: str, component: str, what: str) -> None:
        """``component`` of ``service`` is now doing ``what`` (outside an operation: no-op)."""
        with self._lock:
            op = self._ops.get(service)
            if op is not None:
                op[2][component] = what

    def of(self, service: str) -> dict[str, Any]:
        """The API's shape: the operation (None when idle), seconds so far, steps."""
        with self._lock:
            op = self._ops.get(service)
            if op is None:
                return {"service": service, "operation": None, "elapsed_s": 0.0,
                        "components": {}}
            verb, started, steps = op
            return {"service": service, "operation": verb,
                    "elapsed_s": round(time.monotonic() - started, 3),
                    "components": dict(steps)}
