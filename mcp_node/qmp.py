"""QMP for the qemu runtime: one call, one connection, through ``qemu.qmp``'s
synchronous ``QEMUMonitorProtocol`` (the one QMP client the runtime uses).

What this wrapper adds to the library:

- a deadline over the whole call: the library's ``connect`` (greeting and
  ``qmp_capabilities``) has none, so a timer on the call's own event loop shuts the
  socket down when the deadline passes, which ends any read in progress;
- an event loop per call, closed after it (the library would otherwise leave one
  behind in every agent thread that ever spoke QMP);
- calls to one socket serialised (QEMU serves one QMP client at a time and queues the
  rest);
- the socket reached through ``/proc/self/fd/<dirfd>/<name>``: unix socket paths are
  limited to 108 bytes and VM state directories can be deeper;
- every failure a ``QMPError`` (502) that keeps the library's exception as its cause;
  the library's own log lines about the same failure are kept below ERROR, since the
  caller logs the QMPError once.

qemu.qmp because the design names it for QMP. It costs more than the plain-socket
client it replaced (bench/qmp_calls.py; README, deviations): the first call of a
process loads asyncio and qemu.qmp (+12.6 ms, +1.2 MB; a node without VMs never pays
it), and each call is ~1.1 ms dearer (1.6 against 0.5 ms).
"""

from __future__ import annotations

import contextlib
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


class QMPError(WorkloadError):
    """QMP unreachable, timed out or refused the command (a runtime failure: 502)."""


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.Lock())


def _connected(socket_path: Path, timeout: float) -> socket.socket:
    """A unix socket connected to ``socket_path`` however deep it lies."""
    try:
        dirfd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise QMPError(f"QMP socket {socket_path}: {exc}") from exc
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(f"/proc/self/fd/{dirfd}/{socket_path.name}")
    except OSError as exc:
        s.close()
        raise QMPError(f"QMP socket {socket_path}: {exc}") from exc
    finally:
        os.close(dirfd)
    s.setblocking(False)   # asyncio's streams take it over
    return s


def _quiet_library() -> None:
    """The library logs a failed greeting or negotiation at ERROR; the QMPError that
    follows carries the same cause and is logged by the caller."""
    lib = logging.getLogger("qemu.qmp")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.CRITICAL)


def execute(socket_path: Path, command: str, args: dict[str, Any] | None = None,
            timeout: float = 3.0) -> Any:
    """Run one QMP command against the unix socket ``socket_path`` within ``timeout``
    seconds; its ``return`` value, or QMPError on any failure."""
    log.debug("qmp %s: %s %s", socket_path, command, args or "")
    with _lock_for(socket_path):
        return _call(socket_path, command, args or {}, timeout)


HALTED = ("prelaunch", "paused")   # run states a ``cont`` lets run


def stopped(status: str) -> bool:
    """A run state was read and it is not "running" (the guest's CPUs do not run)."""
    return bool(status) and status != "running" and not status.startswith("unreachable")


def run_state(socket_path: Path) -> str:
    """``query-status``'s run state ("running", "prelaunch", "paused", "internal-error"
    ...), or "unreachable: why"."""
    try:
        return str(execute(socket_path, "query-status").get("status", ""))
    except (QMPError, AttributeError) as exc:
        return f"unreachable: {exc}"


def _call(socket_path: Path, command: str, args: dict[str, Any], timeout: float) -> Any:
    import asyncio

    from qemu.qmp import ExecuteError
    from qemu.qmp import QMPError as LibQMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    _quiet_library()
    deadline = time.monotonic() + timeout
    sock = _connected(socket_path, timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)   # QEMUMonitorProtocol runs on the thread's loop
    timer = loop.call_later(timeout, expire)
    mon = None
    try:
        mon = QEMUMonitorProtocol(sock, nickname=socket_path.parent.name)
        try:
            mon.connect()
            mon.settimeout(max(deadline - time.monotonic(), 0.001))
            return mon.cmd(command, **args)
        except ExecuteError as exc:
            raise QMPError(f"{command}: {exc.error_class}: {exc}") from exc
        except (LibQMPError, OSError, EOFError, TimeoutError) as exc:
            why = "no answer in time" if expired.is_set() or isinstance(
                exc, TimeoutError) else (str(exc) or type(exc).__name__)
            raise QMPError(f"QMP {command} on {socket_path}: {why}") from exc
    finally:
        if mon is not None:   # under the deadline too: the timer is still armed
            with contextlib.suppress(LibQMPError, OSError, EOFError, TimeoutError):
                mon.close()   # a reader that died (EOF, our shutdown) is reported here
        timer.cancel()
        sock.close()
        asyncio.set_event_loop(None)
        loop.close()
