"""Readiness: the check grammar, the probes against real sockets, and
``deploy --wait`` against real podman (ready, and never ready with its logs)."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from mcp_node.agent import Agent
from mcp_node.clictx import LocalBackend
from mcp_node.cliwait import wait_ready
from mcp_node.config import AgentConfig, MonitorConfig
from mcp_node.errors import MCPError, ValidationError
from mcp_node.readiness import Result, check, connect, connect_all, effective, probe
from mcp_node.servicedef import ComponentDef, RouteDef, from_dict


def comp(check: str = "", routes: int = 1) -> ComponentDef:
    return ComponentDef(name="web", image="i", check=check,
                        routes=tuple(RouteDef(name=f"r{i}", port=80) for i in range(routes)))


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])   # bound, never listening, then closed


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_defaults_tcp_with_routes_none_without() -> None:
    assert effective(comp()) == "tcp" and effective(comp(routes=0)) == "none"
    assert effective(comp("http:/healthz")) == "http:/healthz"


def test_tcp_probe_needs_every_route_listening(listener: int, closed_port: int) -> None:
    assert probe(comp(), {"r0": listener})
    assert not probe(comp(), {"r0": closed_port})
    assert not probe(comp(routes=2), {"r0": listener, "r1": closed_port})
    assert probe(comp("none"), {"r0": closed_port})


def test_http_probe_needs_a_2xx(http_server: int) -> None:
    assert probe(comp("http:/ok"), {"r0": http_server})
    assert not probe(comp("http:/failing"), {"r0": http_server})


def test_a_probe_goes_to_the_address_it_is_given() -> None:
    """A start-first replace's new workload on a service network is probed at its own
    address, on the ports the host ports (still the current one's) also name."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = {"r0": srv.server_address[1]}
        for kind in ("tcp", "http:/"):
            assert check(comp(kind), port, host="127.0.0.2") == Result(
                True, "accepted" if kind == "tcp" else "HTTP 204")
            assert check(comp(kind), port) == Result(False, "connection refused")
    finally:
        srv.shutdown()
        srv.server_close()


def test_results_say_why_in_a_few_words(listener: int, closed_port: int,
                                        http_server: int) -> None:
    assert check(comp(), {"r0": listener}) == Result(True, "accepted")
    assert check(comp(), {"r0": closed_port}) == Result(False, "connection refused")
    assert check(comp(routes=2), {"r0": listener, "r1": closed_port}) == Result(
        False, f"port {closed_port}: connection refused")
    assert check(comp("http:/ok"), {"r0": http_server}) == Result(True, "HTTP 200")
    assert check(comp("http:/x"), {"r0": http_server}) == Result(False, "HTTP 503")
    assert check(comp(), {}) == Result(False, "no host port")
    assert check(comp("none"), {}) == Result(True, "no check")
    # the runtime's tcp probe decides (a VM's: did the guest accept)
    assert check(comp(), {"r0": listener}, tcp=lambda p, t: "guest did not accept") == Result(
        False, "guest did not accept")


def test_a_silent_server_times_out_after_the_timeout(listener: int) -> None:
    """A listener that never answers (a SIGSTOPped process: the kernel still accepts)."""
    assert check(comp("http:/"), {"r0": listener}, timeout=0.2) == Result(
        False, "timed out after 0.2 s")


@pytest.fixture
def full_port() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    hangs until its timeout (as to a host that does not answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        port = s.getsockname()[1]
        fill = [socket.socket() for _ in range(3)]
        for c in fill:
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
        yield port
        for c in fill:
            c.close()


def test_connects_side_by_side_answer_as_one_connect_does(listener: int, closed_port: int,
                                                          full_port: int) -> None:
    got = connect_all({listener: 1.0, closed_port: 1.0, full_port: 0.2})
    assert got == {listener: "", closed_port: "connection refused",
                   full_port: "timed out after 0.2 s"}
    assert got == {p: connect(p, t) for p, t in
                   ((listener, 1.0), (closed_port, 1.0), (full_port, 0.2))}
    assert connect_all({}) == {}
    # One at a time: the hung one holds its slot until its timeout, then the next goes.
    assert connect_all({full_port: 0.2, listener: 1.0}, limit=1) == {
        full_port: "timed out after 0.2 s", listener: ""}


def test_out_of_descriptors_fails_those_probes_not_the_tick(listener: int) -> None:
    """With its file limit reached, the connects that get no socket say so; the others
    are answered (a subprocess: the limit is the process's)."""
    code = """if True:
        import os, resource, sys
        from mcp_node.readiness import connect_all
        ports = [int(sys.argv[1]), *range(1, 30)]
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, 4096))
        print(sorted(set(connect_all({p: 1.0 for p in ports}).values())))"""
    out = subprocess.run([sys.executable, "-c", code, str(listener)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "['', 'connection refused', 'too many open files']", out


@pytest.mark.parametrize(("check", "routes", "match"), [
    ("http", 1, "is not tcp, none or http:/path"),
    ("http:nope", 1, "is not tcp, none or http:/path"),
    ("http:/a b", 1, "is not tcp, none or http:/path"),
    ("udp", 1, "is not tcp, none or http:/path"),
    ("tcp", 0, "needs a route"),
    ("http:/x", 0, "needs a route"),
])
def test_bad_checks_are_refused_naming_the_field(check: str, routes: int, match: str) -> None:
    data = {"name": "s", "components": [{"name": "web", "image": "i", "check": check,
                                         "routes": [{"port": 80}] * routes}]}
    with pytest.raises(ValidationError, match=match) as err:
        from_dict(data)
    assert err.value.field == "components[0].check"


@pytest.fixture
def agent(podman_config: AgentConfig, podman_cleanup: object) -> Iterator[Agent]:
    a = Agent(replace(podman_config, monitor=MonitorConfig(interval_s=0.2)))
    podman_cleanup.add(a.owner)  # type: ignore[attr-defined]
    try:
        yield a
    finally:
        a.close()


def test_deploy_wait_returns_once_ready(agent: Agent, hello_image: str) -> None:
    name = f"r{uuid.uuid4().hex[:8]}"
    agent.deploy(from_dict({"name": name, "components": [
        {"name": "web", "image": hello_image, "check": "http:/", "routes": [{"port": 8080}]}]}))
    st = wait_ready(LocalBackend(agent), name, 30)
    [c] = st["components"]
    assert c["ready"] is True and c["state"] == "running"


def test_deploy_wait_fails_with_the_last_log_lines(agent: Agent, busybox_image: str) -> None:
    name = f"r{uuid.uuid4().hex[:8]}"
    agent.deploy(from_dict({"name": name, "components": [{
        "name": "web", "image": busybox_image,
        "cmd": ["sh", "-c", "echo not listening on $PORT; exec sleep 600"],
        "routes": [{"port": 8080}]}]}))
    with pytest.raises(MCPError) as err:
        wait_ready(LocalBackend(agent), name, 1.5)
    msg = str(err.value)
    assert msg.startswith(f"{name}: not ready after 1.5 s:\n  web: starting")
    assert "    | not listening on " in msg
    [c] = agent.status(name)["components"]
    assert c["state"] == "starting" and c["ready"] is False and c["drift"] is False
