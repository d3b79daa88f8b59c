"""Issue 22 rows 9, 10 and 11, each with its exact output and exit code: a new service
on a fleet with one node down (a real etcd, two agents over HTTP), follows that survive
a replace and an agent restart, and ``mcp logs SERVICE`` of every component at once
(real podman)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result
from daemon_env import Daemon, podman_daemon
from etcd_env import EtcdCluster
from live_server import wait_until
from server_env import LiveServer
from test_cluster_fleet import Node
from test_follow_reconnect import WAIT_S, Follower, deploy, hit

from mcp_node import fence
from mcp_node.cli import cli
from mcp_node.client import Client
from mcp_node.server import AgentServer, serve


@pytest.fixture
def two_fleet_nodes(etcd_cluster: EtcdCluster, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, AgentServer]]:
    """Two fleet agents (real etcd, in-memory workloads) served over HTTP, both named in
    mcp.toml as [[nodes]]: the fleet an operator's CLI sees."""
    nodes = {n: Node(n, tmp_path, etcd_cluster.endpoints, ["compute"]) for n in ("n1", "n2")}
    servers: dict[str, AgentServer] = {}
    try:
        lines = []
        for name, node in nodes.items():
            agent = node.start()
            cfg = replace(node.cfg, server=replace(node.cfg.server, listen="127.0.0.1:0"))
            servers[name] = srv = serve(agent, cfg)
            lines.append(f'[[nodes]]\nname = "{name}"\naddress = "{srv.url}"\n'
                         f'token_path = "{srv.token_file}"\n')
        conf = tmp_path / "mcp.toml"
        conf.write_text("".join(lines))
        monkeypatch.setenv("MCP_CLI_CONFIG", str(conf))
        yield servers
    finally:
        for srv in servers.values():
            with contextlib.suppress(OSError):   # stopped by the test already
                srv.shutdown()
                srv.server_close()
        for node in nodes.values():
            if node.agent is not None:
                node.agent.close()
            pid = fence.fence_pid(node.cfg.state_dir)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_row9_a_new_service_with_a_node_down_gets_the_hint_and_the_node(
        two_fleet_nodes: dict[str, AgentServer], tmp_path: Path) -> None:
    svc = tmp_path / "newsvc.toml"
    svc.write_text('name = "newsvc"\n[[components]]\nname = "web"\nimage = "img:v1"\n')
    r = CliRunner().invoke(cli, ["deploy", str(svc)])
    assert (r.exit_code, r.stderr) == (
        1, "Error: unknown service 'newsvc' on nodes n1, n2; deploy it with -n NODE\n")
    down = two_fleet_nodes["n2"]
    down.shutdown()
    down.server_close()
    r = CliRunner().invoke(cli, ["deploy", str(svc)])
    assert (r.exit_code, r.stdout) == (1, "")
    # the cause is the OS's: refused, or (rarely, a connect that raced the close) reset
    cause = re.escape("[Errno 111] Connection refused") + "|" + re.escape(
        "[Errno 104] Connection reset by peer")
    assert re.fullmatch(re.escape(
        "Error: unknown service 'newsvc' on node n1; not reachable: n2; deploy it with "
        "-n NODE (n2 may have it: check once it answers)\n"
        f"  node n2: the agent is not reachable at {down.url}: ") + f"(?:{cause})" + re.escape(
        "; is mcp-agent running there? (start it with `mcp-agent`, or point "
        "--agent, $MCP_AGENT or the [[nodes]] of mcp.toml at it)\n"), r.stderr), r.stderr


# -- row 10: follows that survive a replace and an agent restart, or end saying why ------


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    with podman_daemon(tmp_path, podman_socket) as d:
        yield d


def test_row10_logs_follow_goes_into_the_replacement_and_ends_saying_why(
        daemon: Daemon, hello_image: str) -> None:
    daemon.start()
    svc = f"lg{uuid.uuid4().hex[:6]}"
    port = deploy(daemon, svc, hello_image, "one")
    f = Follower(daemon, "logs", "-f", svc)
    try:
        hit(port, "/before")
        f.until("GET /before", "a line of the first container")
        port = deploy(daemon, svc, hello_image, "two")     # a replace: a new container
        hit(port, "/after-replace")
        seen = f.until("GET /after-replace", "a line of the new container")
        assert f"hello: listening on :{port}\n" in seen, seen   # its run from its start
        assert daemon.mcp("stop", svc).exit_code == 0
        assert f.wait() == 0
        assert f.err == [
            "mcp: the component was replaced or restarted; following its new run\n",
            f"mcp: {svc} is stopped (desired stopped): its output ended\n"]
    finally:
        f.stop()


