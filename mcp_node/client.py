"""HTTP client of the agent's JSON API (used by the ``mcp`` CLI and the tests).

One keep-alive connection per Client, reused across calls; a connection the
agent closed while idle is re-opened once transparently. HTTP errors come
back as RemoteError carrying the agent's own status, code and message, so
the CLI reports exactly what the agent said.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from . import __version__
from .errors import AgentUnreachable, MCPError, RemoteError, ValidationError

USER_AGENT = f"mcp-client/{__version__}"
_SAFE_PATH = "/?&=%:@,+;!$'()*~-._"


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          http.client.CannotSendRequest, http.client.ResponseNotReady)


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
        self._prefix = parts.path.rstrip("/")
        self._ctx: ssl.SSLContext | None = None
        if self._https:
            self._ctx = ssl.create_default_context(cafile=ca_file)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ctx)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        h = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            h["Content-Type"] = "application/json"
        return h

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
    def _error(resp: http.client.HTTPResponse, raw: bytes) -> RemoteError:
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
        url = self._url(path, params)
        headers = self._headers(data)
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = self._connect(self.timeout)
                try:
                    self._conn.request(method, url, body=data, headers=headers)
                    resp = self._conn.getresponse()
                    raw = resp.read()
                except _STALE as exc:
                    self.close_connection()
                    if reused and attempt == 0:
                        continue
                    raise self._unreachable(exc) from exc
                except (OSError, http.client.HTTPException) as exc:
                    self.close_connection()
                    raise self._unreachable(exc) from exc
                if resp.will_close:
                    self.close_connection()
                break
        if resp.status >= 400:
            raise self._error(resp, raw)
        ctype = resp.getheader("Content-Type", "")
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

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def stream(self, path: str, *, params: dict[str, Any] | None = None,
               idle_timeout: float | None = None) -> Iterator[bytes]:
        """GET ``path`` on a connection of its own and yield the body as it arrives.

        Errors before the body starts are raised at the call (not on the first
        ``next``). After the headers the socket waits ``idle_timeout`` between
        chunks (None: forever, as ``logs -f`` must).
        """
        conn = self._connect(self.timeout)
        try:
            conn.request("GET", self._url(path, params), headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise self._error(resp, resp.read())
            if conn.sock is not None:
                conn.sock.settimeout(idle_timeout)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        except BaseException:
            conn.close()
            raise
        return self._chunks(conn, resp)

    def _chunks(self, conn: http.client.HTTPConnection,
                resp: http.client.HTTPResponse) -> Iterator[bytes]:
        try:
            while True:
                try:
                    chunk = resp.read1(65536)
                except (OSError, http.client.HTTPException) as exc:
                    raise MCPError(f"the stream from {self.base_url} broke off: {exc}") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()
