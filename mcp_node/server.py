"""The agent's JSON/HTTP API (design §6) on ``http.server``, no framework.

ThreadingHTTPServer with one daemon thread per keep-alive connection. The
request parser is our own small HTTP/1.1 reader instead of
``BaseHTTPRequestHandler.parse_request``: the stock one runs the ``email``
header parser on every request, which costs more than the whole health
answer. Every response leaves in one ``sendall``; Nagle is off.

Order of checks per request: path (404), method (405), token and role
(401/403), body size (413), body JSON (400), names (400), then the agent.
Domain errors map to their ``status``/``code``; anything else is a 500 with
a generic message and the traceback in the log only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import __version__, openapi
from .auth import Token, TokenStore, token_file_path
from .config import AgentConfig
from .errors import HTTPError, MCPError, ValidationError
from .httpapi import (
    LogOpener,
    Params,
    Route,
    check_listen,
    edge_setup_args,
    parse_bool,
    parse_json,
    parse_query,
    resolve,
    tls_context,
)
from .servicedef import check_hostname, check_name, from_dict

if TYPE_CHECKING:
    from pathlib import Path

    from .agent import Agent

log = logging.getLogger(__name__)

SERVER_HEADER = f"mcp-agent/{__version__}"
MAX_LINE = 8192
MAX_HEADERS = 100
IDLE_TIMEOUT_S = 120.0
SHUTDOWN_GRACE_S = 10.0
MAX_LOG_BYTES = 64 << 20
FOLLOW_HEADERS_AFTER_S = 1.0
LINGER_S = 2.0
LINGER_BYTES = 4 << 20
_ACCESS_FMT = "http method=%s path=%s status=%d bytes=%d ms=%.2f token=%s peer=%s"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _error_body(code: str, message: str) -> bytes:
    return _dumps({"error": {"code": code, "message": message}})


MAX_CONNECTIONS = 512
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


# -- handler -------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_HEADER
    timeout = IDLE_TIMEOUT_S
    disable_nagle_algorithm = True
    server: AgentServer

    def setup(self) -> None:
        ctx = self.server.ssl_context
        if ctx is not None:
            self.request.settimeout(self.timeout)
            self.request = ctx.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.track(self.request, True)

    def finish(self) -> None:
        self.server.track(self.request, False)
        with contextlib.suppress(OSError):
            super().finish()
        if self._linger:
            self._drain()

    def _drain(self) -> None:
        """Lingering close: closing with an unread body would send a TCP RST that can
        destroy our error response in the client's buffer, so half-close and discard
        what the client still sends, bounded in bytes and time."""
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)
            self.request.settimeout(LINGER_S)
            left, deadline = LINGER_BYTES, time.monotonic() + LINGER_S
            while left > 0 and time.monotonic() < deadline:
                data = self.request.recv(65536)
                if not data:
                    break
                left -= len(data)

    # -- wire --------------------------------------------------------------------

    def _read_head(self) -> tuple[str, str, str, dict[str, str]] | None:
        line = self.rfile.readline(MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests (RFC 9112 §2.2)
            line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE:
            raise HTTPError(414, "uri_too_long", "request line too long", close=True)
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise HTTPError(400, "bad_request", "malformed request line", close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "http_version", "HTTP/1.0 or 1.1 only", close=True)
        self.request_version = version
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            h = self.rfile.readline(MAX_LINE + 1)
            if h in (b"\r\n", b"\n"):
                return method, target, version, headers
            if not h:
                raise HTTPError(400, "bad_request", "connection closed in headers", close=True)
            if len(h) > MAX_LINE:
                raise HTTPError(431, "headers_too_large", "header line too long", close=True)
            name, sep, value = h.decode("latin-1").partition(":")
            key = name.lower()
            if not sep or not key or key != key.strip():
                raise HTTPError(400, "bad_request", "malformed header line", close=True)
            value = value.strip()
            if key in headers:
                if key in ("content-length", "authorization", "host"):
                    raise HTTPError(400, "bad_request", f"duplicate {key} header", close=True)
                value = headers[key] + ", " + value
            headers[key] = value
        raise HTTPError(431, "headers_too_large", "too many header lines", close=True)

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              extra: tuple[tuple[str, str], ...] = ()) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Server: {SERVER_HEADER}\r\nDate: {_http_date()}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"]
        for k, v in extra:
            head.append(f"{k}: {v}\r\n")
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        self.wfile.write("".join(head).encode("latin-1") + body)
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

    _token: Token | None = None
    _route: Route
    _linger = False
    _busy = False

    def handle_one_request(self) -> None:
        self._status, self._bytes, self._token = 0, 0, None
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        try:
            head = self._read_head()
        except HTTPError as exc:
            self._linger = True
            self._send_error(exc)
            return
        except (TimeoutError, OSError, ssl.SSLError):
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
        started = time.perf_counter()
        self._busy = True
        self.server.busy(1)
        try:
            self._dispatch(method, target, headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
            self.close_connection = True
        finally:
            self._not_busy()
            self._log(method, target, started)

    def _log(self, method: str, target: str, started: float) -> None:
        # One access line per request. makeRecord + handle instead of log.info: skips the
        # caller lookup (stack walk), which cost a third of a /v1/health answer.
        if log.isEnabledFor(logging.INFO):
            path = target if target.isprintable() else repr(target)
            tok = self._token.name if self._token else "-"
            args = (method[:16], path[:300], self._status, self._bytes,
                    (time.perf_counter() - started) * 1000, tok, self.client_address[0])
            log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, _ACCESS_FMT, args,
                                      None, "http"))

    def _dispatch(self, method: str, target: str, headers: dict[str, str]) -> None:
        body_pending = ("transfer-encoding" in headers
                        or headers.get("content-length", "0") not in ("", "0"))
        try:
            if not target.startswith("/"):
                raise HTTPError(400, "bad_request", "request target must be a path", close=True)
            path, _, query = target.partition("?")
            route, params = resolve(method, path)
            self._route = route
            if route.role is not None:
                self._token = self.server.tokens.authorize(headers.get("authorization"),
                                                           route.role)
            body = self._read_body(headers) if body_pending else b""
            body_pending = False
            q = parse_query(query, route.query)
            handler: Callable[[Params, dict[str, str], bytes], None] = getattr(
                self, route.handler)
            handler(params, q, body)
        except MCPError as exc:
            if body_pending:
                self.close_connection = self._linger = True  # unread body left on the wire
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error method=%s path=%s", method, target[:300])
            self.close_connection = True
            self._send(500, _error_body("internal", "internal error; see the agent's log"))

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if "transfer-encoding" in headers:
            raise HTTPError(411, "length_required",
                            "chunked request bodies are not accepted; send Content-Length",
                            close=True)
        raw = headers["content-length"]
        if not raw.isdigit() or len(raw) > 18:
            raise HTTPError(400, "bad_request", "bad Content-Length", close=True)
        length = int(raw)
        limit = self.server.config.server.max_body
        if length > limit:
            raise HTTPError(413, "too_large",
                            f"request body of {length} bytes exceeds the limit of {limit}",
                            close=True)
        if headers.get("expect", "").lower() == "100-continue" and length:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length)
        if len(body) != length:
            raise HTTPError(400, "bad_request", "request body ended early", close=True)
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
            t = query["tail"]
            if not t.isdigit() or len(t) > 9:
                raise ValidationError(f"{t[:20]!r} is not a non-negative integer", "tail")
            tail = int(t)
        follow = parse_bool(query.get("follow", ""), "follow")
        if follow:
            self._follow(LogOpener(self.agent, name, component, tail))
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
            LogOpener._close(chunks)
        self._send(200, b"".join(buf), "text/plain; charset=utf-8")

    def _follow(self, opener: LogOpener) -> None:
        """Errors the agent raises at once still become JSON errors; after a short wait
        the 200 headers go out anyway, since podman answers a follow request only
        when the first line arrives (the client would otherwise see nothing at all)."""
        if opener.done.wait(FOLLOW_HEADERS_AFTER_S):
            self._stream(opener.result())
            return
        self._stream(None, opener)

    def _not_busy(self) -> None:
        if self._busy:
            self._busy = False
            self.server.busy(-1)

    def _stream(self, chunks: Iterator[bytes] | None, opener: LogOpener | None = None) -> None:
        self._not_busy()  # a follow stream never "finishes": shutdown must not wait for it
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        head = (f"HTTP/1.1 200 OK\r\nServer: {SERVER_HEADER}\r\nDate: {_http_date()}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n"
                "X-Content-Type-Options: nosniff\r\n"
                + ("Transfer-Encoding: chunked\r\n" if chunked else "Connection: close\r\n")
                + "\r\n")
        self.wfile.write(head.encode("latin-1"))
        self._status = 200
        try:
            if chunks is None:
                assert opener is not None
                if not opener.wait_or_hangup(self.request):
                    self.close_connection = True
                    return
                chunks = opener.result()
            for c in chunks:
                if not c:
                    continue
                self.wfile.write(b"%x\r\n%b\r\n" % (len(c), c) if chunked else c)
                self._bytes += len(c)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:
            # Headers are gone: cut the stream without its terminator so the client sees it broke.
            log.exception("log stream failed path=%s", self.path[:300])
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            if opener is not None:
                opener.abandon()

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


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], agent: Agent, config: AgentConfig,
                 tokens: TokenStore, ssl_context: ssl.SSLContext | None) -> None:
        self.agent = agent
        self.config = config
        self.tokens = tokens
        self.ssl_context = ssl_context
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._busy_lock = threading.Lock()
        self._busy = 0
        self.health_cache: tuple[dict[str, Any], bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
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

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(sock)
            else:
                self._conns.discard(sock)

    def busy(self, delta: int) -> None:
        with self._busy_lock:
            self._busy += delta

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Cap open connections (a thread each): beyond it, a 503 and close."""
        if len(self._conns) < MAX_CONNECTIONS:
            return True
        with contextlib.suppress(OSError):
            request.send(_BUSY_RESPONSE, socket.MSG_DONTWAIT)
        log.warning("connection refused peer=%s reason=too_many_connections open=%d",
                    client_address[0], len(self._conns))
        return False

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error peer=%r", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="mcp-http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting, let requests in progress finish (bounded), drop idle connections."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            super().shutdown()
            self._thread.join()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self._busy > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._conns_lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.server_close()


def serve(agent: Agent, config: AgentConfig, *, tokens: TokenStore | None = None) -> AgentServer:
    """Bind, make sure a token exists, and serve in a background thread."""
    host, port = check_listen(config)
    ctx = tls_context(config)
    store = tokens if tokens is not None else TokenStore.for_config(config)
    store.ensure_initial(token_file_path(config))
    try:
        srv = AgentServer((host, port), agent, config, store, ctx)
    except OSError as exc:
        raise MCPError(f"cannot listen on {config.server.listen}: {exc}") from exc
    srv.start()
    log.info("listening url=%s tokens_file=%s", srv.url, store.path)
    return srv
