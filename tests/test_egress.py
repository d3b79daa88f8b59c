"""Tests stay on the machine (issue 16, item 6): every podman and agent the fixtures start
has no way out (tests/egress.py), and a pull of a made-up registry name under that
environment makes no connection and no DNS lookup outside loopback (strace says so)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import need
from daemon_env import podman_daemon
from egress import (
    NO_PROXY,
    PROXY_VARS,
    REGISTRIES_CONF,
    Traced,
    closed_port,
    loopback_connections,
    no_egress_env,
    outside_connections,
)
from podman_env import containers_conf, free_port, wait_http
from server_env import LiveServer

from mcp_node.podman_service import socket_answers

TRACE = """\
101 connect(3, {sa_family=AF_UNIX, sun_path="/run/podman.sock"}, 110) = 0
101 connect(7, {sa_family=AF_INET, sin_port=htons(4000), sin_addr=inet_addr("127.0.0.1")}, 16) = 0
102 connect(8, {sa_family=AF_INET6, sin6_port=htons(80), sin6_flowinfo=htonl(0), \
inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28 <unfinished ...>
102 connect(9, {sa_family=AF_INET6, sin6_port=htons(80), sin6_flowinfo=htonl(0), \
inet_pton(AF_INET6, "::ffff:127.0.0.2", &sin6_addr), sin6_scope_id=0}, 28) = -1 ECONNREFUSED
103 sendto(5, "\\x12\\x34", 30, MSG_NOSIGNAL, {sa_family=AF_INET, sin_port=htons(53), \
sin_addr=inet_addr("10.255.255.53")}, 16) = 30
103 sendto(5, "abc", 3, 0, NULL, 0) = 3
104 connect(6, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), \
inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH
105 connect(4, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("100.64.0.2")}, 16) = 0
106 connect(4, {sa_family=AF_INET, sa_data="garbled"}, 16) = 0
107 sendmsg(9, {msg_name={sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}}, 0) = 20
108 sendto(3, [{nlmsg_type=RTM_GETADDR}, {ifa_family=AF_INET, ifa_index=0}], 32, 0, \
{sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}, 12) = 32
"""


def test_outside_connections_reads_an_strace_log(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    trace.write_text(TRACE)
    bad = outside_connections(trace, allowed=["100.64.0.2"])
    assert [line.split()[0] for line in bad] == ["103", "104", "106"]
    assert [line.split()[0] for line in outside_connections(trace)] == [
        "103", "104", "105", "106"]
    assert loopback_connections(trace) == [("127.0.0.1", 4000), ("::1", 80),
                                           ("::ffff:127.0.0.2", 80)]


def test_no_egress_env_closes_every_way_out() -> None:
    env = no_egress_env({"ALL_PROXY": "http://proxy.example:3128", "PATH": "/bin"})
    port = closed_port()
    assert {k: env[k] for k in PROXY_VARS} == dict.fromkeys(PROXY_VARS,
                                                           f"http://127.0.0.1:{port}")
    assert env["NO_PROXY"] == env["no_proxy"] == NO_PROXY
    assert "ALL_PROXY" not in env and env["PATH"] == "/bin"
    assert env["CONTAINERS_REGISTRIES_CONF"] == str(REGISTRIES_CONF)
    assert 'unqualified-search-registries = []' in REGISTRIES_CONF.read_text()
    with pytest.raises(ConnectionRefusedError):   # the proxy refuses: nothing listens
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _assert_no_way_out(pid: int) -> None:
    env = _environ(pid)
    for key in PROXY_VARS:
        assert env.get(key) == f"http://127.0.0.1:{closed_port()}", (pid, key)
    assert env.get("NO_PROXY") == NO_PROXY and env.get("no_proxy") == NO_PROXY
    assert env.get("CONTAINERS_REGISTRIES_CONF") == str(REGISTRIES_CONF)


def test_session_podman_service_has_no_way_out(podman_socket: str) -> None:
    """The defect: the session's podman service (every in-process agent's) inherited the
    test's environment, so a fuzzed image name was a DNS lookup leaving the machine."""
    path = Path(podman_socket.removeprefix("unix://"))
    pid = int((path.parent / "service.pid").read_text())
    _assert_no_way_out(pid)


def test_daemon_agent_has_no_way_out(tmp_path: Path, podman_socket: str) -> None:
    with podman_daemon(tmp_path, podman_socket) as d:
        d.start()
        assert d.proc is not None
        _assert_no_way_out(d.proc.pid)


def test_pull_of_a_made_up_name_stays_on_loopback(tmp_path: Path,
                                                  podman_binary: None) -> None:
    """Under strace: podman gives the registry name to the closed proxy and fails there; a
    name on 127.0.0.1 is tried directly (a local registry still works); no DNS query and
    no connection leaves loopback."""
    need("strace")
    sock = tmp_path / "podman.sock"
    env = no_egress_env({**os.environ, "CONTAINERS_CONF": containers_conf()})
    svc = Traced(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                 tmp_path / "trace", tmp_path / "service.log", env).start()
    try:
        assert wait_until_answering(f"unix://{sock}")
        local = free_port()
        pulls = {name: subprocess.run(["podman", "--url", f"unix://{sock}", "pull", name],
                                      env=env, capture_output=True, text=True, timeout=120)
                 for name in ("a.b/c:1", "mcp-egress-short-name", f"localhost:{local}/x:1")}
    finally:
        svc.stop()
    proxy = f"proxyconnect tcp: dial tcp 127.0.0.1:{closed_port()}: connect: connection refused"
    assert pulls["a.b/c:1"].returncode != 0 and proxy in pulls["a.b/c:1"].stderr
    short = pulls["mcp-egress-short-name"]
    assert short.returncode != 0 and "short-name" in short.stderr, short.stderr
    direct = pulls[f"localhost:{local}/x:1"]
    assert direct.returncode != 0 and f"dial tcp 127.0.0.1:{local}" in direct.stderr
    assert "proxyconnect" not in direct.stderr
    trace = tmp_path / "trace"
    assert ("127.0.0.1", closed_port()) in loopback_connections(trace)
    assert ("127.0.0.1", local) in loopback_connections(trace)
    assert outside_connections(trace) == []


def wait_until_answering(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not socket_answers(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_wait_http_still_reaches_loopback_under_no_egress(live_server: LiveServer) -> None:
    """urllib honours the proxy variables, and live_server sets them: loopback must stay
    exempt (NO_PROXY)."""
    assert os.environ["HTTP_PROXY"] == f"http://127.0.0.1:{closed_port()}"
    assert '"status"' in wait_http(live_server.address[1], "/v1/livez")
