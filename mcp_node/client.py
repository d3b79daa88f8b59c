"""HTTP client of the agent's JSON API (used by the ``mcp`` CLI and the tests).

HTTP/1.1 on a plain socket rather than ``http.client``: every ``mcp`` run pays
for its imports before its request leaves, and ``http.client`` (with the email
parser it reads headers with) costs more than the rest of the call. The agent
answers with a Content-Length body, or a chunked one for streams; both are read
here, within bounds (a head of at most 64 KiB, chunk sizes parsed strictly).

One keep-alive connection per Client, reused across calls; a connection the
agent closed while idle is re-opened once transparently. HTTP errors come
back as RemoteError carrying the agent's own status, code and message, so
the CLI reports exactly what the agent said.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from . import __version__
from .errors import AgentUnreachable, RemoteError, ValidationError

if TYPE_CHECKING:
    import ssl

USER_AGENT = f"mcp-client/{__version__}"
_SAFE_PATH = "/?&=%:@,+;!$'()*~-._"
MAX_HEAD = 64 << 10          # status line and headers of one response
MAX_CHUNK_LINE = 1024
READ_SIZE = 65536


class Response:
    """Status, headers (names lower-cased) and framing of one response."""

    __slots__ = ("status", "reason", "headers", "will_close")

    def __init__(self, status: int, reason: str, headers: dict[str, str],
                 will_close: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.will_close = will_close

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def length(self) -> int | None:
        """The Content-Length, 0 for a response that has no body, None: until close."""
        if self.status in (204, 304) or 100 <= self.status < 200:
            return 0
        raw = self.headers.get("content-length")
        if raw is None or self.chunked:
            return None
        if not raw.strip().isdigit():
            raise ConnectionError(f"bad Content-Length {raw[:40]!r}")
        return int(raw)


def read_head(f: io.BufferedReader) -> Response | None:
    """The status line and headers; None when the peer closed before a byte (on a
    reused keep-alive connection: the agent had closed it while idle)."""
    size = 0
    lines: list[bytes] = []
    while True:
        line = f.readline(MAX_HEAD + 1)
        size += len(line)
        if not line:
            if not lines:
                return None
            raise ConnectionError("closed in a response head")
        if size > MAX_HEAD:
            raise ConnectionError(f"response head over {MAX_HEAD} bytes")
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue
        lines.append(line)
    version, _, rest = lines[0].decode("latin-1").rstrip("\r\n").partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ConnectionError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise ConnectionError(f"bad header line {raw[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    conn = headers.get("connection", "").lower()
    will_close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
    return Response(int(code), reason, headers, will_close)


def body_parts(f: io.BufferedReader, resp: Response) -> Iterator[bytes]:
    """The body as it arrives: chunk by chunk, or in reads of up to 64 KiB."""
    if resp.chunked:
        while True:
            line = f.readline(MAX_CHUNK_LINE + 1)
            if not line:   # what a restarted or killed agent's end of a stream looks like
                raise ConnectionError("the agent closed the connection mid-stream")
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not size or any(c not in b"0123456789abcdefABCDEF"
                                                          for c in size):
                raise ConnectionError(f"bad chunk size line {line[:40]!r}")
            n = int(size, 16)
            if n == 0:
                while f.readline(MAX_CHUNK_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass            # trailers: none expected, none kept
                return
            data = f.read(n)
            if len(data) < n or f.readline(3) not in (b"\r\n", b"\n"):
                raise ConnectionError("closed in a chunk")
            yield data
    left = resp.length
    while left is None or left > 0:
        data = f.read1(READ_SIZE if left is None else min(left, READ_SIZE))
        if not data:
            if left is not None:
                raise ConnectionError("closed in a body")
            return
        if left is not None:
            left -= len(data)
        yield data


def _closed() -> Response:
    """Closed before answering: what a stale keep-alive connection does (retried once)."""
    raise ConnectionResetError("the agent closed the connection without answering")


class Conn:
    """One connection to the agent: the socket and a buffered reader on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file: io.BufferedReader = sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Client:
    def __init__(self, base_url: str, token: str | None, *, ca_file: str | None = None,
                 timeout: float = 60) -> None:
        parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError(f"{base_url!r} is not an http(s) URL", "agent")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        try:
            self._port = parts.port or (443 if self._https else 80)
        except ValueError as exc:
            raise ValidationError(f"{base_url!r}: bad port", "agent") from exc
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = 443 if self._https else 80
        self._host_header = host if self._port == default else f"{host}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._ctx: ssl.SSLContext | None = None
        if self._https:
            import ssl  # only for https: an http call need not load OpenSSL

            self._ctx = ssl.create_default_context(cafile=ca_file)
        self._conn: Conn | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------

    def _connect(self, timeout: float | None) -> Conn:
        # An ASCII host goes to getaddrinfo as bytes (it takes them, whatever typeshed
        # says): a str is IDNA-encoded first, and importing that codec (with stringprep
        # and unicodedata) was ~1 ms of each mcp call.
        host = self._host.encode() if self._host.isascii() else self._host
        sock = socket.create_connection((host, self._port), timeout)  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                sock = self._ctx.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        return Conn(sock)

    def _head(self, method: str, url: str, body: bytes | None) -> bytes:
        lines = [f"{method} {url} HTTP/1.1", f"Host: {self._host_header}",
                 f"User-Agent: {USER_AGENT}", "Accept: application/json"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _url(self, path: str, params: dict[str, Any] | None) -> str:
        url = self._prefix + quote(path if path.startswith("/") else "/" + path, safe=_SAFE_PATH)
        if params:
            query = urlencode({k: v for k, v in params.items() if v is not None})
            if query:
                url += ("&" if "?" in url else "?") + query
        return url

    def _unreachable(self, exc: BaseException) -> AgentUnreachable:
        what = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else str(exc)
        return AgentUnreachable(
            f"the agent is not reachable at {self.base_url}: {what}; is mcp-agent running "
            "there? (start it with `mcp-agent`, or point --agent, $MCP_AGENT or the [[nodes]] "
            "of mcp.toml at it)")

    @staticmethod
    def _error(resp: Response, raw: bytes) -> RemoteError:
        try:
            err = json.loads(raw)["error"]
            return RemoteError(resp.status, str(err["code"]), str(err["message"]))
        except (ValueError, KeyError, TypeError):
            text = raw[:300].decode("utf-8", "replace").strip() or resp.reason
            return RemoteError(resp.status, f"http_{resp.status}", text)

    def request(self, method: str, path: str, body: Any = None, *,
                params: dict[str, Any] | None = None) -> Any:
        """Send one request on the shared connection; decoded JSON (or text) back."""
        data = None if body is None else json.dumps(body).encode()
        head = self._head(method, self._url(path, params), data)
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                try:
                    if self._conn is None:
                        self._conn = self._connect(self.timeout)
                    self._conn.sock.sendall(head + data if data else head)
                    resp = read_head(self._conn.file) or _closed()
                    raw = b"".join(body_parts(self._conn.file, resp))
                except (BrokenPipeError, ConnectionResetError) as exc:
                    self.close_connection()
                    if reused and attempt == 0:
                        continue
                    raise self._unreachable(exc) from exc
                except (OSError, ValueError) as exc:
                    self.close_connection()
                    raise self._unreachable(exc) from exc
                if resp.will_close or resp.length is None:
                    self.close_connection()
                break
        if resp.status >= 400:
            raise self._error(resp, raw)
        ctype = resp.headers.get("content-type", "")
        if not raw:
            return None
        if ctype.startswith("application/json"):
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise RemoteError(resp.status, "bad_response",
                                  f"the agent sent invalid JSON: {exc}") from exc
        return raw.decode("utf-8", "replace")

    def close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    close = close_connection

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ----------------------------------------------------------------

    def get(self, path: str, *, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, *,
             params: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, {} if body is None else body, params=params)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def stream(self, path: str, *, params: dict[str, Any] | None = None,
               idle_timeout: float | None = None) -> Iterator[bytes]:
        """GET ``path`` on a connection of its own and yield the body as it arrives.

        Errors before the body starts are raised at the call (not on the first
        ``next``). After the headers the socket waits ``idle_timeout`` between
        chunks (None: forever, as ``logs -f`` must).
        """
        try:
            conn = self._connect(self.timeout)
        except OSError as exc:
            raise self._unreachable(exc) from exc
        try:
            conn.sock.sendall(self._head("GET", self._url(path, params), None))
            resp = read_head(conn.file) or _closed()
            if resp.status >= 400:
                raise self._error(resp, b"".join(body_parts(conn.file, resp)))
            conn.sock.settimeout(idle_timeout)
        except (OSError, ValueError) as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        except BaseException:
            conn.close()
            raise
        return self._chunks(conn, resp)

    def _chunks(self, conn: Conn, resp: Response) -> Iterator[bytes]:
        try:
            parts = body_parts(conn.file, resp)
            while True:
                try:
                    chunk = next(parts, b"")
                except (OSError, ValueError) as exc:
                    raise AgentUnreachable(
                        f"the stream from {self.base_url} broke off: {exc}") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()
