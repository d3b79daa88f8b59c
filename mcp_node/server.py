"""The agent's JSON/HTTP API (design §6) on ``http.server``, no framework.

Connections are accepted by one selector thread, the intake, which also does
the TLS handshake and reads request heads for every connection that has not
shown a valid token yet: a slow or idle connection costs a socket and a
buffer, not a thread. A complete head goes to a worker thread (reused, see
``Workers``), which parses and answers it; a connection that authenticated
stays with its worker (keep-alive), one that did not goes back to the intake.
The request parser is our own small HTTP/1.1 reader instead of
``BaseHTTPRequestHandler.parse_request``: the stock one runs the ``email``
header parser on every request, which costs more than the whole health
answer, and it reads with per-``recv`` timeouts, which a client sending one
byte a second defeats. Every response leaves in one ``sendall``; Nagle is off.

Each phase has a deadline, not just an idle timeout: a request's line and
headers (``server.header_timeout_s``), its body (``server.body_timeout_s``,
408), the wait for the next request on an authenticated keep-alive
connection (``server.idle_timeout_s``). Unauthenticated connections are
capped in total and per peer address, and at a cap the oldest one is dropped
to admit the new one, so idle or slow connections never lock out a client
with a token; ``server.max_connections`` bounds them all.

Order of checks per request: request line and headers (400/408/414/431/505),
path (404), method (405), token and role (401/403), body size (413), body
deadline (408), body JSON (400), query and names (400), then the agent.
Domain errors map to their ``status``/``code``; anything else is a 500 with
a generic message and the traceback in the log only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import __version__, openapi
from .auth import Token, TokenStore, token_file_path
from .config import AgentConfig
from .errors import ForbiddenError, HTTPError, MCPError, NotFoundError, ValidationError
from .httpapi import (
    END,
    LogPump,
    Params,
    Route,
    check_listen,
    client_gone,
    close_iterator,
    edge_setup_args,
    hangup_poller,
    is_ascii_digits,
    parse_bool,
    parse_count,
    parse_json,
    parse_query,
    resolve,
    tls_context,
)
from .servicedef import check_hostname, check_name, from_dict

if TYPE_CHECKING:
    from pathlib import Path

    from .agent import Agent
    from .fleetnode import Fleet

log = logging.getLogger(__name__)

SERVER_HEADER = f"mcp-agent/{__version__}"
MAX_LINE = 8192
MAX_HEADERS = 100
MAX_HEAD = 64 << 10
SHUTDOWN_GRACE_S = 10.0
MAX_LOG_BYTES = 64 << 20
FOLLOW_HEADERS_AFTER_S = 1.0
HANGUP_CHECK_S = 0.5          # a follow stream notices its client gone within about this
LINGER_S = 2.0
LINGER_BYTES = 4 << 20
DROP_LOG_EVERY_S = 10.0
INTAKE_SWEEP_S = 0.1          # how often the intake looks for expired head deadlines
ACCEPT_BATCH = 32             # connections accepted before the intake reads again
_ACCESS_FMT = "http method=%s path=%s status=%d bytes=%d ms=%.2f token=%s peer=%s"

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET_RE = re.compile(r"[!-~]+")                      # visible ASCII, no space
_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB (RFC 9110 §5.5)
_HOST_RE = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*")
_HEAD_END_RE = re.compile(rb"\r?\n\r?\n")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _error_body(code: str, message: str) -> bytes:
    return _dumps({"error": {"code": code, "message": message}})


def log_safe(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` and with everything but visible ASCII as ``\\xNN``: what
    a client sends must not put terminal escapes, NUL or fake fields in the log."""
    text = text[:limit]
    if text.isascii() and text.isprintable() and " " not in text and "\\" not in text:
        return text
    return "".join(c if "!" <= c <= "~" and c != "\\" else
                   f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


def access_line(method: str, target: str, status: int, nbytes: int, ms: float, token: str,
                peer: str) -> None:
    """One access line per request. makeRecord + handle instead of log.info: skips the
    caller lookup (stack walk), which cost a third of a /v1/health answer."""
    args = (log_safe(method, 16), log_safe(target), status, nbytes, ms, token, peer)
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, _ACCESS_FMT, args, None,
                              "http"))


def request_line_of(buf: bytes | bytearray) -> tuple[str, str]:
    """Method and target of a request head that never completed, for its access line."""
    parts = bytes(buf.partition(b"\n")[0]).decode("latin-1").split(" ")
    return parts[0], parts[1] if len(parts) > 1 else "-"


