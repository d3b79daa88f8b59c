"""Checks that keep running, against the real runtimes, through an agent with its
monitor, reconciler and checker threads: a SIGSTOPped container is found unhealthy and
restarted (real podman); a VM is ready only once its guest accepts, never on QEMU's
forwarder alone (real Nanos on microvm)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from podman_env import containers_conf, podman_cli
from qemu_env import VMReaper, nanos_dir

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.readiness import connect
from mcp_node.runtime import workload_name
from mcp_node.servicedef import from_dict

pytestmark = pytest.mark.integration

INTERVAL_S, FAILURES, TIMEOUT_S = 1.0, 2, 0.5
# the checks' bound (interval x failures + one interval), the stop's grace and a start,
# with room for a busy CI machine
RESTART_BOUND_S = INTERVAL_S * FAILURES + INTERVAL_S + 30


def wait_for(what: str, cond: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout:g} s")
        time.sleep(0.1)


def comp_status(agent: Agent, svc: str, name: str) -> dict[str, Any]:
    return next(c for c in agent.status(svc)["components"] if c["component"] == name)


@pytest.fixture
def live_agent(podman_socket: str, tmp_path: Path,
               podman_cleanup: Any) -> Iterator[Agent]:
    cfg = config_from_dict({
        "podman": {"socket": podman_socket, "containers_conf": containers_conf()},
        "qemu": {"nanos_dir": str(nanos_dir()), "machine": "microvm", "accel": "tcg"},
        "state": {"dir": str(tmp_path / "state")},
        "monitor": {"interval_s": 0.2}})
    a = Agent(cfg, monitor=True)
    podman_cleanup.add(a.owner)
    reaper = VMReaper()
    reaper.watch(cfg.state_dir)
    try:
        yield a
    finally:
        a.close()
        reaper.run()


def test_a_sigstopped_container_is_unhealthy_and_restarted(live_agent: Agent,
                                                           hello_image: str) -> None:
    svc = f"h{uuid.uuid4().hex[:8]}"
    live_agent.deploy(from_dict({"name": svc, "components": [{
        "name": "web", "image": hello_image, "routes": [{"port": 8080}], "check": "http:/",
        "check_interval_s": INTERVAL_S, "check_failures": FAILURES,
        "check_timeout_s": TIMEOUT_S}]}))
    wait_for("ready", lambda: comp_status(live_agent, svc, "web")["ready"], 30)
    first = live_agent.checks.result(svc, "web")
    assert first is not None and first.ok and first.detail == "HTTP 200"
    pid = int(podman_cli("inspect", "--format", "{{.State.Pid}}",
                         workload_name(svc, "web"), check=True).stdout.strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        def restarted() -> list[str]:
            return [e["detail"] for e in live_agent.events(svc)
                    if e["detail"].startswith("restarted: unhealthy")]

        [detail] = wait_for("restarted", restarted, RESTART_BOUND_S)
        assert detail == (f"restarted: unhealthy (http:/: timed out after {TIMEOUT_S:g} s "
                          f"x{FAILURES}), restart 1")
        details = [e["detail"] for e in live_agent.events(svc)]
        assert (f"unhealthy (http:/: timed out after {TIMEOUT_S:g} s x{FAILURES}): "
                "restarting it") in details
        # a new run, which passes its check again
        wait_for("ready again", lambda: comp_status(live_agent, svc, "web")["ready"], 30)
        again = live_agent.checks.result(svc, "web")
        assert again is not None and again.run != first.run and again.ok
        c = comp_status(live_agent, svc, "web")
        assert c["restarts"] == 1 and c["check"]["detail"] == "HTTP 200"
        assert live_agent.check_failures()[(svc, "web")] >= FAILURES   # and during the stop
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_vm_is_ready_only_once_its_guest_accepts(live_agent: Agent,
                                                   hello_image: str) -> None:
    """``good`` listens on its route's port (PORT_HTTP); ``deaf`` gets PORT_OTHER, which
    hello does not read, so it listens on 8080 while QEMU forwards another port."""
    from qemu_env import need_nanos

    need_nanos()
    svc = f"v{uuid.uuid4().hex[:8]}"
    vm = {"image": hello_image, "runtime": "unikernel", "memory_mb": 128,
          "check_interval_s": INTERVAL_S}
    live_agent.deploy(from_dict({"name": svc, "components": [
        {**vm, "name": "good", "routes": [{"name": "http", "port": 8080}]},
        {**vm, "name": "deaf", "routes": [{"name": "other", "port": 8080}]}]}))
    good = wait_for("ready", lambda: (lambda c: c if c["ready"] else None)(
        comp_status(live_agent, svc, "good")), 60)
    port = good["routes"][0]["host_port"]
    # ready means the guest answers now: one GET, no retry
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        assert resp.read() == b"hello from mcp\n"
    deaf = comp_status(live_agent, svc, "deaf")
    assert deaf["state"] == "starting" and deaf["ready"] is False
    assert connect(deaf["routes"][0]["host_port"], 1.0) == ""   # the forwarder accepts
    # once its guest is up, it resets the connection the forwarder accepted
    deaf = wait_for("the guest's reset", lambda: (lambda c: c if (c["check"] or {}).get(
        "detail") == "closed before the guest accepted" else None)(
            comp_status(live_agent, svc, "deaf")), 30)
    assert deaf["check"]["ok"] is False and deaf["state"] == "starting"
