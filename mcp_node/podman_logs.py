"""Reading podman's multiplexed log streams, including follow streams that another
thread may need to end (a consumer hung up while the reader is blocked)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import urllib3

from .errors import MCPError

log = logging.getLogger("mcp_node.podman")


_STREAM_ENDED = (OSError, ValueError, AttributeError, urllib3.exceptions.HTTPError,
                 http.client.HTTPException)


def frames(resp: Any) -> Iterator[bytes]:
    """Payloads of podman's multiplexed log stream (8-byte header: stream, 0, 0, 0, length)."""
    try:
        raw = resp.raw
        while True:
            header = raw.read(8)
            if len(header) < 8:
                return
            (length,) = struct.unpack(">4xL", header)
            if length:
                data = raw.read(length)
                if not data:
                    return
                yield data
    except _STREAM_ENDED as exc:   # includes a close() from another thread
        log.debug("podman: log stream ended: %s", exc)
    finally:
        resp.close()


class LogStream:
    """A follow stream whose request may still be waiting for podman's first line.

    podman sends no headers for a follow request until the container writes, so
    the request runs in an opener thread. ``close()`` from any thread ends it:
    ``__next__`` waits in short steps and gives up once closed, and the opener's
    own connection (``cancel``, where we hold the socket) is shut down, so no
    thread of ours or podman's is left waiting for a line that may never come.
    """

    WAIT_STEP_S = 0.25

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._resp: Any = None
        self._exc: MCPError | None = None
        self._closed = False
        self._frames: Iterator[bytes] | None = None
        self._cancel: Callable[[], None] | None = None

    def on_close(self, cancel: Callable[[], None]) -> None:
        """How to cut the pending request (its socket) if the stream is closed first."""
        with self._lock:
            self._cancel = cancel
            closed = self._closed
        if closed:
            cancel()

    def opened(self, resp: Any, exc: MCPError | None) -> None:
        with self._lock:
            self._resp, self._exc = resp, exc
            closed = self._closed
        self._open.set()
        if closed and resp is not None:
            _abort(resp)

    def wait_open(self, timeout: float) -> None:
        """Raise an error podman answered with at once (e.g. the container just went)."""
        if self._open.wait(timeout) and self._exc is not None:
            raise self._exc

    def __iter__(self) -> LogStream:
        return self

    def __next__(self) -> bytes:
        if self._frames is None:
            while not self._open.wait(self.WAIT_STEP_S):
                if self._closed:
                    raise StopIteration
            if self._exc is not None:
                raise self._exc
            if self._closed or self._resp is None:
                raise StopIteration
            self._frames = frames(self._resp)
        if self._closed:
            raise StopIteration
        return next(self._frames)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            resp, cancel = self._resp, self._cancel
        if resp is not None:
            _abort(resp)
        elif cancel is not None:
            cancel()


def _abort(resp: Any) -> None:
    """Close a streaming response from another thread: closing alone does not wake a
    thread blocked reading it, shutting the socket down does."""
    conn = getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    resp.close()


class UnixFollow:
    """A follow request on a unix-socket connection of our own (not the shared client's
    pool), so its socket can be shut down while podman has not answered yet."""

    def __init__(self, socket_file: str, target: str) -> None:
        self._conn = http.client.HTTPConnection("localhost", timeout=None)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(socket_file)
        sock.settimeout(None)
        self._conn.sock = sock
        self._sock = sock
        self.target = target

    def open(self) -> http.client.HTTPResponse:
        self._conn.request("GET", self.target, headers={"Host": "d"})
        return self._conn.getresponse()

    def cancel(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()


class RawAdapter:
    """``frames`` reads ``resp.raw``; an http.client response is its own raw stream."""

    def __init__(self, resp: http.client.HTTPResponse, follow: UnixFollow) -> None:
        self.raw = resp
        self._follow = follow

    def close(self) -> None:
        self._follow.cancel()


def k8s_log_path(attrs: dict[str, Any]) -> Path | None:
    """The container's log file, if podman keeps it as a ``k8s-file`` we may read: then the
    agent reads its end itself (``logtail``), since podman answers ``tail=N`` from
    memory (a 70 MB log took podman to 1.69 GB for six readers). None (journald, or
    a file we may not open): ask podman."""
    conf = (attrs.get("HostConfig") or {}).get("LogConfig") or {}
    path = conf.get("Path") or attrs.get("LogPath") or ""
    if conf.get("Type") != "k8s-file" or not isinstance(path, str) or not path.startswith("/"):
        return None
    return Path(path) if os.access(path, os.R_OK) else None


def still_running(attrs: dict[str, Any] | None) -> bool:
    """Whether a follow read goes on: podman's own follow ends when the container does."""
    state = (attrs or {}).get("State") or {}
    return bool(state.get("Running")) or state.get("Status") in ("running", "paused",
                                                                   "stopping")
