"""A ``tcp`` check of a VM: did the guest accept the connection, not QEMU's forwarder?

With ``-netdev user,hostfwd=...`` QEMU's slirp accepts the host connection itself and
only then connects to the guest, so a plain connect succeeds while the guest still
boots or listens on nothing. After connecting from 127.0.0.1, this finds QEMU's end of
that connection (the socket in ``/proc/net/tcp`` whose peer is our source port, and the
qemu fd that holds it) and asks QEMU over QMP (``info usernet``) for the state of
slirp's connection on that fd: ESTABLISHED, or a later state, means the guest answered
the SYN; SYN_SENT or no row means it has not. ``info usernet`` shows the hostfwd
address as the source of every forwarded connection (QEMU 7.2, measured here), never
our port, so the fd is what tells our connection from a client's.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import qmp
from .readiness import why_failed

POLL_S = 0.05   # between two looks at slirp's state while the guest has not answered
RETRY_S = 0.5   # a connection the guest has not answered by then is made again
ACCEPTED = frozenset({"ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSING",
                      "LAST_ACK", "TIME_WAIT"})
_ROW = re.compile(r"^\s*(TCP|UDP)\[([A-Z_0-9]+)\]\s+(-?\d+)\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)"
                  r"\s+(\d+)\s+(\d+)\s*$")
_LOOPBACK = "0100007F"   # 127.0.0.1 as /proc/net/tcp spells it (host byte order, x86)


@dataclass(frozen=True)
class UsernetRow:
    proto: str
    state: str
    fd: int
    src: str
    src_port: int
    dst: str
    dst_port: int


def parse_usernet(text: str) -> list[UsernetRow]:
    """The connection rows of ``info usernet`` (headers and hub lines skipped)."""
    out = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            out.append(UsernetRow(m[1], m[2], int(m[3]), m[4], int(m[5]), m[6], int(m[7])))
    return out


def server_inode(tcp_table: str, port: int, peer_port: int) -> int:
    """The inode of the socket at 127.0.0.1:``port`` connected to 127.0.0.1:``peer_port``
    in a ``/proc/net/tcp`` text; 0 when there is none or it is not accepted yet."""
    want_local, want_peer = f"{_LOOPBACK}:{port:04X}", f"{_LOOPBACK}:{peer_port:04X}"
    for line in tcp_table.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[1] == want_local and f[2] == want_peer:
            return int(f[9])
    return 0


def fd_holding(pid: int, inode: int) -> int | None:
    """Which of process ``pid``'s fds is socket ``inode``."""
    want = f"socket:[{inode}]"
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == want:
                return int(name)
        except (OSError, ValueError):
            continue
    return None


def _peek(sock: socket.socket) -> str:
    """"open", "closed" (EOF or reset) or "data" (the guest already spoke)."""
    try:
        return "data" if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else "closed"
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"


def slirp_state(qmp_socket: Path, fd: int, timeout: float) -> str:
    """slirp's TCP state of the connection on qemu's ``fd`` ("" when it has no row)."""
    text = qmp.execute(qmp_socket, "human-monitor-command",
                       {"command-line": "info usernet"}, timeout=timeout)
    return next((r.state for r in parse_usernet(str(text)) if r.fd == fd and
                 r.proto == "TCP"), "")


def guest_accepts(qmp_socket: Path, pid: int, port: int, timeout: float) -> str:
    """"" when the guest of qemu ``pid`` accepts a connection to host ``port`` within
    ``timeout`` seconds, else why not. A connection still unanswered after
    ``RETRY_S`` is given up for a new one: slirp sends a new one's SYN at once, where
    it would retransmit an old one's (lost while the guest booted) seconds later."""
    deadline = time.monotonic() + timeout
    while True:
        why, final = _one_try(qmp_socket, pid, port, timeout, deadline)
        if final or time.monotonic() >= deadline:
            return why


def _one_try(qmp_socket: Path, pid: int, port: int, timeout: float,
             deadline: float) -> tuple[str, bool]:
    """(why not, or "", whether that is the answer) of one connection."""
    try:
        sock = socket.create_connection(("127.0.0.1", port),
                                        timeout=max(deadline - time.monotonic(), 0.1))
    except OSError as exc:
        return why_failed(exc, timeout), True
    with sock:
        sock.setblocking(False)   # a peek must not wait (with a timeout it would)
        ours, state = sock.getsockname()[1], ""
        give_up = min(deadline, time.monotonic() + RETRY_S)
        while True:
            inode = server_inode(Path("/proc/net/tcp").read_text(), port, ours)
            fd = fd_holding(pid, inode) if inode else None
            if fd is not None:
                try:
                    state = slirp_state(qmp_socket, fd, max(deadline - time.monotonic(), 0.1))
                except qmp.QMPError as exc:
                    return f"QMP: {exc}"[:120], True
                if state in ACCEPTED:
                    return "", True
            seen = _peek(sock)
            if seen == "data":
                return "", True
            if seen == "closed":
                return "closed before the guest accepted", True
            if time.monotonic() >= give_up:
                return f"guest did not accept in {timeout:g} s ({state or 'not forwarded'})", \
                    False
            time.sleep(POLL_S)
