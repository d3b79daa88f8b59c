"""Follow streams against a real quiet container: a client that leaves frees the
stream, its threads and its connection slot without the component logging again."""

from __future__ import annotations

import threading
import uuid

import pytest
from live_server import connect, wait_until
from server_env import LiveServer

from mcp_node.httpapi import StreamPump


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


# tail=0: podman answers such a follow request only at the next line, so the request is
# still pending when the client leaves; closing the stream must cut it all the same.
@pytest.mark.parametrize("tail", ["", "&tail=0"])
def test_follow_stream_ends_when_its_client_leaves(live_server: LiveServer, hello_image: str,
                                                   tail: str) -> None:
    name = f"s{uuid.uuid4().hex[:8]}"
    live_server.client().post("/v1/services", {"name": name, "components": [
        {"name": "web", "image": hello_image, "routes": [{"port": 8080}]}]})
    srv = live_server.server
    podman_threads = len(_threads("podman-logs-"))
    s = connect(live_server)
    s.sendall(f"GET /v1/services/{name}/logs?follow=1{tail} HTTP/1.1\r\nHost: x\r\n"
              f"Authorization: Bearer {live_server.token('reader')}\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")  # the headers, then silence
    wait_until(lambda: len(srv.open_streams) == 1, "the stream registered")
    [pump] = srv.open_streams
    assert isinstance(pump, StreamPump) and pump.thread.is_alive()
    assert srv.open_connections == 1
    s.close()
    wait_until(lambda: not srv.open_streams, "stream released after the client left")
    wait_until(lambda: srv.open_connections == 0, "connection slot released")
    wait_until(lambda: not pump.thread.is_alive(), "pump thread ended")
    wait_until(lambda: len(_threads("podman-logs-")) <= podman_threads,
               "podman's log request ended")
    # the component never logged meanwhile, and the server still answers
    assert live_server.client().get("/v1/health")["status"] in ("healthy", "degraded")
