"""One HTTP/1.1 connection of the agent's API: our own small request reader,
deadlines per phase, routing, auth and JSON answers (design §6).

The request parser is our own instead of ``BaseHTTPRequestHandler.parse_request``:
the stock one runs the ``email`` header parser on every request, which costs
more than the whole health answer, and it reads with per-``recv`` timeouts,
which a client sending one byte a second defeats. Every response leaves in
one ``sendall``; Nagle is off. Order of checks per request: request line and
headers (400/408/414/431/505), path (404), method (405), token and role
(401/403), body size (413), body deadline (408), body JSON (400), query and
names (400), then the agent (``endpoints.APIHandler``). Domain errors map to
their ``status``/``code``; anything else is a 500 with a generic message and
the traceback in the log only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from .auth import Token
from .errors import ForbiddenError, HTTPError, MCPError
from .httpapi import (
    Params,
    Route,
    is_ascii_digits,
    parse_query,
    resolve,
)
from .wire import (
    HEAD_END_RE,
    MAX_HEAD,
    MAX_LINE,
    REASONS,
    SERVER_HEADER,
    ServerSide,
    access_line,
    dumps,
    error_body,
    http_date,
    log_safe,
    request_line_of,
)

if TYPE_CHECKING:
    from .operations import Operations


log = logging.getLogger("mcp_node.server")

MAX_HEADERS = 100
QUIET_ROUTES = ("/v1/health", "/v1/livez", "/metrics")

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET_RE = re.compile(r"[!-~]+")                      # visible ASCII, no space
_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB (RFC 9110 §5.5)
_HOST_RE = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*")


class Handler(BaseHTTPRequestHandler):
    """One connection. Reads go through ``self._buf`` and ``_recv`` only (no ``rfile``),
    so every read knows its deadline and the socket timeout is set only when it changes."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_HEADER
    timeout = None
    disable_nagle_algorithm = True
    server: ServerSide  # type: ignore[assignment]  # a BaseServer that is also a ServerSide

    _token: Token | None = None
    _route: Route
    _route_name = "unmatched"    # the matched route's template: a bounded metrics label
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
        """Requests until the connection closes. Between requests a connection goes back
        to the intake, so it holds no thread while idle, unless it has shown a token with
        room for one more worker waiting (``budgets.IDLE_THREADS_PER_TOKEN``): that one
        waits here, and its next request is answered without the hand-over."""
        conn = self.conn
        while True:
            self.handle_one_request()
            if self.close_connection:
                return
            if not self._buf and not self._wait_next():
                if not self.close_connection:
                    conn.park = True
                return

    def _wait_next(self) -> bool:
        """Wait here for the next request if the token's budget allows: True once it
        has begun; False to park (``close_connection`` set if the client left or idled
        out ``server.idle_timeout_s``)."""
        conn, srv = self.conn, self.server
        if not conn.authenticated or not srv.hold(conn):
            return False
        try:
            if self._recv(0, srv.config.server.idle_timeout_s):
                return True
        except (OSError, ValueError):  # includes TimeoutError
            pass
        finally:
            srv.unhold(conn)
        self.close_connection = True
        return False

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
                m = HEAD_END_RE.search(buf, max(scanned - 3, 0), MAX_HEAD)
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
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
                f"Server: {SERVER_HEADER}\r\nDate: {http_date()}\r\n"
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
        self._send(status, dumps(obj))

    def _send_error(self, exc: MCPError) -> None:
        extra: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, HTTPError):
            extra = exc.headers
            if exc.close:
                self.close_connection = True
        elif exc.status == 401:
            extra = (("WWW-Authenticate", 'Bearer realm="mcp-agent"'),)
        self._send(exc.status, error_body(exc.code, str(exc)), extra=extra)

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
            limits = self.server.config.server  # (for when it goes back to the intake)
            self.conn.deadline = time.monotonic() + (
                limits.idle_timeout_s if self.conn.authenticated else limits.header_timeout_s)

    def _not_busy(self) -> None:
        if self._busy:
            self._busy = False
            self.server.busy(-1)

    def _log(self, started: float) -> None:
        seconds = time.perf_counter() - started
        route = self._route_name
        self.server.metrics.observe(self._method, route, self._status, seconds)
        # Health and liveness polls come every few seconds from every monitor: debug only.
        level = logging.DEBUG if route in QUIET_ROUTES and self._status == 200 else logging.INFO
        if log.isEnabledFor(level):
            access_line(self._method, self._target, self._status, self._bytes,
                        seconds * 1000, self._token.name if self._token else "-",
                        self.client_address[0], level)

    def _dispatch(self, method: str, target: str, headers: dict[str, str]) -> None:
        body_pending = ("transfer-encoding" in headers
                        or headers.get("content-length", "0").lstrip("0") != "")
        try:
            if not target.startswith("/"):
                raise HTTPError(400, "bad_request", "request target must be a path", close=True)
            path, _, query = target.partition("?")
            self._route_name = "unmatched"
            route, params = resolve(method, path)
            self._route, self._route_name = route, route.template
            if route.role is not None:
                # Fleet writes act on every node: they need the master role (issue 12).
                role = self.agent.write_role if route.role == "operator" else route.role
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
            self._send(500, error_body("internal", "internal error; see the agent's log"))

    def _authorize(self, header: str | None, role: str) -> None:
        """The token, or 401/403; 503 if its connection does not fit its budget."""
        tokens = self.server.tokens
        try:
            self._token = tokens.authorize(header, role)
        except ForbiddenError:  # a valid token, short of the role: still a known client
            self._token = tokens.authorize(header, "reader")
            self.server.authenticated(self.conn, self._token)
            raise
        self.server.authenticated(self.conn, self._token)

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

    @property
    def agent(self) -> Operations:
        return self.server.agent

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http " + format, *args)
