"""systemd's notify protocol (sd_notify(3)), a datagram on ``$NOTIFY_SOCKET``.

A few lines instead of a dependency: ``READY=1`` once the agent listens and
its first reconcile round is done (``Type=notify``), ``WATCHDOG=1`` after
each monitor round when the unit sets ``WatchdogSec``, ``RELOADING=1`` /
``STOPPING=1`` around SIGHUP and SIGTERM. Without ``$NOTIFY_SOCKET`` (not
run by systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mcp_node.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); False when there is no socket or sending failed.

    A failure is logged, never raised: systemd missing a message must not stop the agent.
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.warning("notify ignored: NOTIFY_SOCKET=%r is not a unix socket path", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("notify failed socket=%s state=%s: %s", addr.lstrip("\0"),
                    state.replace("\n", ","), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half of ``WatchdogSec``), or None.

    ``$WATCHDOG_PID``, when set, must be this process (a child must not ping for us).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2
