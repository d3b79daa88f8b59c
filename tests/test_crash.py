"""SIGKILL the agent daemon mid-deploy, start it again: the registry still matches
what podman runs. No row is lost, and every container with the agent's label is
either adopted (a registry component) or reported as an orphan."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_env import Daemon
from podman_env import podman_cli, wait_http

from mcp_node.errors import MCPError
from mcp_node.runtime import LABEL_OWNER


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\nsocket = "{podman_socket}"\n[monitor]\ninterval_s = 0.3\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    d = Daemon(state, conf)
    try:
        yield d
    finally:
        d.stop()
        d.remove_containers()


def owned(owner: str) -> list[str]:
    out = podman_cli("ps", "-a", "--format", "{{.Names}}", "--filter",
                     f"label={LABEL_OWNER}={owner}").stdout
    return sorted(out.split())


def test_sigkill_mid_deploy_leaves_registry_consistent(daemon: Daemon,
                                                       hello_image: str) -> None:
    client = daemon.start()
    owner = (daemon.state / "node_id").read_text().strip()
    svc = f"k{uuid.uuid4().hex[:8]}"
    body = {"name": svc, "components": [
        {"name": f"c{i}", "image": hello_image, "env": [f"MESSAGE={i}"],
         "routes": [{"port": 8080}]} for i in range(5)]}

    def deploy() -> None:
        with contextlib.suppress(MCPError):  # the agent dies under it
            client.post("/v1/services", body)

    t = threading.Thread(target=deploy, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not owned(owner):
        assert time.monotonic() < deadline, "deploy never created a container"
        time.sleep(0.02)
    daemon.kill()
    t.join(timeout=30)
    before = owned(owner)
    assert 1 <= len(before) <= 5
    print(f"killed with {len(before)} of 5 containers created")

    client = daemon.start()
    rows = client.get("/v1/services")
    comps = {r["component"] for r in rows if r["service"] == svc}
    # The registry row was written before the first container: nothing lost.
    assert comps == {f"c{i}" for i in range(5)}
    health = client.get("/v1/health")
    for name in owned(owner):
        comp = name.removeprefix(f"mcp-{svc}-")
        adopted = comp in comps
        reported = f"{svc}/{comp} (container)" in health["orphans"]
        assert adopted or reported, name
    status = client.get(f"/v1/services/{svc}")
    not_running = [c["component"] for c in status["components"] if c["state"] != "running"]
    # Whatever did not get to run is flagged as drift, not silently missing.
    assert all(c["drift"] for c in status["components"] if c["state"] != "running")
    assert status["drift"] == bool(not_running)

    # Deploying again converges: everything runs and answers.
    client.post("/v1/services", body)
    final = client.get(f"/v1/services/{svc}")
    assert final["drift"] is False
    for c in final["components"]:
        assert c["state"] == "running"
        assert wait_http(c["routes"][0]["host_port"]) == f"hello from {c['component'][1:]}\n"
    assert owned(owner) == sorted(f"mcp-{svc}-c{i}" for i in range(5))
