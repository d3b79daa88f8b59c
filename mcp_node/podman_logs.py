"""Reading podman's multiplexed log streams, including follow streams that another
thread may need to end (a consumer hung up while the reader is blocked)."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import urllib3

from .errors import MCPError

log = logging.getLogger("mcp_node.podman")


_STREAM_ENDED = (OSError, ValueError, AttributeError, urllib3.exceptions.HTTPError)


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
    """A follow stream whose request may still be waiting for podman's first line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._resp: Any = None
        self._exc: MCPError | None = None
        self._closed = False
        self._frames: Iterator[bytes] | None = None

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
            self._open.wait()
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
            resp = self._resp
        if resp is not None:
            _abort(resp)


def _abort(resp: Any) -> None:
    """Close a streaming response from another thread: closing alone does not wake a
    thread blocked reading it, shutting the socket down does."""
    conn = getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    resp.close()
