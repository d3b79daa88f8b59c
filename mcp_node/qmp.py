"""A small synchronous QMP client: one unix-socket connection per call.

QMP is JSON lines: the server greets, the client sends ``qmp_capabilities``, then a
command; events (``{"event": ...}``) may come in between and are skipped; the answer
is ``{"return": ...}`` or ``{"error": {"class", "desc"}}``. A plain blocking socket
with a deadline does all of that in about a millisecond, with no event loop and no
import cost (the runtime talks QMP on every stop and start). Calls to one socket are
serialised (QEMU serves one QMP client at a time and queues the rest). Unix socket
paths are limited to 108 bytes, and VM state directories can be deeper than that, so
the socket is reached through ``/proc/self/fd/<dirfd>/<name>``, which is always short.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import WorkloadError

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
MAX_LINE = 1 << 20


class QMPError(WorkloadError):
    """QMP unreachable, timed out or refused the command (a runtime failure: 502)."""


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.Lock())


class _Conn:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def _recv_line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise QMPError("answer line too long")
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QMPError(f"unexpected QMP message {line[:200]!r}")
        return msg

    def call(self, command: str, args: dict[str, Any] | None) -> Any:
        req: dict[str, Any] = {"execute": command}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._recv_line()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QMPError(f"{command}: {err.get('class', 'Error')}: {err.get('desc', '')}")
            # an event ({"event": ...}): not ours to answer


def execute(socket_path: Path, command: str, args: dict[str, Any] | None = None,
            timeout: float = 3.0) -> Any:
    """Run one QMP command against the unix socket ``socket_path``; QMPError on any failure."""
    log.debug("qmp %s: %s %s", socket_path, command, args or "")
    with _lock_for(socket_path):
        try:
            dirfd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            raise QMPError(f"QMP socket {socket_path}: {exc}") from exc
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                conn = _Conn(s, time.monotonic() + timeout)
                s.settimeout(timeout)
                s.connect(f"/proc/self/fd/{dirfd}/{socket_path.name}")
                greeting = conn._recv_line()
                if "QMP" not in greeting:
                    raise QMPError(f"not a QMP greeting: {str(greeting)[:200]}")
                conn.call("qmp_capabilities", None)
                return conn.call(command, args)
        except (OSError, EOFError, ValueError) as exc:
            raise QMPError(f"QMP {command} on {socket_path}: {exc or type(exc).__name__}"
                           ) from exc
        finally:
            os.close(dirfd)