def error_response(status: int, code: str, message: str) -> bytes:
    """A whole error response that closes the connection (the intake sends these)."""
    body = _error_body(code, message)
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nServer: {SERVER_HEADER}"
            f"\r\nDate: {_http_date()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_BUSY_BODY = b'{"error":{"code":"busy","message":"too many open connections"}}'
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
                  % (len(_BUSY_BODY), _BUSY_BODY))
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return str(_date_cache[1])


class Conn:
    """One accepted connection as the server's caps and its intake see it."""

    __slots__ = ("raw", "sock", "addr", "peer", "deadline", "authenticated", "dropped",
                 "buf", "scanned", "in_intake", "park", "drain", "drained", "handshaken")

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


# -- handler -------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """One connection. Reads go through ``self._buf`` and ``_recv`` only (no ``rfile``),
    so every read knows its deadline and the socket timeout is set only when it changes."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_HEADER
    timeout = None
    disable_nagle_algorithm = True
    server: AgentServer

    _token: Token | None = None
    _route: Route
    _linger = False
    _busy = False
    _head_only = False
    _gone = False  # a read or write on the client's socket failed: nothing more to send
    _cur_timeout: float | None = None

    def setup(self) -> None:
        self.conn = self.server.conn_of(self.request)
        self._buf = self.conn.buf  # what the intake read: at least the first request's head
        self.request = self.connection = self.conn.sock  # TLS-wrapped by the intake

    def handle(self) -> None:
        """Requests until the connection closes; a connection without a valid token goes
        back to the intake between requests, so it never holds a thread while idle."""
        while True:
            self.handle_one_request()
            if self.close_connection:
                return
            if not self.conn.authenticated:
                self.conn.park = True
                return

    def finish(self) -> None:
        """Lingering close: closing with an unread body would send a TCP RST that can
        destroy our error response in the client's buffer, so half-close and let the
        intake discard what the client still sends (bounded in bytes and time), which
        frees this thread at once."""
        if self._linger and not self._gone:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.request, socket.SHUT_WR)
                self.conn.drain = True

    # -- wire --------------------------------------------------------------------

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._cur_timeout:
            self.request.settimeout(seconds)
            self._cur_timeout = seconds

    def _recv(self, deadline: float, timeout: float | None = None) -> bool:
        """One read into the buffer, bounded by ``deadline`` (or ``timeout``, which keeps
        the socket's timeout unchanged, and a syscall saved, on a keep-alive connection);
        False at end of stream. TimeoutError when time is up, OSError if the socket failed."""
        if timeout is None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError
        self._set_timeout(timeout)
        data = self.request.recv(65536)
        self._buf += data
        return bool(data)

    def _write(self, data: bytes) -> None:
        limits = self.server.config.server
        try:
            self._set_timeout(limits.idle_timeout_s if self.conn.authenticated
                              else limits.header_timeout_s)
            self.request.sendall(data)
        except (OSError, ValueError):
            self._gone = True
            raise

    def _read_head(self) -> tuple[str, str, str, dict[str, str]] | None:
        """The next request's line and headers; None if the client closed (or stayed
        silent) before sending any of it."""
        limits = self.server.config.server
        buf = self._buf
        if self.conn.authenticated:
            # an authenticated client may idle between requests; the head then has its own
            # deadline from its first byte
            if not buf and not self._recv(0, limits.idle_timeout_s):
                return None
            deadline = time.monotonic() + limits.header_timeout_s
        else:
            deadline = self.conn.deadline
        scanned = 0  # the head's end is looked for in new bytes only (a client sending one
        try:         # byte at a time must not make each read rescan the whole buffer)
            while True:
                while buf.startswith((b"\n", b"\r\n")):  # stray CRLFs (RFC 9112 §2.2)
                    del buf[:1 if buf[0] == 10 else 2]
                    scanned = 0
                m = _HEAD_END_RE.search(buf, max(scanned - 3, 0), MAX_HEAD)
                if m is not None:
                    break
                scanned = len(buf)
                if len(buf) > MAX_LINE and buf.find(b"\n", 0, MAX_LINE + 1) < 0:
                    raise HTTPError(414, "uri_too_long", "request line too long", close=True)
                if len(buf) >= MAX_HEAD:
                    raise HTTPError(431, "headers_too_large",
                                    f"request head larger than {MAX_HEAD} bytes", close=True)
                if not self._recv(deadline):
                    if buf.strip():
                        raise HTTPError(400, "bad_request", "connection closed in headers",
                                        close=True)
                    return None
        except TimeoutError:
            if not buf.strip():
                return None
            self._peek_request_line()
            raise HTTPError(408, "request_timeout",
                            f"request headers not complete within "
                            f"{limits.header_timeout_s:g} s (server.header_timeout_s)",
                            close=True) from None
        head = bytes(buf[:m.start()])
        del buf[:m.end()]
        return self._parse_head(head.decode("latin-1"))

    def _peek_request_line(self) -> None:
        """For the access line of a request refused before its head was complete."""
        self._method, self._target = request_line_of(self._buf)

    def _parse_head(self, head: str) -> tuple[str, str, str, dict[str, str]]:
        lines = head.split("\n")
        line = lines[0].removesuffix("\r")
        if len(line) > MAX_LINE:
            raise HTTPError(414, "uri_too_long", "request line too long", close=True)
        parts = line.split(" ")
        if len(parts) == 3:
            self._method, self._target = parts[0], parts[1]
        else:
            self._method = line
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise HTTPError(400, "bad_request",
                            "malformed request line; expected METHOD SP TARGET SP HTTP/1.1",
                            close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "http_version", "HTTP/1.0 or 1.1 only", close=True)
        self.request_version = version
        if not _TOKEN_RE.fullmatch(method):
            raise HTTPError(400, "bad_request",
                            f"malformed method {method[:20]!r} in the request line", close=True)
        if not _TARGET_RE.fullmatch(target):
            raise HTTPError(400, "bad_request",
                            "request target must be visible ASCII (percent-encode the rest)",
                            close=True)
        if len(lines) > MAX_HEADERS + 1:
            raise HTTPError(431, "headers_too_large", "too many header lines", close=True)
        headers: dict[str, str] = {}
        for h in lines[1:]:
            if len(h) > MAX_LINE:
                raise HTTPError(431, "headers_too_large", "header line too long", close=True)
            name, sep, value = h.removesuffix("\r").partition(":")
            if not sep or not _TOKEN_RE.fullmatch(name):
                raise HTTPError(400, "bad_request", f"malformed header line {h[:40]!r}",
                                close=True)
            key = name.lower()
            if _VALUE_BAD_RE.search(value):
                raise HTTPError(400, "bad_request",
                                f"header {name[:40]!r} has a control character (NUL, CR, ...) "
                                "in its value", close=True)
            value = value.strip(" \t")
            if key in headers:
                if key in ("content-length", "authorization", "host"):
                    raise HTTPError(400, "bad_request", f"duplicate {name} header", close=True)
                value = headers[key] + ", " + value
            headers[key] = value
        if "host" in headers:
            if not _HOST_RE.fullmatch(headers["host"]):
                raise HTTPError(400, "bad_request", "malformed Host header", close=True)
        elif version == "HTTP/1.1":
            raise HTTPError(400, "bad_request", "HTTP/1.1 request without a Host header",
                            close=True)
        if "content-length" in headers:
            raw = headers["content-length"]
            if not is_ascii_digits(raw, 18):
                raise HTTPError(400, "bad_request",
                                f"Content-Length {raw[:20]!r} is not a number of bytes (0-9)",
                                close=True)
        return method, target, version, headers

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              extra: tuple[tuple[str, str], ...] = ()) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Server: {SERVER_HEADER}\r\nDate: {_http_date()}\r\n"
                f"Content-Type: {ctype}\r\n"]
        if self._head_only:  # no body, and no length it would not have had (RFC 9110 §8.6)
            body = b""
        else:
            head.append(f"Content-Length: {len(body)}\r\n")
        for k, v in extra:
            head.append(f"{k}: {v}\r\n")
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        self._write("".join(head).encode("latin-1") + body)
        self._status, self._bytes = status, len(body)

    def _send_json(self, obj: Any, status: int = 200) -> None:
        self._send(status, _dumps(obj))

    def _send_error(self, exc: MCPError) -> None:
        extra: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, HTTPError):
            extra = exc.headers
            if exc.close:
                self.close_connection = True
        elif exc.status == 401:
            extra = (("WWW-Authenticate", 'Bearer realm="mcp-agent"'),)
        self._send(exc.status, _error_body(exc.code, str(exc)), extra=extra)

    def handle_one_request(self) -> None:
        self._status, self._bytes, self._token = 0, 0, None
        self._method, self._target = "-", "-"
        self._head_only = False
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        started = time.perf_counter()
        try:
            head = self._read_head()
        except HTTPError as exc:
            # refused before routing: answered, and logged like any other request
            self._linger = exc.status not in (408, 503)  # a stalled client is not waited for
            with contextlib.suppress(OSError, ValueError):
                self._send_error(exc)
            self._log(started)
            return
        except (OSError, ValueError):  # includes TimeoutError of an idle wait, TLS errors
            return
        if head is None:
            return
        method, target, version, headers = head
        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.close_connection = "close" in conn
        else:
            self.close_connection = "keep-alive" not in conn
        self.command, self.path = method, target
        self._head_only = method == "HEAD"
        started = time.perf_counter()
        self._busy = True
        self.server.busy(1)
        try:
            self._dispatch(method, target, headers)
        except (OSError, ValueError):  # the client's socket failed (see _gone)
            self.close_connection = True
        finally:
            self._not_busy()
            self._log(started)
            if not self.conn.authenticated:
                self.conn.deadline = time.monotonic() + self.server.config.server.header_timeout_s

    def _log(self, started: float) -> None:
        if log.isEnabledFor(logging.INFO):
            access_line(self._method, self._target, self._status, self._bytes,
                        (time.perf_counter() - started) * 1000,
                        self._token.name if self._token else "-", self.client_address[0])

    def _dispatch(self, method: str, target: str, headers: dict[str, str]) -> None:
        body_pending = ("transfer-encoding" in headers
                        or headers.get("content-length", "0").lstrip("0") != "")
        try:
            if not target.startswith("/"):
                raise HTTPError(400, "bad_request", "request target must be a path", close=True)
            path, _, query = target.partition("?")
            route, params = resolve(method, path)
            self._route = route
            if route.role is not None:
                # Fleet writes act on every node: they need the master role (issue 12).
                role = ("master" if route.role == "operator" and self.agent.fleet is not None
                        else route.role)
                self._authorize(headers.get("authorization"), role)
            body = self._read_body(headers) if body_pending else b""
            body_pending = False
            q = parse_query(query, route.query)
            handler: Callable[[Params, dict[str, str], bytes], None] = getattr(
                self, route.handler)
            handler(params, q, body)
        except MCPError as exc:
            if body_pending and exc.status != 408:
                self.close_connection = self._linger = True  # unread body left on the wire
            self._send_error(exc)
        except Exception:
            if self._gone:  # broken pipe, reset, or it stopped reading: nothing to answer
                raise
            log.exception("unhandled error method=%s path=%s", log_safe(method, 16),
                          log_safe(target))
            self.close_connection = True
            self._send(500, _error_body("internal", "internal error; see the agent's log"))

    def _authorize(self, header: str | None, role: str) -> None:
        try:
            self._token = self.server.tokens.authorize(header, role)
        except ForbiddenError:  # a valid token, short of the role: still a known client
            self.server.authenticated(self.conn)
            raise
        self.server.authenticated(self.conn)

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if "transfer-encoding" in headers:
            raise HTTPError(411, "length_required",
                            "chunked request bodies are not accepted; send Content-Length",
                            close=True)
        length = int(headers["content-length"])  # checked ASCII digits in _parse_head
        limits = self.server.config.server
        if length > limits.max_body:
            raise HTTPError(413, "too_large",
                            f"request body of {length} bytes exceeds the limit of "
                            f"{limits.max_body} (server.max_body)", close=True)
        if headers.get("expect", "").lower() == "100-continue" and len(self._buf) < length:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = time.monotonic() + limits.body_timeout_s
        buf = self._buf
        try:
            while len(buf) < length:
                if not self._recv(deadline):
                    raise HTTPError(400, "bad_request",
                                    f"request body ended after {len(buf)} of {length} bytes",
                                    close=True)
        except TimeoutError:  # before OSError: it is one
            raise HTTPError(408, "request_timeout",
                            f"request body not complete within {limits.body_timeout_s:g} s "
                            f"(server.body_timeout_s): {len(buf)} of {length} bytes",
                            close=True) from None
        except (OSError, ValueError):
            self._gone = True
            raise
        body = bytes(buf[:length])
        del buf[:length]
        return body

    # -- endpoints -----------------------------------------------------------------

    @property
    def agent(self) -> Agent:
        return self.server.agent

    def h_health(self, params: Params, query: dict[str, str], body: bytes) -> None:
        # The hot path: the view changes at most once a second, so comparing the dict
        # with the last one is cheaper than serialising it again.
        data = self.agent.health()
        last = self.server.health_cache
        if last is None or last[0] != data:
            last = self.server.health_cache = (data, _dumps(data))
        self._send(200, last[1])

    def h_openapi(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send(200, openapi.document_bytes())

    def h_ps(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json(self.agent.ps())

    def h_status(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json(self.agent.status(check_name(params["name"], "name")))

    def h_deploy(self, params: Params, query: dict[str, str], body: bytes) -> None:
        defn = from_dict(parse_json(body))
        self._send_json(self.agent.deploy(defn))

    def h_lifecycle(self, params: Params, query: dict[str, str], body: bytes) -> None:
        name = check_name(params["name"], "name")
        if body.strip() and parse_json(body) not in ({}, None):
            raise ValidationError("expected an empty body or {}", "body")
        op = self._route.template.rsplit("/", 1)[1]  # the raw path may be %-encoded
        fn = {"stop": self.agent.stop, "start": self.agent.start,
              "restart": self.agent.restart}[op]
        self._send_json(fn(name))

    def h_undeploy(self, params: Params, query: dict[str, str], body: bytes) -> None:
        name = check_name(params["name"], "name")
        self.agent.undeploy(name)
        self._send_json({"service": name, "undeployed": True})

    def h_logs(self, params: Params, query: dict[str, str], body: bytes) -> None:
        name = check_name(params["name"], "name")
        component = query.get("component") or None
        if component is not None:
            check_name(component, "component")
        tail: int | None = None
        if query.get("tail"):
            cap = self.server.config.server.max_tail
            tail = parse_count(query["tail"], "tail", cap, " lines (server.max_tail)")
        follow = parse_bool(query.get("follow", ""), "follow")
        if follow:
            self._follow(name, component, tail)
            return
        chunks = self.agent.logs(name, component, tail, False)
        buf: list[bytes] = []
        size = 0
        try:
            for c in chunks:
                buf.append(c)
                size += len(c)
                if size > MAX_LOG_BYTES:
                    raise ValidationError(f"more than {MAX_LOG_BYTES} bytes; use tail", "tail")
        finally:
            close_iterator(chunks)
        self._send(200, b"".join(buf), "text/plain; charset=utf-8")

    def _follow(self, name: str, component: str | None, tail: int | None) -> None:
        """Errors the agent raises at once still become JSON errors; after a short wait
        the 200 headers go out anyway, since podman answers a follow request only
        when the first line arrives (the client would otherwise see nothing at all)."""
        pump = LogPump(self.agent, name, component, tail)
        self.server.stream(pump, True)
        try:
            if pump.opened.wait(FOLLOW_HEADERS_AFTER_S) and pump.open_error is not None:
                raise pump.open_error
            self._stream(pump)
        finally:
            pump.stop()
            self.server.stream(pump, False)

    def _not_busy(self) -> None:
        if self._busy:
            self._busy = False
            self.server.busy(-1)

    def _stream(self, pump: LogPump) -> None:
        """Chunks as they come; between them, whether the client is still there, so a
        stream of a quiet component ends (and frees its thread and connection) within
        about ``HANGUP_CHECK_S`` of its client leaving."""
        self._not_busy()  # a follow stream never "finishes": shutdown must not wait for it
        chunked = self.request_version == "HTTP/1.1"
        self.close_connection = True  # unless the stream ends cleanly below
        head = (f"HTTP/1.1 200 OK\r\nServer: {SERVER_HEADER}\r\nDate: {_http_date()}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n"
                "X-Content-Type-Options: nosniff\r\n"
                + ("Transfer-Encoding: chunked\r\n" if chunked else "Connection: close\r\n")
                + "\r\n")
        self._write(head.encode("latin-1"))
        self._status = 200
        poller = hangup_poller(self.request)
        checked = time.monotonic()
        while True:
            item = pump.get(HANGUP_CHECK_S)
            if item is END:
                break
            now = time.monotonic()
            if item is None or now - checked >= HANGUP_CHECK_S:
                checked = now
                if client_gone(poller):
                    return
            if isinstance(item, bytes) and item:
                self._write(b"%x\r\n%b\r\n" % (len(item), item) if chunked else item)
                self._bytes += len(item)
        err = pump.open_error or pump.stream_error
        if err is not None:
            # Headers are gone: cut the stream without its terminator so the client sees it broke.
            log.error("log stream failed path=%s: %s", log_safe(self.path), err,
                      exc_info=None if isinstance(err, MCPError) else err)
            return
        if chunked:
            self._write(b"0\r\n\r\n")
            self.close_connection = False

    def _fleet(self, write: bool = False) -> Fleet:
        if self.agent.fleet is None:
            raise NotFoundError("this agent is not in fleet mode (no [cluster] etcd in its "
                                "config)")
        if write:
            self.agent._fleet_writable()
        return self.agent.fleet

    def h_nodes(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json(self._fleet().nodes())

    def h_drain(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json(self._fleet(write=True).drain(check_name(params["node"], "node")))

    def h_uncordon(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json(self._fleet(write=True).uncordon(check_name(params["node"], "node")))

    def h_edge_list(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json(self.agent.edge.list())

    def h_edge_setup(self, params: Params, query: dict[str, str], body: bytes) -> None:
        hostname, backend, port, tls = edge_setup_args(parse_json(body))
        self._send_json(self.agent.edge.setup(hostname, backend, port, tls))

    def h_edge_remove(self, params: Params, query: dict[str, str], body: bytes) -> None:
        hostname = check_hostname(params["hostname"], "hostname")
        self.agent.edge.remove(hostname)
        self._send_json({"hostname": hostname, "removed": True})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http " + format, *args)


# -- server ----------------------------------------------------------------------


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


class AgentServer(ThreadingHTTPServer):
    """Accepts connections within the caps of ``[server]`` and reads each request head of
    a connection without a valid token in one selector thread (the intake), so slow and
    idle connections cost a socket and a buffer, not a thread; complete heads, and every
    connection once authenticated, go to the workers. See the module docstring."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: a burst of connects is not met by SYN drops

    def __init__(self, address: tuple[str, int], agent: Agent, config: AgentConfig,
                 tokens: TokenStore, ssl_context: ssl.SSLContext | None) -> None:
        self.agent = agent
        self.config = config
        self.tokens = tokens
        self.ssl_context = ssl_context
        self._conns: dict[socket.socket, Conn] = {}        # every open one, by accepted socket
        self._unauth: dict[Conn, None] = {}                # oldest first
        self._unauth_by_peer: dict[str, dict[Conn, None]] = {}
        self._dropped_open = 0                            # dropped, not closed yet
        self._conns_lock = threading.Lock()
        self._streams: set[LogPump] = set()
        self._busy_lock = threading.Lock()
        self._busy = 0
        self._drops = 0
        self._drops_logged_at = 0.0
        self.health_cache: tuple[dict[str, Any], bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._workers = Workers(self.process_request_thread)
        self._intake: dict[Conn, None] = {}               # intake thread only
        self._parked: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{shown}:{port}"

    @property
    def token_file(self) -> Path | None:
        path = token_file_path(self.config)
        return path if path.exists() else None

    # -- connection accounting (tests and the bench read these) ----------------------

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def unauthenticated_connections(self) -> int:
        return len(self._unauth)

    def unauthenticated_by_peer(self) -> dict[str, int]:
        with self._conns_lock:
            return {peer: len(conns) for peer, conns in self._unauth_by_peer.items()}

    @property
    def open_streams(self) -> list[LogPump]:
        with self._conns_lock:
            return list(self._streams)

    def stream(self, pump: LogPump, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._streams.add(pump)
            else:
                self._streams.discard(pump)

    def busy(self, delta: int) -> None:
        with self._busy_lock:
            self._busy += delta

    def conn_of(self, sock: socket.socket) -> Conn:
        with self._conns_lock:
            return self._conns[sock]

    def authenticated(self, conn: Conn) -> None:
        """``conn`` showed a valid token: it leaves the unauthenticated caps for good."""
        if conn.authenticated:
            return
        with self._conns_lock:
            if not conn.authenticated:
                conn.authenticated = True
                self._forget_unauth(conn)

    def _forget_unauth(self, conn: Conn) -> None:
        if conn in self._unauth:
            del self._unauth[conn]
            peer = self._unauth_by_peer[conn.peer]
            del peer[conn]
            if not peer:
                del self._unauth_by_peer[conn.peer]

    def _drop_oldest(self, conns: dict[Conn, None], why: str,
                     completed: list[Conn]) -> Conn | None:
        """The oldest of ``conns`` still waiting in the intake for its head, marked as
        dropped. One whose head has arrived meanwhile (unread yet) is not slow: it goes
        to ``completed`` instead. None if every one is being answered by a worker."""
        found = None
        for c in conns:  # oldest first; usually the first one
            if c.in_intake and c not in completed:
                if c.drain or not self._head_arrived(c):
                    found = c
                    break
                completed.append(c)
        if found is not None:
            self._forget_unauth(found)
            found.dropped = why
            self._dropped_open += 1
            self._drops += 1
        return found

    def _head_arrived(self, conn: Conn) -> bool:
        """Read what is waiting on ``conn`` (intake thread; no blocking, no closing)."""
        try:
            while conn.handshaken and not self._head_ready(conn):
                data = conn.sock.recv(65536)
                if not data:
                    return False
                conn.buf += data
        except (OSError, ValueError):  # includes BlockingIOError, SSLWantReadError
            return False
        return conn.handshaken

    # -- the intake (one thread: accepts, caps, reads request heads) -------------------

    def _serve(self) -> None:
        sel = self._sel
        self.socket.setblocking(False)
        sel.register(self.socket, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = time.monotonic() + INTAKE_SWEEP_S
        try:
            while not self._stopping:
                for key, _ in sel.select(INTAKE_SWEEP_S):
                    self._guarded(self._intake_event, key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + INTAKE_SWEEP_S
                    for conn in [c for c in self._intake if c.deadline <= now]:
                        self._guarded(self._intake_expired, conn)
        finally:
            for conn in list(self._intake):
                self._intake_close(conn)
            while not self._parked.empty():
                self._intake_close(self._parked.get())

    def _guarded(self, fn: Callable[[Any], None], arg: Any) -> None:
        """The intake must outlive any one connection's surprise: log it, drop that one."""
        try:
            fn(arg)
        except Exception:
            log.exception("intake error")
            if isinstance(arg, Conn):
                with contextlib.suppress(Exception):
                    self._intake_close(arg)

    def _intake_event(self, what: Any) -> None:
        if what == "accept":
            self._accept_all()
        elif what == "wake":
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            while not self._parked.empty():
                self._guarded(self._intake_add, self._parked.get())
        elif what.drain:
            self._intake_drain(what)
        else:
            self._intake_read(what)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _accept_all(self) -> None:
        for _ in range(ACCEPT_BATCH):  # then read what the accepted ones sent
            try:
                raw, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: let others finish first
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                return
            conn = self.admit(raw, addr)
            if conn is None:
                self.close_request(raw)
                continue
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            self._intake_add(conn)

    def _intake_add(self, conn: Conn) -> None:
        try:
            conn.sock.setblocking(False)
            if self.ssl_context is not None and conn.sock is conn.raw:
                conn.sock = self.ssl_context.wrap_socket(conn.raw, server_side=True,
                                                         do_handshake_on_connect=False)
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._release(conn)
            return
        conn.in_intake = True
        self._intake[conn] = None
        if conn.drain:
            conn.deadline = time.monotonic() + LINGER_S
            conn.buf.clear()
            self._intake_drain(conn)
        else:
            self._intake_read(conn)  # a client sends its request at once: read it now

    def _intake_drain(self, conn: Conn) -> None:
        """Discard what a client still sends after our error (see Handler.finish)."""
        try:
            while conn.drained < LINGER_BYTES:
                data = socket.socket.recv(conn.sock, 65536)  # raw bytes, TLS or not
                if not data:
                    break
                conn.drained += len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._intake_close(conn)

    def _intake_read(self, conn: Conn) -> None:
        sock = conn.sock
        try:
            if not conn.handshaken and isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            conn.handshaken = True
            while not self._head_ready(conn):
                data = sock.recv(65536)
                if not data:  # the client is gone, whatever it had begun
                    self._intake_close(conn)
                    return
                conn.buf += data
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # more to come (a handshake's small writes do not block in practice)
        except (OSError, ValueError):
            self._intake_close(conn)
            return
        self._hand_over(conn)

    @staticmethod
    def _head_ready(conn: Conn) -> bool:
        """A complete head in ``buf`` (or one too large: the worker refuses it)."""
        buf = conn.buf
        while buf.startswith((b"\n", b"\r\n")):
            del buf[:1 if buf[0] == 10 else 2]
            conn.scanned = 0
        if _HEAD_END_RE.search(buf, max(conn.scanned - 3, 0), MAX_HEAD) is not None:
            return True
        conn.scanned = len(buf)
        return len(buf) >= MAX_HEAD or (len(buf) > MAX_LINE
                                        and buf.find(b"\n", 0, MAX_LINE + 1) < 0)

    def _hand_over(self, conn: Conn) -> None:
        self._intake_forget(conn)
        self._workers.submit(conn.raw, conn.addr)

    def _intake_expired(self, conn: Conn) -> None:
        """Past its header deadline: 408 if it had begun a request (and an access line),
        else closed without a word. Answered here: no worker for a slowloris."""
        if conn.buf.strip() and not conn.drain:
            timeout = self.config.server.header_timeout_s
            self._intake_close(conn, 408, "request_timeout",
                               f"request headers not complete within {timeout:g} s "
                               "(server.header_timeout_s)")
        else:
            self._intake_close(conn)

    def _intake_forget(self, conn: Conn) -> None:
        if conn.in_intake:
            conn.in_intake = False
            del self._intake[conn]
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)

    def _intake_close(self, conn: Conn, status: int = 0, code: str = "",
                      message: str = "") -> None:
        """Close ``conn``, first answering ``status`` (or 503 if it was dropped) when it
        had begun a request; never blocks (the response is small, the buffer empty)."""
        self._intake_forget(conn)
        if conn.dropped:
            status, code, message = 503, "busy", conn.dropped
        if status and conn.buf.strip():
            data = error_response(status, code, message)
            with contextlib.suppress(OSError, ValueError):
                conn.sock.send(data)
            if log.isEnabledFor(logging.INFO) and not conn.dropped:  # drops: _log_drops
                began = conn.deadline - self.config.server.header_timeout_s
                access_line(*request_line_of(conn.buf), status, len(data),
                            (time.monotonic() - began) * 1000, "-", conn.peer)
        self._release(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self.close_request(conn.raw)

    def admit(self, request: socket.socket, client_address: Any) -> Conn | None:
        """Admit every new connection while it can: at an unauthenticated cap the oldest
        unauthenticated connection (of the same peer first) is dropped to make room.
        Only when every open connection is authenticated is the new one refused (503)."""
        limits = self.config.server
        conn = Conn(request, client_address, time.monotonic() + limits.header_timeout_s)
        peer = conn.peer
        victims: list[Conn | None] = []
        completed: list[Conn] = []
        admit = True
        with self._conns_lock:
            mine = self._unauth_by_peer.get(peer)
            if mine is not None and len(mine) >= limits.max_unauthenticated_per_peer:
                victims.append(self._drop_oldest(mine, (
                    f"too many unauthenticated connections from {peer} (more than "
                    f"server.max_unauthenticated_per_peer = "
                    f"{limits.max_unauthenticated_per_peer}); the oldest was closed"),
                    completed))
            elif len(self._unauth) >= limits.max_unauthenticated:
                heaviest = max(self._unauth_by_peer.values(), key=len)
                victims.append(self._drop_oldest(heaviest, (
                    f"too many unauthenticated connections (more than "
                    f"server.max_unauthenticated = {limits.max_unauthenticated}); "
                    "the oldest of the peer with the most was closed"), completed))
            if len(self._conns) - self._dropped_open >= limits.max_connections:
                victim = None
                if self._unauth:
                    heaviest = max(self._unauth_by_peer.values(), key=len)
                    victim = self._drop_oldest(heaviest, (
                        f"too many open connections (server.max_connections = "
                        f"{limits.max_connections}); the oldest unauthenticated was closed"),
                        completed)
                admit = victim is not None
                victims.append(victim)
            open_now = len(self._conns)
            if admit:
                self._conns[request] = conn
                self._unauth[conn] = None
                self._unauth_by_peer.setdefault(peer, {})[conn] = None
        for c in completed:
            self._hand_over(c)
        for v in victims:
            if v is not None:
                self._intake_close(v)
        if any(victims):
            self._log_drops()
        if not admit:
            with contextlib.suppress(OSError):
                request.send(_BUSY_RESPONSE, socket.MSG_DONTWAIT)
            log.warning("connection refused peer=%s reason=too_many_connections open=%d",
                        peer, open_now)
            return None
        return conn

    def _log_drops(self) -> None:
        """One warning per ``DROP_LOG_EVERY_S`` at most: under attack, drops come by
        the thousand and must not flood the log."""
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_EVERY_S:
            with self._conns_lock:
                n, self._drops = self._drops, 0
                unauth = len(self._unauth)
            self._drops_logged_at = now
            log.warning("dropped unauthenticated connections count=%d open=%d "
                        "unauthenticated=%d", n, len(self._conns), unauth)

    def _release(self, conn: Conn) -> None:
        with self._conns_lock:
            if self._conns.pop(conn.raw, None) is not None:
                if conn.dropped:
                    self._dropped_open -= 1
                elif not conn.authenticated:
                    self._forget_unauth(conn)

    def shutdown_request(self, request: Any) -> None:
        """A worker is done with ``request``: back to the intake, or closed."""
        with self._conns_lock:
            conn = self._conns.get(request)
        if conn is not None and (conn.park or conn.drain) and not self._stopping:
            conn.park = False
            self._parked.put(conn)
            self._wake()
            return
        if conn is not None:
            self._release(conn)
            if conn.sock is not request:
                with contextlib.suppress(OSError):
                    conn.sock.close()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error peer=%r", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="mcp-http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting, let requests in progress finish (bounded), drop idle connections."""
        if self._stopped:
            return
        self._stopped = self._stopping = True
        if self._thread is not None:
            self._wake()
            self._thread.join()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self._busy > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._conns_lock:
            conns = list(self._conns.values())
        for c in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(c.sock, socket.SHUT_RDWR)
        self._workers.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self.server_close()


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


def serve(agent: Agent, config: AgentConfig, *, tokens: TokenStore | None = None) -> AgentServer:
    """Bind, make sure a token exists, and serve in a background thread."""
    host, port = check_listen(config)
    ctx = tls_context(config)
    store = tokens if tokens is not None else TokenStore.for_config(config)
    store.ensure_initial(token_file_path(config))
    raise_fd_limit(config.server.max_connections + 256)
    try:
        srv = AgentServer((host, port), agent, config, store, ctx)
    except OSError as exc:
        raise MCPError(f"cannot listen on {config.server.listen}: {exc}") from exc
    srv.start()
    log.info("listening url=%s tokens_file=%s", srv.url, store.path)
    return srv