def test_row10_events_follow_reconnects_across_an_agent_restart(
        daemon: Daemon, hello_image: str) -> None:
    daemon.start()
    svc = f"ev{uuid.uuid4().hex[:6]}"
    deploy(daemon, svc, hello_image, "one")
    f = Follower(daemon, "events", "-f", svc)
    try:
        f.until("running", "the deploy's events")
        daemon.kill()
        daemon.start()
        assert daemon.mcp("restart", svc).exit_code == 0
        f.until("restarted", "an event after the agent restarted")
        f.noted("reconnected", "the follower's note")
        assert len(f.err) == 2 and f.err[1] == "mcp: reconnected\n", f.err
        assert re.fullmatch(
            rf"mcp: the stream from {daemon.url} broke off \(the agent closed the "
            r"connection mid-stream; resuming after event \d+\); reconnecting for up to "
            r"60 s\n", f.err[0]), f.err
    finally:
        f.stop()


@pytest.mark.parametrize("what", [("events", "-f"), ("logs", "-f", "SVC")])
def test_row10_a_follow_ends_saying_why_when_the_agent_stays_away(
        daemon: Daemon, hello_image: str, what: tuple[str, ...]) -> None:
    daemon.start()
    svc = f"aw{uuid.uuid4().hex[:6]}"
    port = deploy(daemon, svc, hello_image, "one")
    f = Follower(daemon, *[svc if a == "SVC" else a for a in what], reconnect_s=3)
    try:
        hit(port, "/before")
        f.until("running" if what[0] == "events" else "GET /before", "the follow is open")
        daemon.kill()
        assert f.wait() == 1
        assert f.err[1:] == [
            f"Error: gave up following: the agent at {daemon.url} did not answer again "
            f"within 3 s (the agent is not reachable at {daemon.url}: [Errno 111] "
            "Connection refused; is mcp-agent running there? (start it with `mcp-agent`, "
            "or point --agent, $MCP_AGENT or the [[nodes]] of mcp.toml at it))\n"], f.err
    finally:
        f.stop()


# -- row 11: mcp logs SERVICE: every component, in time order, led by its name ----------


def duo(c: Client, image: str, web: str = "one") -> dict[str, int]:
    """``duo`` (web and database, the hello image) deployed and running; host ports."""
    c.post("/v1/services", {"name": "duo", "components": [
        {"name": n, "image": image, "env": [f"MESSAGE={m}"], "routes": [{"port": 8080}]}
        for n, m in (("web", web), ("database", "db"))]})
    ports: dict[str, int] = {}
    deadline = time.monotonic() + WAIT_S
    while len(ports) < 2:
        st = c.get("/v1/services/duo")
        ports = {r["component"]: int(r["routes"][0]["host_port"]) for r in st["components"]
                 if r["state"] == "running"}
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    return ports


STAMPED = re.compile(r"(web     |database) \| (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (.*)")


