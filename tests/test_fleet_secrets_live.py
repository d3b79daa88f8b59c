"""Fleet secrets end to end (issue 20, item 4): a real 3-member etcd and two real
``mcp-agent`` daemons in fleet mode on the test podman, c1 given the fleet key and c2
another key (both made with ``mcp-agent secrets new-fleet-key``). ``mcp secret set``
through c1 seals into etcd; a container placed on c1 (deployed through c2's API) reads
/run/secrets/NAME; a service pinned to c2 is refused by c2, naming the node, the secret
and why, and nothing of it runs; c2 cannot write a secret either. A new version is a
change plan shows and a deploy rolls out; ``rm`` is refused naming the service. Then
etcd's raw values and data files, both agents' logs and registries, every answer and
every /proc/*/cmdline are searched for the value, and it is nowhere."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from conftest import until
from daemon_env import Daemon
from egress import no_egress_env
from etcd_env import EtcdCluster
from podman_env import containers_conf, podman_cli

from mcp_node import fence
from mcp_node.cli import cli
from mcp_node.client import Client
from mcp_node.errors import RemoteError

VALUE = "Fq7-" + uuid.uuid4().hex[:12]     # unique: found only where it leaked
VALUE2 = VALUE + "-v2"
AGENT = str(Path(sys.executable).parent / "mcp-agent")


def _agent_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, *args], env=no_egress_env(), capture_output=True, text=True,
                          timeout=60, check=True)


class FleetNode:
    def __init__(self, base: Path, name: str, etcd: list[str], podman: str, key: Path) -> None:
        self.name, self.base = name, base
        base.mkdir()
        self.state = base / "state"
        self.state.mkdir(mode=0o700)
        self.conf = base / "agent.toml"
        self.conf.write_text(
            f'[podman]\nsocket = "{podman}"\ncontainers_conf = "{containers_conf()}"\n'
            f'[monitor]\ninterval_s = 0.3\n[secrets]\nfleet_key_file = "{key}"\n'
            f'[cluster]\netcd = {json.dumps(etcd)}\nnode = "{name}"\nlease_ttl_s = 4\n'
            'grace_s = 1\ntimeout_s = 1\nmemory_mb = 2048\ndeploy_wait_s = 60\n')
        # fleet writes need the master role: it is the token Daemon.start waits for
        self.token = self.state / "token"
        _agent_cmd("--config", str(self.conf), "--state-dir", str(self.state), "token", "add",
                   "fleet-master", "master", "--output", str(self.token))
        self.daemon = Daemon(self.state, self.conf)
        self.client: Client | None = None

    def start(self) -> Client:
        self.daemon.start()
        self.client = Client(self.daemon.url, self.token.read_text().strip())
        return self.client

    @property
    def api(self) -> Client:
        assert self.client is not None, f"{self.name} is not started"
        return self.client

    def mcp(self, *args: str, stdin: str | None = None) -> Any:
        return CliRunner().invoke(cli, ["--agent", self.daemon.url, "--token-file",
                                        str(self.token), *args], input=stdin)

    def stop(self) -> None:
        self.daemon.stop()
        self.daemon.remove_containers()
        pid = fence.fence_pid(self.state)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def nodes(tmp_path: Path, etcd_cluster: EtcdCluster,
          podman_socket: str) -> Iterator[dict[str, FleetNode]]:
    right, wrong = tmp_path / "fleet.key", tmp_path / "other.key"
    for key in (right, wrong):
        out = _agent_cmd("--state-dir", str(tmp_path / "keygen"), "secrets", "new-fleet-key",
                         str(key))
        assert "copy it to every node" in out.stdout
    made = {"c1": FleetNode(tmp_path / "c1", "c1", etcd_cluster.endpoints, podman_socket, right),
            "c2": FleetNode(tmp_path / "c2", "c2", etcd_cluster.endpoints, podman_socket, wrong)}
    try:
        for n in made.values():
            n.start()
        yield made
    finally:
        for n in made.values():
            n.stop()


def _all_cmdlines() -> bytes:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((p / "cmdline").read_bytes())
    return b"\n".join(out)


def _etcd_raw(endpoint: str) -> bytes:
    """Every key and value in etcd, as stored (the JSON gateway's base64 undone)."""
    everything = base64.b64encode(b"\0").decode()
    r = requests.post(f"{endpoint}/v3/kv/range", json={"key": everything,
                                                       "range_end": everything}, timeout=5)
    r.raise_for_status()
    return b"\n".join(base64.b64decode(kv["key"]) + b"=" + base64.b64decode(kv.get("value", ""))
                      for kv in r.json().get("kvs", []))


def test_fleet_secret_reaches_the_placed_container_and_leaks_nowhere(
        nodes: dict[str, FleetNode], etcd_cluster: EtcdCluster, busybox_image: str) -> None:
    c1, c2 = nodes["c1"], nodes["c2"]
    until(lambda: {n["node"] for n in c2.api.get("/v1/nodes") if n["state"] == "up"}
          == {"c1", "c2"}, 30, "both nodes did not join")
    answers: list[Any] = []
    svc, other = f"s{uuid.uuid4().hex[:6]}", f"o{uuid.uuid4().hex[:6]}"

    res = c1.mcp("secret", "set", "db-password", stdin=VALUE + "\n")
    assert (res.exit_code, res.stdout) == (0, "secret db-password version 1 stored\n")
    res = c2.mcp("secret", "set", "db-password", stdin="nope\n")       # another key
    assert res.exit_code == 1 and "this node's fleet key (secrets.fleet_key_file" in res.stderr
    answers += [res.stdout, res.stderr]

    def box(name: str, node: str) -> dict[str, Any]:
        return {"name": name, "node": node, "components": [
            {"name": "box", "image": busybox_image, "cmd": ["sh", "-c", "sleep 600"],
             "secrets": ["db-password"], "env": ["DB_PASSWORD=secret:db-password"]}]}

    st = c2.api.post("/v1/services", box(svc, "c1"))      # any agent places it
    answers.append(st)
    assert st["node"] == "c1"
    name = f"mcp-{svc}-box"
    got = podman_cli("exec", name, "/bin/busybox", "cat", "/run/secrets/db-password")
    assert got.stdout == VALUE, got.stderr
    env = podman_cli("exec", name, "/bin/busybox", "sh", "-c", 'printf %s "$DB_PASSWORD"')
    assert env.stdout == VALUE

    # c2 holds another key: it runs nothing of a service placed on it, and says why
    with pytest.raises(RemoteError) as refused:
        c1.api.post("/v1/services", box(other, "c2"))
    msg = str(refused.value)
    answers.append(msg)
    assert "node c2: cannot run service " + other + ": secret db-password version 1: it " \
        "was sealed with fleet key " in msg and "but this node's secrets.fleet_key_file" in msg
    assert "nothing changed here" in msg
    assert podman_cli("ps", "-a", "--format", "{{.Names}}").stdout.count(other) == 0
    assert f"fleet: service={other} generation=1 failed here: cannot run service" in \
        c2.daemon.log()

    # a new version: plan shows it, a deploy rolls it out
    res = c1.mcp("secret", "set", "db-password", stdin=VALUE2 + "\n")
    assert res.exit_code == 0 and f"used by {svc}" in res.stdout
    plan = c2.api.post("/v1/plan", box(svc, "c1"))
    answers.append(plan)
    assert plan["changes"][0]["fields"] == [
        {"field": "secret_versions", "from": [["db-password", 1]], "to": [["db-password", 2]]}]
    answers.append(c1.api.post("/v1/services", box(svc, "c1")))
    got = podman_cli("exec", name, "/bin/busybox", "cat", "/run/secrets/db-password")
    assert got.stdout == VALUE2, got.stderr
    res = c2.mcp("secret", "rm", "db-password")
    assert (res.exit_code, res.stderr) == (1, f"Error: secret db-password is used by service "
                                           f"{svc} in the fleet: take it out of their "
                                           "definitions and deploy them, or undeploy them, "
                                           "first\n")
    res = c2.mcp("secret", "list")
    assert res.exit_code == 0 and "db-password" in res.stdout and svc in res.stdout
    answers.append(res.stdout)
    for n in (c1, c2):
        for path in (f"/v1/services/{svc}", f"/v1/services/{svc}/history", "/v1/secrets",
                     "/v1/events", "/v1/health", "/v1/services", "/v1/nodes"):
            with contextlib.suppress(RemoteError):
                answers.append(n.api.get(path))
        answers.append(n.api.request("GET", "/metrics"))

    # nowhere in clear
    blob = json.dumps(answers, default=str)
    for v in (VALUE, VALUE2):
        b = v.encode()
        b64 = base64.b64encode(b)
        assert v not in blob and b64.decode() not in blob
        raw = _etcd_raw(etcd_cluster.endpoints[0])
        assert b"/mcp/secrets/db-password" in raw and b not in raw and b64 not in raw
        for f in etcd_cluster.base.rglob("*"):       # its WAL and snapshot files
            if f.is_file():
                assert b not in f.read_bytes(), f
        for n in (c1, c2):
            assert v not in n.daemon.log()
            for f in n.state.glob("registry.db*"):
                assert b not in f.read_bytes(), f
        cmdlines = _all_cmdlines()
        assert b not in cmdlines and b64 not in cmdlines
    assert "fleet: secret set name=db-password version=2" in c1.daemon.log()

    c1.api.delete(f"/v1/services/{svc}")
    res = c1.mcp("secret", "rm", "db-password")
    assert (res.exit_code, res.stdout) == (0, "removed secret db-password\n")
