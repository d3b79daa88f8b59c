"""Connection budgets per token and per role (issue 16): one reader token holding many
connections or follow streams must not lock out an operator; a token past its cap is
refused with a 503 naming the key; idle authenticated connections time out and hold no
worker thread beyond a few per token. The caps are set low so the counts stay small."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from live_server import auth_get, connect, fake_live, read_all, wait_until
from server_env import LiveServer

from mcp_node.agent import Agent
from mcp_node.agent_cli import main
from mcp_node.budgets import IDLE_THREADS_PER_TOKEN
from mcp_node.config import AgentConfig
from mcp_node.config import from_dict as config_from_dict
from mcp_node.daemon import reload_plan
from mcp_node.errors import ValidationError
from mcp_node.server import serve

HELLO = {"name": "web", "components": [{"name": "main", "image": "img:v1"}]}


def exchange(s: socket.socket, data: bytes) -> tuple[int, bytes]:
    """Send one request on ``s`` and read its whole answer: (status, body); (0, b"") if
    the server closed the connection instead."""
    s.sendall(data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return 0, b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def held_readers(live: LiveServer, n: int, role: str = "reader"
                 ) -> tuple[list[socket.socket], list[tuple[int, bytes]]]:
    """``n`` connections that each sent one /v1/health and stayed open (as reported:
    1,030 of them held every slot of the server), and the answer each got."""
    socks, answers = [], []
    for _ in range(n):
        s = connect(live)
        answers.append(exchange(s, auth_get(live, "/v1/health", role)))
        socks.append(s)
    return socks, answers


def busy_message(answer: tuple[int, bytes]) -> str:
    status, body = answer
    assert status == 503, answer
    err = json.loads(body)["error"]
    assert err["code"] == "busy"
    return str(err["message"])


def open_follow(live: LiveServer, role: str = "reader") -> tuple[socket.socket, bytes]:
    """A ``/v1/events?follow=true`` stream; the first bytes of the answer."""
    s = connect(live)
    s.sendall(auth_get(live, "/v1/events?follow=true&tail=0", role))
    return s, s.recv(4096)


def operator_still_served(live: LiveServer) -> None:
    """/v1/health and a deploy by an operator, each on a new connection, answered 200."""
    r = live.request("GET", "/v1/health")
    assert r.status == 200, r.body
    r = live.request("POST", "/v1/services", json.dumps(HELLO).encode(),
                     headers={"Content-Type": "application/json"})
    assert r.status == 200, r.body
    assert live.agent.status("web")["service"] == "web"


def token_name(live: LiveServer, role: str) -> str:
    tok = live.server.tokens.lookup(live.token(role))
    assert tok is not None
    return tok.name


def conn_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "mcp-conn")


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# -- reproductions ------------------------------------------------------------------------


def test_held_reader_connections_leave_operators_room(tmp_path: Path) -> None:
    """As reported: connections of one reader token that each sent one request and
    stayed open took every slot (503 ``busy`` for operators). Now readers get
    max_connections less reserved_for_operators, and a reader past that is refused."""
    before = conn_threads()
    with fake_live(tmp_path, max_connections=24, reserved_for_operators=4) as live:
        socks, answers = held_readers(live, 30)
        assert [a[0] for a in answers] == [200] * 20 + [503] * 10
        assert "server.reserved_for_operators (4)" in busy_message(answers[-1])
        assert all(read_all(s) == b"" for s in socks[20:])  # the refused ones: closed
        assert live.server.connections_of(token_name(live, "reader")) == 20
        operator_still_served(live)
        assert status_of_next(socks[0], live) == 200  # the admitted ones still work
        assert conn_threads() - before <= IDLE_THREADS_PER_TOKEN + 3
        close_all(socks)


def status_of_next(s: socket.socket, live: LiveServer, role: str = "reader") -> int:
    return exchange(s, auth_get(live, "/v1/health", role))[0]


def test_reader_follow_streams_leave_operators_room(tmp_path: Path) -> None:
    """As reported: follow streams of reader tokens held their slots for ever. Past the
    readers' share a new reader connection gets 503 naming server.reserved_for_operators,
    and operators still get in."""
    with fake_live(tmp_path, max_connections=16, reserved_for_operators=4,
                   max_streams_per_token=100) as live:
        live.server.tokens.add("reader-two", "reader")
        streams = [open_follow(live) for _ in range(12)]
        assert all(first.startswith(b"HTTP/1.1 200 ") for _, first in streams)
        wait_until(lambda: len(live.server.open_streams) == 12, "12 streams open")
        s = connect(live)
        status, body = exchange(s, auth_get(live, "/v1/health", "reader"))
        assert status == 503, body
        err = json.loads(body)["error"]
        assert err["code"] == "busy" and "server.reserved_for_operators" in err["message"]
        assert read_all(s) == b""  # and closed
        operator_still_served(live)
        close_all([s for s, _ in streams])
        wait_until(lambda: not live.server.open_streams, "streams ended with their clients")
        r = live.request("GET", "/v1/health", role="reader")
        assert r.status == 200, r.body


def test_follow_streams_per_token_are_capped(tmp_path: Path) -> None:
    with fake_live(tmp_path, max_streams_per_token=3) as live:
        streams = [open_follow(live) for _ in range(3)]
        assert all(first.startswith(b"HTTP/1.1 200 ") for _, first in streams)
        s, first = open_follow(live)
        assert first.startswith(b"HTTP/1.1 503 "), first
        reader = token_name(live, "reader")
        assert (f"token {reader!r} has 3 follow streams open "
                "(server.max_streams_per_token = 3)").encode() in first
        # the refused stream's connection is still good for other requests
        assert status_of_next(s, live) == 200
        operator_still_served(live)
        op, op_first = open_follow(live, "operator")  # another token has its own budget
        assert op_first.startswith(b"HTTP/1.1 200 ")
        close_all([s, op, *(x for x, _ in streams)])
        wait_until(lambda: not live.server.open_streams, "streams ended")
        s2, again = open_follow(live)  # the budget came back with them
        assert again.startswith(b"HTTP/1.1 200 ")
        s2.close()


# -- the per-token cap ---------------------------------------------------------------------


def test_token_cap_refuses_its_extra_connections(tmp_path: Path) -> None:
    with fake_live(tmp_path, max_connections_per_token=8) as live:
        socks, answers = held_readers(live, 12)
        assert [a[0] for a in answers] == [200] * 8 + [503] * 4
        reader = token_name(live, "reader")
        assert busy_message(answers[-1]) == (
            f"token {reader!r} has 8 open connections (server.max_connections_per_token "
            "= 8); close one, or wait for an idle one to time out (server.idle_timeout_s)")
        assert all(read_all(s) == b"" for s in socks[8:])
        assert all(status_of_next(s, live) == 200 for s in socks[:8])  # untouched
        operator_still_served(live)  # only that token is refused
        socks[0].close()
        wait_until(lambda: live.server.connections_of(reader) == 7, "one closed")
        more, [answer] = held_readers(live, 1)
        assert answer[0] == 200  # room again
        close_all([*socks, *more])
        wait_until(lambda: live.server.open_connections == 0, "every connection released")


def test_token_cap_holds_for_a_connection_changing_tokens(tmp_path: Path) -> None:
    """A kept-alive connection of another token (waited on by its worker, so the intake
    does not see its next request) that shows a token at its cap is refused too."""
    with fake_live(tmp_path, max_connections_per_token=2) as live:
        socks, _ = held_readers(live, 2)
        s = connect(live)
        assert status_of_next(s, live, "operator") == 200
        answer = exchange(s, auth_get(live, "/v1/health", "reader"))
        assert "(server.max_connections_per_token = 2)" in busy_message(answer)
        assert read_all(s) == b""
        assert live.server.connections_of(token_name(live, "operator")) == 0
        close_all([s, *socks])


def test_a_connection_moves_to_the_token_it_shows(tmp_path: Path) -> None:
    with fake_live(tmp_path) as live:
        s = connect(live)
        assert status_of_next(s, live, "reader") == 200
        reader, operator = token_name(live, "reader"), token_name(live, "operator")
        assert live.server.connections_of(reader) == 1
        assert status_of_next(s, live, "operator") == 200
        assert (live.server.connections_of(reader), live.server.connections_of(operator)) \
            == (0, 1)
        s.close()
        wait_until(lambda: live.server.connections_of(operator) == 0, "released")


# -- idle authenticated connections ---------------------------------------------------------


def test_idle_authenticated_connections_hold_few_threads(tmp_path: Path) -> None:
    before = conn_threads()
    with fake_live(tmp_path) as live:
        socks, _ = held_readers(live, 30)
        wait_until(lambda: live.server.open_connections == 30, "30 open")
        assert conn_threads() - before <= IDLE_THREADS_PER_TOKEN + 3
        # every one of them, waited on by a worker or back in the intake, still answers
        assert all(status_of_next(s, live) == 200 for s in socks)
        close_all(socks)


def test_idle_authenticated_connections_time_out(tmp_path: Path) -> None:
    """Those a worker waits on and those back in the intake (past the few per token a
    worker may wait on) alike are closed after server.idle_timeout_s."""
    with fake_live(tmp_path, idle_timeout_s=0.5) as live:
        socks, _ = held_readers(live, IDLE_THREADS_PER_TOKEN + 3)
        for s in socks:
            assert read_all(s) == b""  # closed by the agent, not by us
        wait_until(lambda: live.server.open_connections == 0, "every idle one released")
        close_all(socks)


def test_a_parked_authenticated_connection_has_a_header_deadline(tmp_path: Path) -> None:
    """Back in the intake an idle connection waits up to server.idle_timeout_s; once a
    head begins it has server.header_timeout_s, as on a worker."""
    with fake_live(tmp_path, header_timeout_s=0.5) as live:
        socks, _ = held_readers(live, IDLE_THREADS_PER_TOKEN + 1)
        last = socks[-1]  # past the few a worker waits on: in the intake
        last.sendall(b"GET /v1/health HTTP/1.1\r\n")
        data = read_all(last)
        assert data.startswith(b"HTTP/1.1 408 ")
        assert b"within 0.5 s (server.header_timeout_s)" in data
        assert all(status_of_next(s, live) == 200 for s in socks[:-1])
        close_all(socks)


def test_parked_authenticated_tls_connections_are_served_again(tmp_path: Path) -> None:
    import ssl

    from live_server import self_signed

    cert, key = self_signed(tmp_path)
    with fake_live(tmp_path, tls_cert=cert, tls_key=key) as live:
        ctx = ssl.create_default_context(cafile=cert)
        conns = [ctx.wrap_socket(connect(live), server_hostname="127.0.0.1")
                 for _ in range(IDLE_THREADS_PER_TOKEN + 3)]
        for _ in range(3):  # each round, the last three wait in the intake between requests
            assert [status_of_next(t, live) for t in conns] == [200] * len(conns)
        conns[-1].sendall(auth_get(live, "/v1/health", "reader")  # pipelined
                          + auth_get(live, "/v1/health", "reader", b"Connection: close\r\n"))
        assert read_all(conns[-1]).count(b"HTTP/1.1 200 OK") == 2
        close_all(list(conns))
        wait_until(lambda: live.server.open_connections == 0, "all released")


def test_budget_keys_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="server.reserved_for_operators"):
        config_from_dict({"server": {"max_connections": 10, "reserved_for_operators": 10}})
    with pytest.raises(ValidationError, match="server.max_connections_per_token"):
        config_from_dict({"server": {"max_connections_per_token": 0}})
    with pytest.raises(ValidationError, match="server.max_streams_per_token"):
        config_from_dict({"server": {"max_streams_per_token": -1}})
    conf = tmp_path / "agent.toml"
    conf.write_text("[server]\nmax_connections = 8\nreserved_for_operators = 8\n"
                    "max_connections_per_token = 0\n")
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 1
    fields = sorted(ln.split(": ")[1] for ln in res.stderr.splitlines()[:-1])
    assert fields == ["server.max_connections_per_token", "server.reserved_for_operators"]


def test_per_token_caps_apply_on_reload_the_reserve_at_a_restart() -> None:
    old = config_from_dict({})
    new = config_from_dict({"server": {"max_connections_per_token": 8,
                                       "max_streams_per_token": 2,
                                       "reserved_for_operators": 100}})
    run, applied, restart = reload_plan(old, new)
    assert sorted(applied) == ["server.max_connections_per_token",
                               "server.max_streams_per_token"]
    assert restart == ["server.reserved_for_operators"]
    assert (run.server.max_connections_per_token, run.server.max_streams_per_token,
            run.server.reserved_for_operators) == (8, 2, 64)


# -- with podman ---------------------------------------------------------------------------


@pytest.fixture
def podman_live(podman_config: AgentConfig, podman_cleanup: Any) -> Iterator[LiveServer]:
    cfg = replace(podman_config, server=replace(
        podman_config.server, listen="127.0.0.1:0", max_connections=24,
        reserved_for_operators=4, max_streams_per_token=6))
    agent = Agent(cfg)
    podman_cleanup.add(agent.owner)
    srv = serve(agent, cfg)
    try:
        assert srv.token_file is not None
        yield LiveServer(agent, srv, srv.url, srv.token_file.read_text().strip())
    finally:
        srv.shutdown()
        agent.close()


def test_operator_deploys_while_a_reader_holds_all_it_may(podman_live: LiveServer,
                                                          hello_image: str) -> None:
    live = podman_live
    streams = [open_follow(live) for _ in range(6)]
    assert all(first.startswith(b"HTTP/1.1 200 ") for _, first in streams)
    socks, _ = held_readers(live, 30)
    assert live.server.connections_of(token_name(live, "reader")) == 20  # 6 streams, 14 idle
    assert live.request("GET", "/v1/health").status == 200
    defn = {"name": "held", "components": [{"name": "main", "image": hello_image}]}
    r = live.request("POST", "/v1/services", json.dumps(defn).encode(),
                     headers={"Content-Type": "application/json"})
    assert r.status == 200, r.body
    assert live.agent.status("held")["components"][0]["state"] == "running"
    close_all([*socks, *(s for s, _ in streams)])
    wait_until(lambda: not live.server.open_streams, "streams ended with their clients")