def test_row11_logs_of_a_service_are_every_component_in_time_order(
        live_server: LiveServer, hello_image: str, tmp_path: Path) -> None:
    ports = duo(live_server.client(), hello_image)
    tok = tmp_path / "tok"
    tok.write_text(live_server.token("reader"))
    tok.chmod(0o600)

    def logs(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--agent", live_server.url, "--token-file", str(tok),
                                        "logs", "duo", *args])

    wait_until(lambda: logs().stdout.count("listening") == 2, "both components said so")
    since = datetime.now(UTC).isoformat()
    for comp, path in (("web", "/a"), ("database", "/b"), ("web", "/c")):
        hit(ports[comp], path)
        # each line's time is its conmon's read of the pipe, not the request's: two
        # components' conmons may stamp two requests a few ms apart in either order on a
        # loaded machine, so the next request waits until this one's line is stamped
        wait_until(lambda p=path: f"GET {p} " in logs("--since", since).stdout,
                   f"the line of {path} logged")
    r = logs("--since", since)
    assert (r.exit_code, r.stderr, r.stdout) == (0, "", (
        "web      | hello: GET /a HTTP/1.1\n"
        "database | hello: GET /b HTTP/1.1\n"
        "web      | hello: GET /c HTTP/1.1\n"))
    r = logs("--tail", "2", "--timestamps")      # the last 2 of each, in time order
    assert r.exit_code == 0, r.output
    rows = [STAMPED.fullmatch(line) for line in r.stdout.splitlines()]
    assert all(rows) and len(rows) == 4, r.stdout
    assert [(m[1].strip(), m[3]) for m in rows if m] == [
        ("database", f"hello: listening on :{ports['database']}"),
        ("web", "hello: GET /a HTTP/1.1"),
        ("database", "hello: GET /b HTTP/1.1"), ("web", "hello: GET /c HTTP/1.1")], r.stdout
    times = [m[2] for m in rows if m]
    assert times == sorted(times), r.stdout
    r = logs("--since", "10m")
    assert (r.exit_code, sorted(r.stdout.splitlines())) == (0, sorted([
        f"web      | hello: listening on :{ports['web']}",
        f"database | hello: listening on :{ports['database']}",
        "web      | hello: GET /a HTTP/1.1", "database | hello: GET /b HTTP/1.1",
        "web      | hello: GET /c HTTP/1.1"]))
    r = logs("web", "--since", since, "--timestamps")    # one component: no prefix
    assert r.exit_code == 0 and [ln.split(" ", 1)[1] for ln in r.stdout.splitlines()] == [
        "hello: GET /a HTTP/1.1", "hello: GET /c HTTP/1.1"], r.stdout
    r = logs("--since", "yesterday")
    assert (r.exit_code, r.stdout, r.stderr) == (1, "", (
        "Error: since: 'yesterday' is neither a duration (10m, 1h30m, 45s) nor an RFC 3339 "
        "time (2026-01-02T15:04:05Z)\n"))
    # the API answers the same (one operation: the CLI is its client)
    got = live_server.client("reader").stream("/v1/services/duo/logs?since=" + quote(since))
    assert b"".join(got) == (b"web      | hello: GET /a HTTP/1.1\n"
                             b"database | hello: GET /b HTTP/1.1\n"
                             b"web      | hello: GET /c HTTP/1.1\n")


def test_row11_logs_follow_of_a_service_goes_on_across_a_replace(
        daemon: Daemon, hello_image: str) -> None:
    """-f of every component: each followed into its next run (a note says so, in its
    place in time), each one's end noted, the follow ending when none is meant to run."""
    client = daemon.start()
    ports = duo(client, hello_image)
    f = Follower(daemon, "logs", "-f", "duo", "--tail", "1")
    try:     # the last line of each (its "listening") says the follow is open
        opened = f.until("listening", "a first component's") + f.until("listening", "both")
        assert sorted(opened) == [
            f"database | hello: listening on :{ports['database']}\n",
            f"web      | hello: listening on :{ports['web']}\n"], opened
        hit(ports["web"], "/x")
        assert f.until("/x", "web's line") == ["web      | hello: GET /x HTTP/1.1\n"]
        hit(ports["database"], "/y")
        assert f.until("/y", "database's") == ["database | hello: GET /y HTTP/1.1\n"]
        ports = duo(client, hello_image, web="two")     # web is replaced, database is not
        assert f.until("listening", "the new web's first line") == [
            "web      | hello: SIGTERM, shutting down\n",
            "web      | [mcp: replaced or restarted; following its new run]\n",
            f"web      | hello: listening on :{ports['web']}\n"]
        hit(ports["web"], "/z")
        assert f.until("/z", "a line of the new web") == ["web      | hello: GET /z HTTP/1.1\n"]
        assert daemon.mcp("stop", "duo").exit_code == 0
        assert f.wait() == 0
        assert sorted(f.rest()) == sorted([
            "web      | hello: SIGTERM, shutting down\n",
            "database | hello: SIGTERM, shutting down\n",
            "web      | [mcp: its output ended: stopped (desired stopped)]\n",
            "database | [mcp: its output ended: stopped (desired stopped)]\n"])
        assert f.err == ["mcp: duo: no component is meant to run: the output of all ended\n"]
    finally:
        f.stop()
