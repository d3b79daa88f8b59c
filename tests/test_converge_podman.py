"""A node that keeps itself converged, with containers, through the real daemon.

``mcp-agent`` runs as a child process on the session's podman service with a
0.3 s monitor: after a reboot (containers stopped or removed, agent killed and
started again) every desired-running component answers again and stopped ones
stay stopped; a crash-looping component is restarted with backoff and reported;
``restart = "no"`` leaves it down and says so.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_env import Daemon, podman_daemon, refused
from podman_env import podman_cli, wait_http

WAIT_S = 60.0


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    with podman_daemon(tmp_path, podman_socket, "restart_backoff_max_s = 4\n") as d:
        yield d


def until(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def container_id(name: str) -> str:
    proc = podman_cli("inspect", "--format", "{{.Id}}", name)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def host_port(status: dict[str, Any], comp: str) -> int:
    row = next(c for c in status["components"] if c["component"] == comp)
    return int(row["routes"][0]["host_port"])


def svc_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def test_reboot_brings_back_what_should_run(daemon: Daemon, hello_image: str) -> None:
    client = daemon.start()
    up, down = svc_name("up"), svc_name("dn")
    st = client.post("/v1/services", {"name": up, "components": [
        {"name": "kept", "image": hello_image, "env": ["MESSAGE=kept"],
         "routes": [{"port": 8080}]},
        {"name": "gone", "image": hello_image, "env": ["MESSAGE=gone"],
         "routes": [{"port": 8080}]}]})
    kept_port, gone_port = host_port(st, "kept"), host_port(st, "gone")
    st_down = client.post("/v1/services", {"name": down, "components": [
        {"name": "web", "image": hello_image, "routes": [{"port": 8080}]}]})
    down_port = host_port(st_down, "web")
    client.post(f"/v1/services/{down}/stop", {})
    assert wait_http(kept_port, "/before-reboot") == "hello from kept\n"
    kept_id = container_id(f"mcp-{up}-kept")
    assert kept_id

    # The reboot: the agent dies, one container is stopped, the other is gone.
    daemon.kill()
    podman_cli("stop", "-t", "0", f"mcp-{up}-kept", check=True)
    podman_cli("rm", "-f", "-t", "0", f"mcp-{up}-gone", check=True)
    assert refused(kept_port) and refused(gone_port)

    t0 = time.monotonic()
    client = daemon.start()
    assert wait_http(kept_port, timeout=WAIT_S) == "hello from kept\n"
    assert wait_http(gone_port, timeout=WAIT_S) == "hello from gone\n"
    print(f"both components answered {time.monotonic() - t0:.1f} s after the agent start")
    # Started, not recreated: same container, its log from before the reboot kept.
    assert container_id(f"mcp-{up}-kept") == kept_id
    logs = daemon.mcp("logs", up, "kept")
    assert logs.exit_code == 0 and "GET /before-reboot" in logs.output
    # The stopped service stays stopped, over several monitor rounds.
    for _ in range(5):
        rows = {r["component"]: r for r in client.get("/v1/services")
                if r["service"] == down}
        assert rows["web"]["state"] == "stopped" and rows["web"]["desired_state"] == "stopped"
        assert refused(down_port)
        time.sleep(0.3)
    status = client.get(f"/v1/services/{up}")
    assert not status["drift"]
    assert all(c["spec_drift"] is False for c in status["components"])


def test_crash_loop_is_restarted_with_backoff_and_reported(daemon: Daemon,
                                                           hello_image: str) -> None:
    client = daemon.start()
    svc = svc_name("crash")
    client.post("/v1/services", {"name": svc, "components": [
        {"name": "web", "image": hello_image, "env": ["EXIT_AFTER=1"],
         "routes": [{"port": 8080}]}]})
    seen: dict[str, Any] = {"backoff": None, "restarts": []}

    def looped() -> bool:
        st = client.get(f"/v1/services/{svc}")
        [c] = st["components"]
        seen["restarts"].append(c["restarts"])
        if c["state"] == "backoff" and c["next_attempt"]:
            seen["backoff"] = c
        return seen["backoff"] is not None and c["restarts"] >= 3 and st["flapping"]

    until("restarts, backoff and flapping", looped)
    b = seen["backoff"]
    assert b["exit_code"] == 1 and b["desired_state"] == "running"
    assert b["next_attempt"].endswith("Z")
    restarts = seen["restarts"]
    assert restarts == sorted(restarts) and restarts[-1] > restarts[0]   # growing
    health = client.get("/v1/health")
    assert health["status"] == "degraded"
    assert any(f"{svc}/web" in r and "flapping" in r for r in health["reasons"])
    # The agent restarts it, not podman: podman's own restart count stays 0.
    info = json.loads(podman_cli("inspect", "--format", "json", f"mcp-{svc}-web",
                                 check=True).stdout)[0]
    assert info["RestartCount"] == 0
    assert info["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")


def test_restart_no_leaves_it_down_and_reported(daemon: Daemon, hello_image: str) -> None:
    client = daemon.start()
    svc = svc_name("norst")
    client.post("/v1/services", {"name": svc, "components": [
        {"name": "web", "image": hello_image, "env": ["EXIT_AFTER=1"], "restart": "no",
         "routes": [{"port": 8080}]}]})

    def exited() -> dict[str, Any] | None:
        [c] = client.get(f"/v1/services/{svc}")["components"]
        return c if c["state"] == "stopped" and c["exit_code"] == 1 else None

    c = until("the exit to be seen", exited)
    cid = container_id(f"mcp-{svc}-web")

    def held() -> dict[str, Any] | None:
        h: dict[str, Any] = client.get("/v1/health")
        return h if any(f"{svc}/web" in r and "not restarted" in r
                        for r in h["reasons"]) else None

    health = until("health to report it held down", held)
    assert health["status"] == "degraded"
    for _ in range(8):   # left down over many monitor rounds
        [c] = client.get(f"/v1/services/{svc}")["components"]
        assert c["state"] == "stopped" and c["restarts"] == 0 and c["exit_code"] == 1
        time.sleep(0.3)
    assert container_id(f"mcp-{svc}-web") == cid
    assert refused(host_port(client.get(f"/v1/services/{svc}"), "web"))
