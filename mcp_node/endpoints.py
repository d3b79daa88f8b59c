"""The API's endpoints, on top of the connection handling in ``handler``: ``h_call``
serves every operation of ``optable.OPS`` from its declared arguments; streams, the
cached health answer and the server's own documents have an ``h_<name>`` of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from . import openapi
from .errors import MCPError
from .handler import Handler
from .httpapi import (
    END,
    ChunkPump,
    Params,
    StreamPump,
    client_gone,
    close_iterator,
    hangup_poller,
    parse_bool,
    parse_count,
)
from .opdecode import decode
from .optable import answer
from .redact import for_role
from .servicedef import check_name
from .wire import SERVER_HEADER, dumps, http_date, log_safe

log = logging.getLogger("mcp_node.server")


FOLLOW_HEADERS_AFTER_S = 1.0
HANGUP_CHECK_S = 0.5          # a follow stream notices its client gone within about this



class APIHandler(Handler):
    # -- endpoints -----------------------------------------------------------------

    def h_health(self, params: Params, query: dict[str, str], body: bytes) -> None:
        # The hot path: the view changes at most once a second, so comparing the dict
        # with the last one is cheaper than serialising it again.
        data = self.agent.health()
        last = self.server.health_cache
        if last is None or last[0] != data:
            last = self.server.health_cache = (data, dumps(data))
        self._send(200, last[1])

    def h_call(self, params: Params, query: dict[str, str], body: bytes) -> None:
        """Every operation without an endpoint of its own (``optable``)."""
        op = self._route.op
        kwargs = decode(op, params, query, body)
        result = answer(op, kwargs, getattr(self.agent, op.call)(**kwargs))
        if op.redact:   # env values are operator data (issue 20)
            result = for_role(self._token.role if self._token else None, result)
        self._send_json(result)

    def h_openapi(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send(200, openapi.document_bytes())

    def h_events(self, params: Params, query: dict[str, str], body: bytes) -> None:
        kwargs = decode(self._route.op, params, query, body)
        # after: resume a broken follow after the last event seen (mcp events -f)
        after = min(parse_count(query.get("after") or "0", "after", 10**19 - 1), 2**63 - 1)
        if parse_bool(query.get("follow", ""), "follow"):
            opened = self.agent.event_stream(**kwargs, after=after)
            self._follow_stream(lambda: opened, "application/x-ndjson")
            return
        self._send_json(self.agent.events(**kwargs))

    def h_livez(self, params: Params, query: dict[str, str], body: bytes) -> None:
        self._send_json({"status": "up"})

    def h_metrics(self, params: Params, query: dict[str, str], body: bytes) -> None:
        from .metrics import CONTENT_TYPE, render

        self._send(200, render(self.server.metrics), CONTENT_TYPE)

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
        since = query.get("since") or None     # checked by the agent (logtime.parse_since)
        stamps = parse_bool(query.get("timestamps", ""), "timestamps")
        if follow:
            self._follow_stream(lambda: self.agent.logs(name, component, tail, True, since,
                                                        stamps), "text/plain; charset=utf-8")
            return
        # Streamed as read (at most server.max_log_bytes, see logtail), never joined in
        # memory; an error before the first chunk is still a JSON error.
        chunks = self.agent.logs(name, component, tail, False, since, stamps)
        try:
            first = next(chunks, None)
            self._stream(ChunkPump(first, chunks), "text/plain; charset=utf-8")
        finally:
            close_iterator(chunks)

    def _follow_stream(self, open_stream: Callable[[], Iterator[bytes]], ctype: str) -> None:
        """Errors raised at once still become JSON errors; after a short wait the 200
        headers go out anyway, since podman answers a follow request only when the
        first line arrives (the client would otherwise see nothing at all). A token past
        ``server.max_streams_per_token`` gets 503 before anything is opened."""
        token = self._token.name if self._token else ""
        self.server.stream_begin(token)
        pump: StreamPump | None = None
        try:
            pump = StreamPump(open_stream)
            self.server.stream(pump, True)
            if pump.opened.wait(FOLLOW_HEADERS_AFTER_S) and pump.open_error is not None:
                raise pump.open_error
            self._stream(pump, ctype)
        finally:
            if pump is not None:
                pump.stop()
            self.server.stream_end(pump, token)

    def _stream(self, pump: StreamPump | ChunkPump, ctype: str) -> None:
        """Chunks as they come; between them, whether the client is still there, so a
        stream of a quiet component ends (and frees its thread and connection) within
        about ``HANGUP_CHECK_S`` of its client leaving."""
        self._not_busy()  # a follow stream never "finishes": shutdown must not wait for it
        chunked = self.request_version == "HTTP/1.1"
        self.close_connection = True  # unless the stream ends cleanly below
        head = (f"HTTP/1.1 200 OK\r\nServer: {SERVER_HEADER}\r\nDate: {http_date()}\r\n"
                f"Content-Type: {ctype}\r\nCache-Control: no-store\r\n"
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
