"""A small synchronous QMP client on top of ``qemu.qmp``.

Each call runs its own short-lived asyncio loop, so any agent thread may call
it; calls to one socket are serialised (QEMU serves one QMP client at a time
and queues the rest). Unix socket paths are limited to 108 bytes, and VM
state directories can be deeper than that, so the socket is reached through
``/proc/self/fd/<dirfd>/<name>``, which is always short. asyncio and qemu.qmp
are imported on the first call: an agent with no VM never pays their memory.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class QMPError(Exception):
    """QMP unreachable, timed out or refused the command."""


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.Lock())


async def _call(address: str, command: str, args: dict[str, Any] | None,
                timeout: float) -> Any:
    import asyncio

    from qemu.qmp import QMPClient

    client = QMPClient("mcp-node")
    try:
        await asyncio.wait_for(client.connect(address), timeout)
        return await asyncio.wait_for(client.execute(command, args), timeout)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout)
        except Exception:  # noqa: BLE001 - closing a dead peer; nothing to report
            log.debug("qmp: disconnect from %s failed", address)


def execute(socket: Path, command: str, args: dict[str, Any] | None = None,
            timeout: float = 3.0) -> Any:
    """Run one QMP command against the unix socket ``socket``; QMPError on any failure."""
    import asyncio

    from qemu.qmp.error import QMPError as _LibQMPError

    log.debug("qmp %s: %s %s", socket, command, args or "")
    with _lock_for(socket):
        try:
            dirfd = os.open(socket.parent, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            raise QMPError(f"QMP socket {socket}: {exc}") from exc
        try:
            address = f"/proc/self/fd/{dirfd}/{socket.name}"
            return asyncio.run(_call(address, command, args, timeout))
        except (OSError, _LibQMPError, TimeoutError, EOFError) as exc:
            raise QMPError(f"QMP {command} on {socket}: {exc or type(exc).__name__}") from exc
        finally:
            os.close(dirfd)
