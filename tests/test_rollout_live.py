"""Health-gated rollouts against real podman, the real ``mcp-agent`` daemon and the real
``mcp deploy --wait`` (issue 19): a crash-looping release, one healthy for less than
min_healthy_s and a hanging (SIGSTOPped) one are each reverted with no operator action,
and an agent SIGKILLed mid-rollout comes back to one version, reported truthfully."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from daemon_env import Daemon, podman_daemon
from egress import no_egress_env

from mcp_node.client import Client

WAIT_S = 90.0


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    with podman_daemon(tmp_path, podman_socket) as d:
        d.start()
        yield d


def definition(tmp_path: Path, name: str, image: str, message: str, **env: str) -> Path:
    """A one-component service whose check is an HTTP GET; quick rollout timings."""
    extra = "".join(f', "{k}={v}"' for k, v in env.items())
    path = tmp_path / f"{name}-{message}.toml"
    path.write_text(f'''name = "{name}"
[update]
min_healthy_s = 2
healthy_deadline_s = 8
[[components]]
name = "web"
image = "{image}"
restart = "always"
check = "http:/"
check_interval_s = 0.3
check_failures = 2
check_timeout_s = 1
env = ["MESSAGE={message}"{extra}]
[[components.routes]]
port = 8080
''')
    return path


def client(d: Daemon) -> Client:
    return Client(d.url, (d.state / "token").read_text().strip())


def rollout(d: Daemon, name: str) -> dict[str, Any]:
    st: dict[str, Any] = client(d).get(f"/v1/services/{name}")
    return st


def serving(d: Daemon, name: str) -> str:
    """The MESSAGE of what answers on the component's host port now ("" if nothing)."""
    import urllib.request

    [row] = rollout(d, name)["components"]
    port = row["routes"][0]["host_port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return r.read().decode(errors="replace")
    except OSError:
        return ""


def podman_json(*args: str) -> Any:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=60,
                         env=no_egress_env())
    return json.loads(out.stdout or "null")


def test_a_crash_looping_release_is_reverted_and_deploy_wait_says_so(
        daemon: Daemon, hello_image: str, tmp_path: Path) -> None:
    name = f"ro{uuid.uuid4().hex[:6]}"
    good = daemon.mcp("deploy", str(definition(tmp_path, name, hello_image, "one")),
                      "--wait", "--timeout", "60")
    assert good.exit_code == 0, good.output
    # Healthy for about 1 s per run, less than min_healthy_s (2): never a success.
    bad = daemon.mcp("deploy", str(definition(tmp_path, name, hello_image, "two",
                                              EXIT_AFTER="1")), "--wait", "--timeout", "60")
    assert bad.exit_code == 1, bad.output
    st = rollout(daemon, name)
    r = st["rollout"]
    assert (r["version"], r["state"], r["previous"]) == (2, "reverted", 1), r
    assert f"the rollout of version 2 reverted: {r['reason']}; version 1 runs again" \
        in bad.output
    assert r["reason"].startswith("web ") and "after the deploy, needs 2 s healthy" in \
        r["reason"], r["reason"]
    assert st["definition"]["components"][0]["env"] == ["MESSAGE=one"]
    assert until(lambda: "one" in serving(daemon, name), WAIT_S, "v1 serving again", 0.2)
    [h1, h2, h3] = client(daemon).get(f"/v1/services/{name}/history")
    assert h3["current"] and not h2["current"] and h3["digest"] == h1["digest"], (h1, h2, h3)
    assert h3["note"] == f"reverted by the agent: {r['reason']}" and "note" not in h2
    kinds = [(e["from"], e["to"]) for e in st["events"] if e["component"] == ""]
    assert kinds[-3:] == [("", "deploy"), ("in_progress", "failed"), ("failed", "reverted")]


def test_a_hanging_release_is_reverted(daemon: Daemon, hello_image: str,
                                       tmp_path: Path) -> None:
    """Each run of v2 is SIGSTOPped once it answered: its checks time out, it is
    unhealthy and restarted, and never healthy for min_healthy_s."""
    name = f"rh{uuid.uuid4().hex[:6]}"
    assert daemon.mcp("deploy", str(definition(tmp_path, name, hello_image, "one")),
                      "--wait", "--timeout", "60").exit_code == 0
    stop = threading.Event()
    stopped: set[int] = set()

    def hang_v2() -> None:
        while not stop.wait(0.2):
            for c in podman_json("ps", "--format", "json") or []:
                if not any(n.endswith(f"{name}-web") or name in n for n in c.get("Names", [])):
                    continue
                info = podman_json("inspect", c["Id"])
                if not info:
                    continue
                env = info[0].get("Config", {}).get("Env") or []
                pid = info[0].get("State", {}).get("Pid") or 0
                if "MESSAGE=two" in env and pid and pid not in stopped:
                    time.sleep(0.5)            # let it pass its check once
                    os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)

    t = threading.Thread(target=hang_v2, daemon=True)
    t.start()
    try:
        res = daemon.mcp("deploy", str(definition(tmp_path, name, hello_image, "two")),
                         "--wait", "--timeout", "60")
    finally:
        stop.set()
        t.join(timeout=10)
    assert res.exit_code == 1, res.output
    r = rollout(daemon, name)["rollout"]
    assert (r["version"], r["state"]) == (2, "reverted"), r
    assert stopped, "v2 never ran"
    assert until(lambda: "one" in serving(daemon, name), WAIT_S, "v1 serving again", 0.2)


def test_an_agent_killed_mid_rollout_converges_to_one_version(
        daemon: Daemon, hello_image: str, tmp_path: Path) -> None:
    name = f"rk{uuid.uuid4().hex[:6]}"
    assert daemon.mcp("deploy", str(definition(tmp_path, name, hello_image, "one")),
                      "--wait", "--timeout", "60").exit_code == 0
    res = daemon.mcp("deploy", str(definition(tmp_path, name, hello_image, "two",
                                              EXIT_AFTER="1")))
    assert res.exit_code == 0, res.output
    assert rollout(daemon, name)["rollout"]["state"] == "failed" or \
        rollout(daemon, name)["rollout"]["state"] == "in_progress"
    time.sleep(1.5)
    daemon.kill()                   # mid-rollout: its workloads stay as they are
    daemon.start()
    r = until(lambda: (x := rollout(daemon, name)["rollout"])["state"] == "reverted"
              and not x["reverting"] and x, WAIT_S, "the restarted agent's revert", 0.2)
    assert (r["version"], r["previous"]) == (2, 1)
    assert until(lambda: "one" in serving(daemon, name), WAIT_S, "v1 serving again", 0.2)
    ps = client(daemon).get("/v1/services")
    rows = [p for p in ps if p["service"] == name]
    assert len(rows) == 1 and rows[0]["state"] == "running"
    running = [c for c in podman_json("ps", "--format", "json") or []
               if any(name in n for n in c.get("Names", []))]
    assert len(running) == 1, running
