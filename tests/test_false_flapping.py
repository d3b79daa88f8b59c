"""Repairs after an agent crash are not flapping (issue 18).

The agent runs as a daemon process and is SIGKILLed during redeploys, at seeded
delays (each round's seed printed). Its restarted self repairs what the cut
redeploy left (a container removed, stopped or from the old spec); none of the
workloads (busy-free hello servers) ever exits by itself, so health must never
call a component flapping, however many such repairs fall in the flap window.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_env import Daemon, podman_daemon
from test_crash import converge

from mcp_node.client import Client
from mcp_node.errors import MCPError
from mcp_node.monitor import observe
from mcp_node.records import ComponentRecord, ServiceRecord
from mcp_node.runtime import Workload
from mcp_node.servicedef import ComponentDef
from mcp_node.states import MISSING, RUNNING, STOPPED

ROUNDS = int(os.environ.get("MCP_FLAP_ROUNDS", "8"))


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    with podman_daemon(tmp_path, podman_socket) as d:
        yield d


def test_repairs_after_agent_kills_are_not_flapping(daemon: Daemon, hello_image: str) -> None:
    client = daemon.start()
    owner = daemon.owner
    svc = f"fl{uuid.uuid4().hex[:6]}"

    def body(n: int) -> dict[str, object]:
        return {"name": svc, "components": [
            {"name": c, "image": hello_image, "env": [f"MESSAGE={c}{n}"],
             "routes": [{"port": 8080}]} for c in ("a", "b")]}

    client.post("/v1/services", body(0))
    converge(daemon, owner, "first deploy")
    took = 1.0
    for rnd in range(1, ROUNDS + 1):
        seed = random.randrange(2**32)
        delay = random.Random(seed).uniform(0, took)
        print(f"round {rnd} seed {seed}: kill the agent {delay:.3f}s into a redeploy",
              flush=True)
        done = threading.Event()
        started = time.monotonic()

        def op(c: Client = client, n: int = rnd) -> None:
            with contextlib.suppress(MCPError):   # the agent dies under it
                c.post("/v1/services", body(n))
            done.set()

        t = threading.Thread(target=op, daemon=True)
        t.start()
        if done.wait(delay):
            took = max(took * 0.8, (time.monotonic() - started) * 1.2)
        daemon.kill()
        t.join(timeout=30)
        client = daemon.start()
        converge(daemon, owner, f"round {rnd} seed {seed}")
        health = client.get("/v1/health")
        status = client.get(f"/v1/services/{svc}")
        assert health["flapping"] == [] and not status["flapping"], (
            f"round {rnd} seed {seed}: {health['reasons']}\n{status['events']}")


def test_only_an_exit_of_the_current_spec_is_unplanned() -> None:
    """The monitor's rule, on made-up listings: a stopped container of the spec the
    component should run crashed; one of an older spec, or a missing one, is the
    agent's own replace (cut by a crash) and no flap."""
    comp = ComponentRecord(ComponentDef(name="web", image="i"), observed_state=RUNNING)
    rec = ServiceRecord(name="s", active=True, components=[comp])

    def event(state: str, digest: str) -> bool:
        listing = [Workload("s", "web", "container", state, spec_digest=digest)] \
            if state != MISSING else []
        _, _, [ev] = observe([rec], {"container": listing}, {}, {}, 1.0,
                             lambda r, c: "current")
        return ev.unplanned

    assert event(STOPPED, "current") is True
    assert event(STOPPED, "") is True          # a runtime that records no digest
    assert event(STOPPED, "older") is False
    assert event(MISSING, "") is False
