"""Routing table, listen-address rules and request parsing of the HTTP API.

Pure functions and small classes kept apart from ``server.py`` (the wire
protocol and handlers) so that they can be unit-tested without sockets.
"""

from __future__ import annotations

import ipaddress
import queue
import select
import socket
import ssl
import threading
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from .config import AgentConfig
from .errors import HTTPError, ValidationError
from .optable import OPS, Op
from .safetext import loads_json
from .servicedef import check_hostname, check_int

if TYPE_CHECKING:
    pass


# -- numbers ----------------------------------------------------------------------


def is_ascii_digits(text: str, max_len: int) -> bool:
    """``str.isdigit`` alone accepts any Unicode digit ('²', '٣'), which ``int()`` then
    refuses or reads in another script: wire numbers are ASCII 0-9 only."""
    return 0 < len(text) <= max_len and text.isascii() and text.isdigit()


def parse_count(text: str, field: str, maximum: int, unit: str = "") -> int:
    """A non-negative decimal integer up to ``maximum``; ValidationError naming ``field``."""
    if not is_ascii_digits(text, 19):
        raise ValidationError(f"{text[:20]!r} is not a non-negative integer", field)
    value = int(text)
    if value > maximum:
        raise ValidationError(f"{value} is above the limit of {maximum}{unit}", field)
    return value


# -- listen address -------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not is_ascii_digits(port_s, 5) or int(port_s) > 65535:
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
    __slots__ = ("method", "template", "segments", "role", "handler", "query", "op")

    def __init__(self, method: str, template: str, role: str | None, handler: str,
                 query: tuple[str, ...] = (), op: Op | None = None) -> None:
        self.op: Op = op or Op(handler, method, template, role, handler=handler)
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


# Every route, from the one table (optable): its query keys are its query arguments
# and whatever else it declares.
ROUTES: tuple[Route, ...] = tuple(
    Route(op.verb, op.path, op.role, op.handler,
          tuple(a.name for a in op.args if a.where == "query") + op.query, op)
    for op in OPS)

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


def parse_json(body: bytes) -> Any:
    """The body as JSON, read as ``mcp`` reads a definition file (safetext): a key given
    twice is refused, and so is nesting deeper than ``safetext.MAX_DEPTH``."""
    if not body:
        raise ValidationError("request body is empty; expected JSON", "body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("request body is not UTF-8", "body") from exc
    return loads_json(text, "body")


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
    port = check_int(data.get("backend_port"), "backend_port")
    if not 1 <= port <= 65535:
        raise ValidationError("must be an integer 1-65535", "backend_port")
    tls = data.get("backend_tls", True)
    if not isinstance(tls, bool):
        raise ValidationError("must be a boolean", "backend_tls")
    return hostname, backend, port, tls


END = object()  # LogPump.get: the stream ended


class StreamPump:
    """A follow stream (logs, events) read in a thread of its own and handed over a
    bounded queue.

    ``agent.logs(..., follow=True)`` may block before its first chunk, and a quiet
    component yields nothing for hours: a request thread blocked in it would never see
    its client leave. The request thread instead waits on ``get`` with a timeout,
    checks its client in between, and calls ``stop`` once it is gone. An iterator with
    a thread-safe ``close`` (podman's ``LogStream``) is closed there and then, which
    wakes the pump; a generator may only be closed by the thread running it, so the
    pump closes it after its next chunk.
    """

    POLL_S = 0.25

    def __init__(self, open_stream: Callable[[], Iterator[bytes]], depth: int = 64) -> None:
        self.opened = threading.Event()
        self.open_error: BaseException | None = None
        self.stream_error: BaseException | None = None
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._it: Iterator[bytes] | None = None
        self.thread = threading.Thread(target=self._run, args=(open_stream,),
                                       name="mcp-follow", daemon=True)
        self.thread.start()

    def _run(self, open_stream: Callable[[], Iterator[bytes]]) -> None:
        try:
            it = open_stream()
        except BaseException as exc:  # handed to the request thread
            self.open_error = exc
            self.opened.set()
            self._put(END)
            return
        with self._lock:
            self._it = it
        self.opened.set()
        try:
            if not self._stopped.is_set():
                for chunk in it:
                    if not self._put(chunk):
                        break
        except Exception as exc:  # handed to the request thread, which logs it
            self.stream_error = exc
        finally:
            close_iterator(it)
            self._put(END)

    def _put(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=self.POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, timeout: float) -> bytes | object | None:
        """The next chunk, ``END`` once the stream ended, or None if nothing came in time."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            it = self._it
        if it is not None and not isinstance(it, types.GeneratorType):
            close_iterator(it)


class ChunkPump:
    """A bounded answer's chunks (a log read without follow) handed to the same writer as
    a follow stream's, read in the request thread itself: each is at hand at once."""

    open_error: BaseException | None = None

    def __init__(self, first: bytes | None, rest: Iterator[bytes]) -> None:
        self._first, self._rest = first, rest
        self.stream_error: BaseException | None = None

    def get(self, timeout: float) -> bytes | object | None:
        if self._first is not None:
            out, self._first = self._first, None
            return out
        try:
            return next(self._rest)
        except StopIteration:
            return END
        except Exception as exc:  # handed to the writer, which logs it and cuts the stream
            self.stream_error = exc
            return END


def close_iterator(it: Iterator[bytes]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def client_gone(poller: select.poll) -> bool:
    """True once the client hung up (FIN, RST, or our own shutdown of the socket).

    Polls for POLLRDHUP only, not POLLIN: a client that pipelined its next request
    is still there. ``poll``, not ``select``: descriptors above 1023 are common here.
    """
    return any(ev & _HANGUP for _, ev in poller.poll(0))


_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def hangup_poller(sock: socket.socket) -> select.poll:
    p = select.poll()
    p.register(sock.fileno(), select.POLLRDHUP)
    return p
