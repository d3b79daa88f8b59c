"""The HTTP server against hostile or broken clients, over in-memory runtimes (no podman):
deadlines, connection caps, strict parsing of numbers and headers, follow streams that
end when their client leaves, and access lines that cannot forge the log."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import auth_get, connect, deploy, fake_live, read_all, wait_until
from server_env import LiveServer, raw_http

from mcp_node.errors import ValidationError
from mcp_node.httpapi import ROUTES, is_ascii_digits, parse_count, parse_json
from mcp_node.wire import log_safe


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the tests that need no config of their own (each start costs)."""
    with fake_live(tmp_path_factory.mktemp("live")) as srv:
        deploy(srv)
        yield srv


def status_of(data: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert m, data[:200]
    return int(m.group(1))


def dribble(s: socket.socket, data: bytes, every_s: float = 0.05) -> None:
    """Send ``data`` one byte at a time until the server answers (or closes)."""
    for b in data:
        if select.select([s], [], [], every_s)[0]:
            return
        try:
            s.send(bytes([b]))
        except OSError:
            return


# -- numbers: ASCII digits only, with ranges --------------------------------------------


def test_wire_numbers_are_ascii_digits() -> None:
    assert is_ascii_digits("0123", 4) and not is_ascii_digits("12345", 4)
    for bad in ("²", "٣", "1²", "", " 1", "+1", "-1", "0x1", "1_0"):
        assert not is_ascii_digits(bad, 10), bad
        with pytest.raises(ValidationError, match="tail"):
            parse_count(bad, "tail", 10)
    assert parse_count("10", "tail", 10) == 10
    with pytest.raises(ValidationError, match=r"tail: 11 is above the limit of 10 lines"):
        parse_count("11", "tail", 10, " lines")


@pytest.mark.parametrize("value", ["%C2%B2", "%D9%A3", "1%C2%B2", "-1", "x", "1e3"])
def test_tail_not_an_ascii_number_is_400(live: LiveServer, value: str) -> None:
    r = live.raw(auth_get(live, f"/v1/services/web/logs?tail={value}"))[0]
    assert r.status == 400, r.body
    assert r.json()["error"]["message"].startswith("tail: ")


def test_tail_is_capped(tmp_path: Path) -> None:
    with fake_live(tmp_path, max_tail=5) as live:
        deploy(live)
        r = live.raw(auth_get(live, "/v1/services/web/logs?tail=999999999", "reader"))[0]
        assert r.status == 400
        assert r.json()["error"] == {"code": "invalid", "message":
                                     "tail: 999999999 is above the limit of 5 lines "
                                     "(server.max_tail)"}
        r = live.raw(auth_get(live, "/v1/services/web/logs?tail=6&follow=1", "reader"))[0]
        assert r.status == 400 and "server.max_tail" in r.json()["error"]["message"]
        assert live.raw(auth_get(live, "/v1/services/web/logs?tail=5", "reader"))[0].status == 200
        # the agent itself refuses it too (mcp --local goes there directly)
        with pytest.raises(ValidationError, match=r"tail: 6 is not within 0-5"):
            live.agent.logs("web", None, 6, False)


@pytest.mark.parametrize("value", [b"\xb2", "٣".encode(), b"+5", b"0x10", b"5 5", b"", b"-0"])
def test_bad_content_length_is_400(live: LiveServer, value: bytes) -> None:
    head = (b"POST /v1/services HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + live.token("operator").encode() + b"\r\nContent-Length: " + value + b"\r\n\r\n{}")
    r = live.raw(head)[0]
    assert r.status == 400, r.body
    assert r.json()["error"]["message"].startswith("Content-Length ")
    assert r.headers["connection"] == "close"


# -- deadlines ----------------------------------------------------------------------------


def test_stalled_body_is_408_within_the_body_deadline(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with fake_live(tmp_path, body_timeout_s=0.5) as live, \
            caplog.at_level(logging.INFO, logger="mcp_node.server"):
        s = connect(live)
        s.sendall(b"POST /v1/services HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + live.token("operator").encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
        dribble(s, b"x" * 999)  # a byte every 50 ms: each read is quick, the body never ends
        data = read_all(s)
        s.close()
        assert status_of(data) == 408
        assert b"Connection: close" in data
        assert b"within 0.5 s (server.body_timeout_s)" in data and b"of 1000 bytes" in data
        assert not any("Traceback" in (r.exc_text or "") or r.exc_info for r in caplog.records)
        assert any("method=POST path=/v1/services status=408" in r.getMessage()
                   for r in caplog.records)
        assert live.client().get("/v1/health")  # and the server carries on


def test_slow_headers_are_408_within_the_header_deadline(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    with fake_live(tmp_path, header_timeout_s=0.5) as live, \
            caplog.at_level(logging.INFO, logger="mcp_node.server"):
        s = connect(live)
        s.sendall(b"GET /v1/health HTTP/1.1\r\n")
        dribble(s, b"X-Slow: 1\r\n" * 400)  # one header line a second would do the same
        data = read_all(s)
        s.close()
        assert status_of(data) == 408
        assert b"request headers not complete within 0.5 s (server.header_timeout_s)" in data
        assert any("method=GET path=/v1/health status=408" in r.getMessage()
                   for r in caplog.records)
        # a connection that never sends a byte is closed (silently) at the same deadline
        s = connect(live)
        assert read_all(s) == b""
        s.close()


def test_authenticated_keep_alive_may_idle_past_the_header_deadline(tmp_path: Path) -> None:
    with fake_live(tmp_path, header_timeout_s=0.3) as live:
        s = connect(live)
        f = s.makefile("rb")
        for _ in range(2):
            s.sendall(auth_get(live, "/v1/health", "reader"))
            assert f.readline().startswith(b"HTTP/1.1 200 ")
            while f.readline() not in (b"\r\n", b""):
                pass
            f.read(live.server.health_cache[1].__len__() if live.server.health_cache else 0)
            time.sleep(0.6)  # longer than the header deadline: idle, not slow
        s.close()


# -- connection caps ------------------------------------------------------------------------


def test_hundreds_of_slow_connections_do_not_lock_out_a_client(tmp_path: Path) -> None:
    """As reported: 530 connections holding a request head open made /v1/health from
    anyone else a 503 ``busy``. With the default caps a new client still gets in."""
    before = _conn_threads()
    with fake_live(tmp_path) as live:
        slow = []
        for _ in range(600):
            s = connect(live)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nX-Slow: 1\r\n")
            slow.append(s)
        r = live.raw(auth_get(live, "/v1/health", "reader"))[0]
        assert r.status == 200, r.body
        assert live.server.unauthenticated_connections <= 64  # the per-peer default
        assert _conn_threads() - before <= 3  # slow heads are read without a thread each
        for s in slow:
            s.close()


def test_idle_unauthenticated_keep_alive_holds_no_thread(tmp_path: Path) -> None:
    before = _conn_threads()
    with fake_live(tmp_path) as live:
        idle = []
        for _ in range(30):  # each answered, then kept open and silent
            s = connect(live)
            s.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            f = s.makefile("rb")
            assert f.readline().startswith(b"HTTP/1.1 200 ")
            idle.append((s, f))
        assert live.server.open_connections == 30
        assert _conn_threads() - before <= 3
        s, f = idle[0]  # and a parked connection is served again when it speaks
        while f.readline() not in (b"\r\n", b""):
            pass
        f.read(len(openapi_bytes()))
        s.sendall(auth_get(live, "/v1/health", "reader"))
        assert f.readline().startswith(b"HTTP/1.1 200 ")
        for s, f in idle:
            f.close()
            s.close()


def openapi_bytes() -> bytes:
    from mcp_node import openapi

    return openapi.document_bytes()


def _conn_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "mcp-conn")


def test_connection_threads_are_reused_and_end_with_the_server(tmp_path: Path) -> None:
    before = _conn_threads()
    with fake_live(tmp_path) as live:
        for _ in range(50):  # one connection after another: the same worker takes each
            assert live.raw(auth_get(live, "/v1/health", "reader"))[0].status == 200
        assert _conn_threads() - before <= 3
    wait_until(lambda: _conn_threads() <= before, "workers gone with their server")


def test_lingering_close_holds_no_thread(tmp_path: Path) -> None:
    """A refused upload's unread body is drained (so the answer is not lost to a reset)
    by the intake, not by a worker held for seconds per connection."""
    before = _conn_threads()
    with fake_live(tmp_path) as live:
        uploads = []
        for _ in range(20):
            s = connect(live)
            s.sendall(b"POST /v1/services HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
                      + b"x" * 30000)
            f = s.makefile("rb")
            assert f.readline().startswith(b"HTTP/1.1 401 ")
            uploads.append((s, f))
        assert _conn_threads() - before <= 3
        s, f = uploads[0]
        with contextlib.suppress(OSError):
            s.sendall(b"x" * 30000)  # the rest of the body: discarded, then closed
        while f.readline():
            pass
        for s, f in uploads:
            f.close()
            s.close()
        wait_until(lambda: live.server.open_connections == 0, "drained and closed")


def test_oldest_unauthenticated_of_a_peer_is_dropped(tmp_path: Path) -> None:
    with fake_live(tmp_path, max_unauthenticated_per_peer=4) as live:
        srv = live.server
        slow = [connect(live) for _ in range(4)]
        for s in slow:
            s.sendall(b"GET /v1/health HTTP/1.1\r\n")  # a head begun, never finished
        wait_until(lambda: srv.unauthenticated_connections == 4, "4 unauthenticated")
        newest = connect(live)
        data = read_all(slow[0])  # the oldest made room, with a clear answer
        assert status_of(data) == 503
        assert b"server.max_unauthenticated_per_peer = 4" in data
        # an authenticated client still gets in (another one dropped for it), and keeps
        # its place however many unauthenticated connections follow
        keep = connect(live)
        keep.sendall(auth_get(live, "/v1/health", "reader"))
        assert keep.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert status_of(read_all(slow[1])) == 503
        more = [connect(live) for _ in range(10)]
        wait_until(lambda: srv.open_connections <= 5, "drops down to the cap")
        keep.sendall(auth_get(live, "/v1/health", "reader"))
        assert keep.recv(65536).startswith(b"HTTP/1.1 200 ")
        # Between dropping the oldest and admitting the newest the count is one lower.
        wait_until(lambda: srv.unauthenticated_connections == 4, "the cap filled again")
        for s in (*slow, newest, keep, *more):
            s.close()
        wait_until(lambda: srv.open_connections == 0, "every connection released")


def test_global_cap_drops_from_the_heaviest_peer(tmp_path: Path) -> None:
    with fake_live(tmp_path, max_unauthenticated=4) as live:
        srv = live.server
        heavy = [connect(live, "127.0.0.2") for _ in range(3)]
        light = connect(live, "127.0.0.3")
        wait_until(lambda: srv.unauthenticated_connections == 4, "4 unauthenticated")
        light2 = connect(live, "127.0.0.3")
        assert read_all(heavy[0]) == b""  # no head begun: closed without an answer
        wait_until(lambda: srv.unauthenticated_by_peer() == {"127.0.0.2": 2, "127.0.0.3": 2},
                   "one dropped from the heaviest peer")
        for s in (*heavy, light, light2):
            s.close()


def test_connection_cap_prefers_dropping_unauthenticated(tmp_path: Path) -> None:
    with fake_live(tmp_path, max_connections=3, reserved_for_operators=0) as live:
        srv = live.server
        authed = []
        for _ in range(2):
            s = connect(live)
            s.sendall(auth_get(live, "/v1/health", "reader"))
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            authed.append(s)
        idle = connect(live)
        wait_until(lambda: srv.open_connections == 3, "3 open")
        newcomer = connect(live)
        assert read_all(idle) == b""  # dropped for the newcomer
        newcomer.sendall(auth_get(live, "/v1/health", "reader"))
        assert newcomer.recv(65536).startswith(b"HTTP/1.1 200 ")
        # all three authenticated: only now is a new connection refused
        refused = connect(live)
        data = read_all(refused)
        assert status_of(data) == 503 and b'"code":"busy"' in data
        for s in (*authed, newcomer, refused):
            s.close()


# -- follow streams --------------------------------------------------------------------------


class QuietStream:
    """A follow stream of a component that never logs; ``close`` is thread-safe (as
    podman's LogStream) and ends a ``__next__`` blocked in another thread."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def __iter__(self) -> QuietStream:
        return self

    def __next__(self) -> bytes:
        self.closed.wait()
        raise StopIteration

    def close(self) -> None:
        self.closed.set()


def _follow(live: LiveServer, stream: Any, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    rt = live.agent.runtime("container")
    monkeypatch.setattr(rt, "logs", lambda *a, **k: stream)
    s = connect(live)
    s.sendall(auth_get(live, "/v1/services/web/logs?follow=1", "reader"))
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    wait_until(lambda: len(live.server.open_streams) == 1, "stream registered")
    return s


def test_follow_stream_of_a_quiet_component_ends_when_the_client_leaves(
        live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = QuietStream()
    s = _follow(live, stream, monkeypatch)
    [pump] = live.server.open_streams
    s.close()
    wait_until(stream.closed.is_set, "the runtime's stream closed")
    wait_until(lambda: not pump.thread.is_alive(), "pump thread ended")
    wait_until(lambda: not live.server.open_streams, "stream released")
    wait_until(lambda: live.server.open_connections == 0, "connection slot released")


def test_follow_generator_frees_the_client_side_at_once(
        live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator cannot be closed from another thread: the client's thread, socket and
    slot go at once, the pump after the generator's next chunk."""
    release = threading.Event()

    def quiet() -> Generator[bytes, None, None]:
        release.wait()
        yield b"late\n"
        yield b"never read\n"

    gen = quiet()
    s = _follow(live, gen, monkeypatch)
    [pump] = live.server.open_streams
    s.close()
    wait_until(lambda: not live.server.open_streams, "stream released")
    wait_until(lambda: live.server.open_connections == 0, "connection slot released")
    assert pump.thread.is_alive()
    release.set()
    wait_until(lambda: not pump.thread.is_alive(), "pump ended after the next chunk")
    assert inspect.getgeneratorstate(gen) == inspect.GEN_CLOSED  # closed by the pump


def test_follow_stream_delivers_and_ends_cleanly(live: LiveServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    r = _run_follow(live, iter([b"one\n", b"", b"two\n"]), monkeypatch)
    assert r.status == 200 and r.body == b"one\ntwo\n"
    assert r.headers["transfer-encoding"] == "chunked"


def _run_follow(live: LiveServer, it: Iterator[bytes],
                monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(live.agent.runtime("container"), "logs", lambda *a, **k: it)
    return live.raw(auth_get(live, "/v1/services/web/logs?follow=1", "reader"))[0]


# -- HTTP details ------------------------------------------------------------------------------


def test_head_answers_carry_no_body(live: LiveServer) -> None:
    head = b"HEAD /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    first, second = raw_http(live.address, head + auth_get(live, "/v1/health"), responses=2)
    assert first.status == 405 and first.headers["allow"] == "GET"
    assert "content-length" not in first.headers and first.body == b""
    assert second.status == 200 and second.json()["status"]  # nothing stray in between


@pytest.mark.parametrize("req", [
    b"GET /v1/openapi.json HTTP/1.1\r\n\r\n",
    b"GET /v1/openapi.json HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /v1/openapi.json HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
])
def test_host_header_required_and_well_formed(live: LiveServer, req: bytes) -> None:
    r = live.raw(req)[0]
    assert r.status == 400 and "Host" in r.json()["error"]["message"]


def test_http10_needs_no_host(live: LiveServer) -> None:
    assert live.raw(b"GET /v1/openapi.json HTTP/1.0\r\n\r\n")[0].status == 200


@pytest.mark.parametrize("line", [
    b"X-A: a\x00b", b"X-A: a\x01b", b"X-A: a\x7fb", b"X-A: a\rb", b"X-A: \x1b[2J",
])
def test_control_characters_in_header_values_are_400(live: LiveServer, line: bytes) -> None:
    r = live.raw(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n")[0]
    assert r.status == 400
    assert r.json()["error"]["message"].startswith("header 'X-A' has a control character")


@pytest.mark.parametrize("req", [
    b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
    b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n folded: 1\r\n\r\n",
    b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX\x00: 1\r\n\r\n",
    b"GET  /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET\t/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/open\x01api.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/\xffopenapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"G\x00T /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_heads_are_400(live: LiveServer, req: bytes) -> None:
    r = live.raw(req)[0]
    assert r.status == 400, r.body
    assert r.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("body", [
    b'{"name": "a", "name": "b", "components": []}',
    b'{"name": "a", "components": [{"name": "w", "image": "i", "image": "j"}]}',
])
def test_duplicate_json_keys_are_400_naming_the_key(live: LiveServer, body: bytes) -> None:
    r = live.request("POST", "/v1/services", body)
    assert r.status == 400
    msg = r.json()["error"]["message"]
    assert msg.startswith("body: duplicate key ") and ("'name'" in msg or "'image'" in msg)
    with pytest.raises(ValidationError, match="duplicate key 'x'"):
        parse_json(b'[{"y": {"x": 1, "x": 2}}]')
    assert parse_json(b'{"x": 1, "y": {"x": 2}}') == {"x": 1, "y": {"x": 2}}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.template}")
def test_unknown_query_parameters_are_400_on_every_route(live: LiveServer, route: Any) -> None:
    path = route.template.replace("{name}", "web").replace("{hostname}", "a.example.net")
    body = b"{}" if route.method == "POST" else None
    r = live.request(route.method, path + "?bogus=1", body, role="master")
    assert r.status == 400, (route.template, r.body)
    assert r.json()["error"]["message"] == "query: unknown query parameter 'bogus'"


def test_access_log_escapes_what_clients_send(live: LiveServer,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("http ")]

    with caplog.at_level(logging.INFO, logger="mcp_node.server"):
        live.raw(b"G\x1b[31m\x00T /v1/\x1b]0;pwned\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
        live.raw(b"GET /v1/health HTTP/1.1\r\n\r\n")           # no Host: refused by the parser
        live.raw(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX: \x00\r\n\r\n")
        live.raw(b"GET " + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
        # each line is written just after its response went out: wait for the last one
        wait_until(lambda: len(access_lines()) >= 4, "four access lines")
    lines = access_lines()
    assert len(lines) == 4, lines
    assert all(line.isprintable() and "\x1b" not in line for line in lines)
    assert "method=G\\x1b[31m\\x00T" in lines[0] and "status=400" in lines[0]
    assert "path=/v1/health status=400" in lines[1]
    assert "status=400" in lines[2] and "status=414" in lines[3]


def test_log_safe() -> None:
    assert log_safe("/v1/health?x=1") == "/v1/health?x=1"
    assert log_safe("a b\\c\x00\u00e9\u2028", 100) == "a\\x20b\\x5cc\\x00\\xe9\\u2028"
    assert log_safe("x" * 500, 10) == "x" * 10


# -- TLS: the intake does the handshake too -------------------------------------------------


def test_tls_slow_handshake_and_parked_connections(tmp_path: Path) -> None:
    import ssl

    from live_server import self_signed

    cert, key = self_signed(tmp_path)
    with fake_live(tmp_path, tls_cert=cert, tls_key=key, header_timeout_s=0.5) as live:
        deploy(live)
        ctx = ssl.create_default_context(cafile=cert)
        # a client that never says hello is closed at the header deadline
        s = connect(live)
        assert read_all(s) == b""
        s.close()
        # plain HTTP on the TLS port: refused by the handshake, and the server carries on
        s = connect(live)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert b"200 OK" not in read_all(s)
        s.close()
        # unauthenticated keep-alive over TLS: parked between requests, served again,
        # pipelined requests in separate TLS records included
        with ctx.wrap_socket(connect(live), server_hostname="127.0.0.1") as t:
            f = t.makefile("rb")
            for req in (b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
                        auth_get(live, "/v1/health", "reader")):
                t.sendall(req)
                assert f.readline().startswith(b"HTTP/1.1 200 "), req
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
            f.close()
        with ctx.wrap_socket(connect(live), server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            t.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(t).count(b"HTTP/1.1 200 OK") == 2
        wait_until(lambda: live.server.open_connections == 0, "all released")


def _nice_of(tid: int) -> int:
    """A thread's nice value, from /proc (field 19 of its stat)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[16])


@pytest.mark.parametrize("nicer", [0, 7])
def test_the_intake_thread_runs_nicer_than_the_workers(tmp_path: Path, nicer: int) -> None:
    base = _nice_of(threading.get_native_id())
    with fake_live(tmp_path, intake_nice=nicer) as live:
        assert live.client("reader").get("/v1/health")  # a worker has served a request
        intake = live.server._thread
        assert intake is not None and intake.native_id is not None
        wait_until(lambda: _nice_of(intake.native_id) == min(19, base + nicer),  # type: ignore[arg-type]
                   f"intake thread at nice {min(19, base + nicer)}")
        workers = [t.native_id for t in threading.enumerate()
                   if t.name.startswith("mcp-conn") and t.native_id is not None]
        assert workers and {_nice_of(t) for t in workers} == {base}
