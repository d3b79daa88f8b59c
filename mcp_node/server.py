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
import ipaddress
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
from urllib.parse import parse_qsl, unquote

from . import __version__, openapi
from .auth import Token, TokenStore, token_file_path
from .config import AgentConfig
from .errors import MCPError, ValidationError
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


class HTTPError(MCPError):
    """A protocol-level refusal with its own status and code."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.close = close
        self.headers = headers


# -- listen address -------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or int(port_s) > 65535:
        raise ValidationError(f"{value!r} is not HOST:PORT", "server.listen")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValidationError(f"{value!r} has no host", "server.listen")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(config: AgentConfig) -> tuple[str, int]:
    """The bind address; a non-loopback one only with TLS (tokens must not cross a wire bare)."""
    host, port = parse_listen(config.server.listen)
    if not is_loopback(host) and not (config.server.tls_cert and config.server.tls_key):
        raise ValidationError(
            f"{config.server.listen} is not a loopback address; listening on it needs "
            "server.tls_cert and server.tls_key (HTTPS)", "server.listen")
    return ("127.0.0.1" if host == "localhost" else host), port


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    if not (config.server.tls_cert and config.server.tls_key):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValidationError(f"cannot load TLS certificate/key: {exc}",
                              "server.tls_cert") from exc
    return ctx


# -- routing ----------------------------------------------------------------------


Params = dict[str, str]


class Route:
    __slots__ = ("method", "template", "segments", "role", "handler", "query")

    def __init__(self, method: str, template: str, role: str | None, handler: str,
                 query: tuple[str, ...] = ()) -> None:
        self.method = method
        self.template = template
        self.segments = template.strip("/").split("/")
        self.role = role
        self.handler = handler
        self.query = query

    def match(self, segs: list[str]) -> Params | None:
        if len(segs) != len(self.segments):
            return None
        params: Params = {}
        for want, got in zip(self.segments, segs, strict=True):
            if want[0] == "{":
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", "reader", "h_health"),
    Route("GET", "/v1/openapi.json", None, "h_openapi"),
    Route("GET", "/v1/services", "reader", "h_ps"),
    Route("POST", "/v1/services", "operator", "h_deploy"),
    Route("GET", "/v1/services/{name}", "reader", "h_status"),
    Route("DELETE", "/v1/services/{name}", "operator", "h_undeploy"),
    Route("POST", "/v1/services/{name}/stop", "operator", "h_lifecycle"),
    Route("POST", "/v1/services/{name}/start", "operator", "h_lifecycle"),
    Route("POST", "/v1/services/{name}/restart", "operator", "h_lifecycle"),
    Route("GET", "/v1/services/{name}/logs", "reader", "h_logs",
          query=("component", "tail", "follow")),
    Route("GET", "/v1/edge-routes", "reader", "h_edge_list"),
    Route("POST", "/v1/edge-routes", "master", "h_edge_setup"),
    Route("DELETE", "/v1/edge-routes/{hostname}", "master", "h_edge_remove"),
)

_STATIC: dict[str, dict[str, Route]] = {}
for _r in ROUTES:
    if "{" not in _r.template:
        _STATIC.setdefault(_r.template, {})[_r.method] = _r
_DYNAMIC = tuple(r for r in ROUTES if "{" in r.template)


def resolve(method: str, path: str) -> tuple[Route, Params]:
    """The route for ``method path``: HTTPError 404, 405 or 400 (bad segment)."""
    by_method = _STATIC.get(path)
    params: Params = {}
    if by_method is None:
        segs = path.strip("/").split("/")
        try:
            segs = [unquote(s, errors="strict") for s in segs]
        except UnicodeDecodeError as exc:
            raise HTTPError(400, "invalid", "path is not valid UTF-8") from exc
        if any(s in (".", "..") or "/" in s or "\x00" in s for s in segs):
            raise ValidationError("path segments must not be '.', '..' or contain '/'", "path")
        by_method = {}
        for r in _DYNAMIC:
            p = r.match(segs)
            if p is not None:
                by_method[r.method] = r
                params = p
    if not by_method:
        raise HTTPError(404, "not_found", f"no such endpoint: {path[:200]}")
    route = by_method.get(method)
    if route is None:
        allow = ", ".join(sorted(by_method))
        raise HTTPError(405, "method_not_allowed", f"{method} not allowed here; use {allow}",
                        headers=(("Allow", allow),))
    return route, params


# -- request helpers -----------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _error_body(code: str, message: str) -> bytes:
    return _dumps({"error": {"code": code, "message": message}})


def parse_json(body: bytes) -> Any:
    if not body:
        raise ValidationError("request body is empty; expected JSON", "body")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValidationError("request body is not UTF-8", "body") from exc
    except RecursionError as exc:
        raise ValidationError("request body is nested too deeply", "body") from exc
    except ValueError as exc:
        raise ValidationError(f"malformed JSON: {exc}", "body") from exc


def parse_bool(value: str, field: str) -> bool:
    v = value.lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    raise ValidationError(f"{value[:40]!r} is not a boolean (true/false/1/0)", field)


def parse_query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                          errors="strict", max_num_fields=20)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"malformed query string: {exc}", "query") from exc
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in allowed:
            raise ValidationError(f"unknown query parameter {k[:40]!r}", "query")
        if k in out:
            raise ValidationError(f"query parameter {k!r} given twice", "query")
        out[k] = v
    return out


def edge_setup_args(data: Any) -> tuple[str, str, int, bool]:
    if not isinstance(data, dict):
        raise ValidationError("must be an object", "body")
    unknown = sorted(set(data) - {"hostname", "backend_hostname", "backend_port", "backend_tls"})
    if unknown:
        raise ValidationError("unknown key", str(unknown[0])[:40])
    hostname = check_hostname(data.get("hostname"), "hostname")
    backend = check_hostname(data.get("backend_hostname"), "backend_hostname")
    port = data.get("backend_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValidationError("must be an integer 1-65535", "backend_port")
    tls = data.get("backend_tls", True)
    if not isinstance(tls, bool):
        raise ValidationError("must be a boolean", "backend_tls")
    return hostname, backend, port, tls


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
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
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

    def handle_one_request(self) -> None:
        self._status, self._bytes, self._token = 0, 0, None
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        try:
            head = self._read_head()
        except HTTPError as exc:
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
        self.server.busy(1)
        try:
            self._dispatch(method, target, headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
            self.close_connection = True
        finally:
            self.server.busy(-1)
            self._log(method, target, started)

    def _log(self, method: str, target: str, started: float) -> None:
        if log.isEnabledFor(logging.INFO):
            path = target if target.isprintable() else repr(target)
            tok = self._token.name if self._token else "-"
            log.info("http method=%s path=%s status=%d bytes=%d ms=%.2f token=%s peer=%s",
                     method[:16], path[:300], self._status, self._bytes,
                     (time.perf_counter() - started) * 1000, tok, self.client_address[0])

    def _dispatch(self, method: str, target: str, headers: dict[str, str]) -> None:
        body_pending = "content-length" in headers or "transfer-encoding" in headers
        try:
            if not target.startswith("/"):
                raise HTTPError(400, "bad_request", "request target must be a path", close=True)
            path, _, query = target.partition("?")
            route, params = resolve(method, path)
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
                self.close_connection = True  # unread body left on the wire
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
        self._send_json(self.agent.health())

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
        op = self.path.partition("?")[0].rstrip("/").rsplit("/", 1)[1]
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
        chunks = self.agent.logs(name, component, tail, follow)
        if not follow:
            buf, size = [], 0
            for c in chunks:
                buf.append(c)
                size += len(c)
                if size > MAX_LOG_BYTES:
                    raise ValidationError(f"more than {MAX_LOG_BYTES} bytes; use tail", "tail")
            self._send(200, b"".join(buf), "text/plain; charset=utf-8")
            return
        self._stream(chunks)

    def _stream(self, chunks: Iterator[bytes]) -> None:
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
        self._cv = threading.Condition()
        self._busy = 0
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
        with self._cv:
            if add:
                self._conns.add(sock)
            else:
                self._conns.discard(sock)

    def busy(self, delta: int) -> None:
        with self._cv:
            self._busy += delta
            if self._busy == 0:
                self._cv.notify_all()

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
        with self._cv:
            self._cv.wait_for(lambda: self._busy == 0, timeout=SHUTDOWN_GRACE_S)
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
