"""The API's wire level, below both the server (``server``: accept, intake, caps) and
one connection's handler (``handler``): the connection record both keep, response
bytes both send, the access log both write, and what a handler needs of its server
(``ServerSide``), so neither imports the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import socket
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .safetext import escape_char

if TYPE_CHECKING:
    from .auth import Token, TokenStore
    from .config import AgentConfig
    from .httpapi import StreamPump
    from .metrics import Metrics
    from .operations import Operations

log = logging.getLogger("mcp_node.server")

SERVER_HEADER = f"mcp-agent/{__version__}"
MAX_LINE = 8192
MAX_HEAD = 64 << 10
_ACCESS_FMT = "http method=%s path=%s status=%d bytes=%d ms=%.2f token=%s peer=%s"

HEAD_END_RE = re.compile(rb"\r?\n\r?\n")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def error_body(code: str, message: str) -> bytes:
    return dumps({"error": {"code": code, "message": message}})


def log_safe(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` and with everything but visible ASCII as ``\\xNN``: what
    a client sends must not put terminal escapes, NUL or fake fields in the log."""
    text = text[:limit]
    if text.isascii() and text.isprintable() and " " not in text and "\\" not in text:
        return text
    return "".join(c if "!" <= c <= "~" and c != "\\" else escape_char(c) for c in text)


def access_line(method: str, target: str, status: int, nbytes: int, ms: float, token: str,
                peer: str, level: int = logging.INFO) -> None:
    """One access line per request. makeRecord + handle instead of log.info: skips the
    caller lookup (stack walk), which cost a third of a /v1/health answer."""
    args = (log_safe(method, 16), log_safe(target), status, nbytes, ms, token, peer)
    log.handle(log.makeRecord(log.name, level, __file__, 0, _ACCESS_FMT, args, None, "http"))


def request_line_of(buf: bytes | bytearray) -> tuple[str, str]:
    """Method and target of a request head that never completed, for its access line."""
    parts = bytes(buf.partition(b"\n")[0]).decode("latin-1").split(" ")
    return parts[0], parts[1] if len(parts) > 1 else "-"


def error_response(status: int, code: str, message: str) -> bytes:
    """A whole error response that closes the connection (the intake sends these)."""
    body = error_body(code, message)
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nServer: {SERVER_HEADER}"
            f"\r\nDate: {http_date()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


REASONS = {s.value: s.phrase for s in HTTPStatus}
_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return str(_date_cache[1])


def head_ready(conn: Conn) -> bool:
    """A complete head in ``buf`` (or one too large: the worker refuses it)."""
    buf = conn.buf
    while buf.startswith((b"\n", b"\r\n")):
        del buf[:1 if buf[0] == 10 else 2]
        conn.scanned = 0
    if HEAD_END_RE.search(buf, max(conn.scanned - 3, 0), MAX_HEAD) is not None:
        return True
    conn.scanned = len(buf)
    return len(buf) >= MAX_HEAD or (len(buf) > MAX_LINE
                                    and buf.find(b"\n", 0, MAX_LINE + 1) < 0)


def lower_thread_priority(nicer: int) -> None:
    """This thread (on Linux nice is per thread) ``nicer`` than the agent: on a small
    machine an attacker's connections would otherwise take the CPU, and the GIL,
    from the workers answering clients with a token (see ``server.intake_nice``)."""
    if nicer <= 0:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + nicer))
    except OSError as exc:   # e.g. a sandbox that forbids it: serve all the same
        log.warning("cannot lower the intake thread's priority: %s", exc)


def raise_fd_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one when ``want`` descriptors would
    not fit (a connection is one); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = hard if hard != resource.RLIM_INFINITY else want
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.info("raised the open-file limit soft=%d->%d", soft, new)
            soft = new
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("open-file limit %d is below server.max_connections + headroom (%d)",
                    soft, want)
    return soft


class Conn:
    """One accepted connection as the server's caps and its intake see it."""

    __slots__ = ("raw", "sock", "addr", "peer", "deadline", "authenticated", "dropped",
                 "buf", "scanned", "in_intake", "park", "drain", "drained", "handshaken",
                 "token", "role", "held")

    def __init__(self, raw: socket.socket, addr: Any, deadline: float) -> None:
        self.raw = raw                  # as accepted (the key); ``sock`` once TLS-wrapped
        self.sock: socket.socket = raw
        self.addr = addr
        self.peer = str(addr[0])
        self.deadline = deadline        # for the next request head while unauthenticated
        self.authenticated = False
        self.dropped = ""               # why the server closed it ("" while it has not)
        self.buf = bytearray()          # read but not yet parsed (the intake's or a handler's)
        self.scanned = 0                # how far ``buf`` was searched for the head's end
        self.in_intake = False          # owned by the intake thread (else by a worker)
        self.park = False               # a worker hands it back to the intake
        self.drain = False              # ... for a lingering close (see Handler.finish)
        self.drained = 0                # bytes discarded while lingering
        self.handshaken = False         # TLS
        self.token = ""                 # the name of the token it counts toward (budgets)
        self.role = ""
        self.held = ""                  # the token a worker waits on its next request for


# -- handler -------------------------------------------------------------------


class ServerSide(Protocol):
    """What one connection's handler uses of the server it runs under."""

    agent: Operations
    config: AgentConfig
    tokens: TokenStore
    metrics: Metrics
    health_cache: tuple[dict[str, Any], bytes] | None

    def conn_of(self, sock: socket.socket) -> Conn: ...
    def busy(self, delta: int) -> None: ...
    def authenticated(self, conn: Conn, token: Token) -> None: ...
    def hold(self, conn: Conn) -> bool: ...
    def unhold(self, conn: Conn) -> None: ...
    def stream_begin(self, token: str) -> None: ...
    def stream(self, pump: StreamPump, add: bool) -> None: ...
    def stream_end(self, pump: StreamPump | None, token: str) -> None: ...
