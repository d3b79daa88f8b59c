"""Issue 22 row 16, each with its exact output and exit code against a live agent on
real podman: health counts only this agent's containers, no ``None`` in health, events
or status text, and a fresh run shows no exit code of the run before it."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from click.testing import CliRunner, Result
from live_server import wait_until
from podman_env import PodmanCleanup, podman_cli
from server_env import LiveServer

from mcp_node.cli import cli

WAIT_S = 60.0
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")
UPTIME = re.compile(r"(?<=  )\d{1,2}s +(?=\d)")   # under a minute: the column keeps its width


def untimed(text: str) -> str:
    """Times as ``T``, an uptime under a minute as ``Ns`` (padded as it was)."""
    return UPTIME.sub(lambda m: "Ns".ljust(len(m.group())), TIME.sub("T", text))


def mcp(live: LiveServer, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--agent", live.url, "--token-file",
                                    str(live.server.token_file), *args],
                              catch_exceptions=False)


def row(live: LiveServer, svc: str) -> dict[str, Any]:
    [comp] = live.client().get(f"/v1/services/{svc}")["components"]
    return dict(comp)


def deploy(live: LiveServer, svc: str, image: str) -> None:
    """Its rollout stays in progress for the test (judged healthy only after an hour)."""
    live.client().post("/v1/services", {
        "name": svc, "update": {"min_healthy_s": 3600, "healthy_deadline_s": 3600},
        "components": [{"name": "web", "image": image, "routes": [{"port": 8080}]}]})
    wait_until(lambda: row(live, svc)["state"] == "running", f"{svc}/web running", WAIT_S)


def status_of(svc: str, comp: dict[str, Any], restart_why: str) -> str:
    port = comp["routes"][0]["host_port"]
    return (f"service {svc} on vm: active\n"
            "COMPONENT  RUNTIME    STATE    DESIRED  VERSION  UPTIME  RESTARTS  PORTS"
            "            DRIFT\n"
            f"web        container  running  running  v1       Ns      1         "
            f"127.0.0.1:{port}  no\n"
            "rollout of version 1: in_progress\n"
            "  web: check ok at T (accepted)\n"
            "events:\n"
            "  T service: deploy (version 1: web changed)\n"
            "  T web: unknown -> running\n"
            "  T web: running -> stopped\n"
            f"  T web: stopped -> stopped (restarted by agent after {restart_why}, restart 1)\n"
            "  T web: stopped -> running\n")


def restarted(live: LiveServer, svc: str) -> None:
    live.agent.start_monitor(reconcile=True)   # the agent, not podman, restarts it
    wait_until(lambda: (c := row(live, svc))["restarts"] == 1 and c["state"] == "running",
               f"{svc}/web restarted and its check passed", WAIT_S)


def test_health_counts_only_this_agents_containers(
        live_server: LiveServer, hello_image: str, podman_cleanup: PodmanCleanup) -> None:
    deploy(live_server, "mine", hello_image)
    other = podman_cleanup.add(f"other-{uuid.uuid4().hex[:10]}")
    # another agent's workloads on the same podman: our labels but its owner, one of
    # them of a service we run too
    for svc in ("theirs", "mine"):
        podman_cli("run", "-d", "--name", f"{other}-{svc}", "--label", "mcp.managed=true",
                   "--label", f"mcp.service={svc}", "--label", "mcp.component=web",
                   "--label", f"mcp.owner={other}", "-e", "PORT=0", hello_image, check=True)
    r = mcp(live_server, "node", "health")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:3] == ["status: healthy", "node: vm", "containers: 1"]
    # the runtimes' lines name counters and host sizes; no value of theirs reads None
    assert "None" not in r.output, r.output
    assert "service_pid=- " in r.output, r.output


def test_a_container_that_never_ran_is_started_with_no_none_in_events(
        live_server: LiveServer, hello_image: str) -> None:
    deploy(live_server, "fresh", hello_image)
    attrs = json.loads(podman_cli("inspect", "mcp-fresh-web", check=True).stdout)[0]
    # what an agent crash between create and start leaves: ours, created, never started
    podman_cli("rm", "-f", "-t", "0", "mcp-fresh-web", check=True)
    ports = [f"--publish={b['HostIp']}:{b['HostPort']}:{p.split('/')[0]}"
             for p, bs in attrs["HostConfig"]["PortBindings"].items() for b in bs]
    podman_cli("create", "--name", "mcp-fresh-web", *ports,
               *[f"--env={e}" for e in attrs["Config"]["Env"] if e.startswith("PORT")],
               *[f"--label={k}={v}" for k, v in attrs["Config"]["Labels"].items()],
               hello_image, check=True)
    restarted(live_server, "fresh")
    r = mcp(live_server, "events", "fresh")
    assert (r.exit_code, untimed(r.output)) == (0, (
        "T fresh: deploy (version 1: web changed)\n"
        "T fresh/web: unknown -> running\n"
        "T fresh/web: running -> stopped\n"
        "T fresh/web: stopped -> stopped (restarted by agent after stopped (no exit code), "
        "restart 1)\n"
        "T fresh/web: stopped -> running\n"))
    r = mcp(live_server, "status", "fresh")
    assert (r.exit_code, untimed(r.output)) == (
        0, status_of("fresh", row(live_server, "fresh"), "stopped (no exit code)"))


def test_a_fresh_run_shows_no_exit_code_of_the_run_before(
        live_server: LiveServer, hello_image: str) -> None:
    deploy(live_server, "killed", hello_image)
    podman_cli("kill", "mcp-killed-web", check=True)   # SIGKILL: exit code 137
    restarted(live_server, "killed")
    assert row(live_server, "killed")["exit_code"] is None
    r = mcp(live_server, "status", "killed")
    # the 137 is the last run's, told by its event; the run now up has none
    assert (r.exit_code, untimed(r.output)) == (
        0, status_of("killed", row(live_server, "killed"), "exited (137)"))
