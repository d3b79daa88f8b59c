"""/metrics is bounded by construction (issue 16): whatever method, path or request line a
client sends, without a token, the request counter's labels come from closed sets, so
thousands of junk requests add no series. Counted with prometheus-client's own parser
against a live server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import auth_get, connect, deploy, fake_live, read_all
from prometheus_client.parser import text_string_to_metric_families
from server_env import LiveServer

from mcp_node.httpapi import ROUTES
from mcp_node.metrics import METHODS, OTHER, ROUTE_NAMES


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with fake_live(tmp_path) as srv:
        deploy(srv)
        yield srv


def series(live: LiveServer) -> tuple[int, set[tuple[str, str, str]]]:
    """(every sample of every family, the request counter's label sets)."""
    s = connect(live)
    s.sendall(auth_get(live, "/metrics", "reader", b"Connection: close\r\n"))
    head, _, body = read_all(s).partition(b"\r\n\r\n")
    s.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    fams = list(text_string_to_metric_families(body.decode()))
    labels = {(x.labels["method"], x.labels["route"], x.labels["status"])
              for f in fams if f.name == "mcp_http_requests" for x in f.samples}
    return sum(len(f.samples) for f in fams), labels


def junk(i: int) -> bytes:
    """Four kinds of request nobody routes, each unique per ``i``."""
    kind = i % 4
    if kind == 0:   # a malformed request line: its method used to be the whole line
        return f"BAD{i} /x{i}\r\n\r\n".encode()
    if kind == 1:   # a made-up method on a path no route has
        return f"M{i} /nope/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    if kind == 2:   # a made-up method on a real route: 405
        return f"X{i} /v1/health HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return f"GET /v1/unknown/{i}/{'a' * (i % 50)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def send(live: LiveServer, data: bytes) -> bytes:
    s = connect(live)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)
    finally:
        s.close()


def test_junk_requests_add_no_series(live: LiveServer) -> None:
    for i in range(8):            # every kind once: their ``other`` series exist from here
        assert send(live, junk(i)).startswith(b"HTTP/1.1 4")
    series(live)                  # the scrape's own series, too
    before, labels_before = series(live)
    statuses = set()
    for i in range(8, 3008):
        answer = send(live, junk(i))
        statuses.add(answer[9:12])
    assert statuses == {b"400", b"404", b"405"}
    after, labels = series(live)
    assert after == before, (before, after, sorted(labels - labels_before)[:5])
    assert {m for m, _, _ in labels} <= METHODS | {OTHER}
    assert {r for _, r, _ in labels} <= ROUTE_NAMES | {OTHER}
    assert (OTHER, OTHER, "400") in labels and ("GET", OTHER, "404") in labels
    assert (OTHER, OTHER, "405") in labels
    assert ("GET", "/metrics", "200") in labels    # real routes keep their names


def test_label_sets_are_the_tables() -> None:
    assert {r.method for r in ROUTES} <= METHODS
    assert {r.template for r in ROUTES} == ROUTE_NAMES
