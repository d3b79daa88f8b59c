"""Agent lifecycle with real podman: deploy, redeploy, stop/start/restart, undeploy,
drift, flapping, rollback, concurrency."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from podman_env import podman_cli, wait_http

from mcp_node.agent import Agent
from mcp_node.config import AgentConfig, MonitorConfig
from mcp_node.errors import (
    ConflictError,
    ImageError,
    NotFoundError,
    ValidationError,
)
from mcp_node.runtime import LABEL_OWNER
from mcp_node.servicedef import ServiceDef, from_dict


def name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def hello(svc: str, image: str, message: str = "one", comps: int = 1,
          **extra: object) -> ServiceDef:
    return from_dict({"name": svc, "components": [
        {"name": f"web{i}" if i else "web", "image": image, "env": [f"MESSAGE={message}"],
         "routes": [{"port": 8080}], **extra}
        for i in range(comps)
    ]})


def port_of(agent: Agent, svc: str, comp: str = "web") -> int:
    rec = agent.registry.get_service(svc).component(comp)
    return rec.host_ports[""]


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def owned_containers(agent: Agent) -> list[str]:
    out = podman_cli("ps", "-a", "--format", "{{.Names}}", "--filter",
                     f"label={LABEL_OWNER}={agent.owner}").stdout
    return sorted(out.split())


@pytest.fixture
def agent(podman_config: AgentConfig, podman_cleanup: object,
          tmp_path: Path) -> Iterator[Agent]:
    cfg = replace(podman_config, monitor=MonitorConfig(interval_s=0.2, flap_changes=3,
                                                      flap_window_s=60),
                  podman=replace(podman_config.podman, volume_roots=(str(tmp_path),)))
    a = Agent(cfg)
    podman_cleanup.add(a.owner)  # type: ignore[attr-defined]
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def foreign(hello_image: str) -> Iterator[Callable[[str, str], None]]:
    """Makes a container of a workload's name that is not the agent's: the create of that
    component fails after the registry was written (ConflictError) and the container is
    left alone. (A missing host path was that failure once; it is a 400 at deploy now,
    and a failed podman start holds the host port in podman's service for a while.)"""
    names: list[str] = []

    def make(svc: str, comp: str) -> None:
        names.append(f"mcp-{svc}-{comp}")
        podman_cli("create", "--name", names[-1], hello_image, check=True)

    try:
        yield make
    finally:
        if names:
            podman_cli("rm", "-f", "-t", "0", *names)


def test_deploy_serves_and_lifecycle(agent: Agent, hello_image: str) -> None:
    svc = name()
    st = agent.deploy(hello(svc, hello_image, "lifecycle"))
    assert st["service"] == svc and st["drift"] is False
    [comp] = st["components"]
    assert comp["state"] == "running" and comp["runtime"] == "container"
    assert comp["version"] == "v1"
    port = port_of(agent, svc)
    assert comp["routes"] == [{"name": "", "port": 8080, "mode": "l7", "hostname": "",
                               "host_port": port}]
    assert wait_http(port) == "hello from lifecycle\n"

    [row] = [r for r in agent.ps() if r["service"] == svc]
    assert set(row) == {"service", "component", "node", "runtime", "state", "desired_state",
                        "version", "uptime_s", "routes"}
    assert row["node"] == agent.node and row["desired_state"] == "running"

    logs = b"".join(agent.logs(svc, None, None, False)).decode()
    assert f"listening on :{port}" in logs and "GET / HTTP" in logs

    st = agent.stop(svc)
    assert st["components"][0]["state"] == "stopped"
    assert st["components"][0]["desired_state"] == "stopped" and st["drift"] is False
    assert refused(port)

    agent.start(svc)
    assert wait_http(port) == "hello from lifecycle\n"
    agent.restart(svc)
    assert wait_http(port) == "hello from lifecycle\n"

    agent.undeploy(svc)
    assert owned_containers(agent) == []
    with pytest.raises(NotFoundError):
        agent.status(svc)
    assert agent.registry._query("SELECT COUNT(*) FROM routes WHERE service=?", (svc,))[0][0] == 0
    assert agent.registry._query("SELECT COUNT(*) FROM events WHERE service=?", (svc,))[0][0] == 0


def test_redeploy_unchanged_keeps_changed_replaces(agent: Agent, hello_image: str,
                                                   hello_image_v2: str) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image))
    first = agent.runtime("container").inspect(svc, "web")
    port = port_of(agent, svc)
    agent.deploy(hello(svc, hello_image))
    same = agent.runtime("container").inspect(svc, "web")
    assert first is not None and same is not None and same.id == first.id

    st = agent.deploy(hello(svc, hello_image_v2, "two"))
    new = agent.runtime("container").inspect(svc, "web")
    assert new is not None and new.id != first.id
    assert st["components"][0]["version"] == "v2"
    assert port_of(agent, svc) == port  # the allocated port survives a redeploy
    assert wait_http(port) == "hello from two\n"

    # A component dropped from the definition is removed.
    agent.deploy(hello(svc, hello_image, comps=2))
    assert owned_containers(agent) == [f"mcp-{svc}-web", f"mcp-{svc}-web1"]
    agent.deploy(hello(svc, hello_image, comps=1))
    assert owned_containers(agent) == [f"mcp-{svc}-web"]


def test_missing_image_changes_nothing(agent: Agent) -> None:
    svc = name()
    with pytest.raises(ImageError, match="localhost/nope"):
        agent.deploy(hello(svc, "localhost/nope:v9"))
    assert not agent.registry.has_service(svc)
    assert owned_containers(agent) == []


def test_failed_run_rolls_back_to_previous(agent: Agent, hello_image: str,
                                           foreign: Callable[[str, str], None]) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image, "good"))
    port = port_of(agent, svc)
    foreign(svc, "web1")
    with pytest.raises(ConflictError, match="not managed by this agent"):
        agent.deploy(hello(svc, hello_image, "bad", comps=2))
    rec = agent.registry.get_service(svc)
    assert rec.components[0].defn.env == ("MESSAGE=good",)
    assert rec.components[0].host_ports[""] == port
    assert wait_http(port) == "hello from good\n"

    fresh = name()
    foreign(fresh, "web")
    with pytest.raises(ConflictError, match="not managed by this agent"):
        agent.deploy(hello(fresh, hello_image))
    assert not agent.registry.has_service(fresh)
    assert owned_containers(agent) == [f"mcp-{svc}-web"]


def test_drift_when_stopped_behind_the_agents_back(agent: Agent, hello_image: str) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image))
    podman_cli("stop", "-t", "1", f"mcp-{svc}-web", check=True)
    agent.monitor.refresh()  # what one monitor interval does
    st = agent.status(svc)
    assert st["drift"] is True and st["components"][0]["state"] == "stopped"
    assert st["events"][-1]["from"] == "running" and st["events"][-1]["to"] == "stopped"
    health = agent.health()
    assert health["status"] == "degraded" and f"{svc}/web" in health["drifted"]


def test_monitor_thread_sees_drift_within_an_interval(agent: Agent, hello_image: str) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image))
    agent.monitor.start()
    podman_cli("stop", "-t", "1", f"mcp-{svc}-web", check=True)
    deadline = time.monotonic() + 20
    while not agent.status(svc)["drift"]:
        assert time.monotonic() < deadline, "drift never reported"
        time.sleep(0.1)


def test_flapping_container_is_flagged(agent: Agent, hello_image: str) -> None:
    svc = name()
    definition = from_dict({"name": svc, "components": [{
        "name": "web", "image": hello_image, "env": ["EXIT_AFTER=1"], "restart": "always",
        "routes": [{"port": 8080}]}]})
    agent.deploy(definition)
    agent.start_monitor(reconcile=True)   # the agent, not podman, restarts it (with backoff)
    deadline = time.monotonic() + 60
    while not agent.status(svc)["flapping"]:
        assert time.monotonic() < deadline, "flapping never flagged"
        time.sleep(0.3)
    st = agent.status(svc)
    assert st["components"][0]["flapping"] is True
    assert any("restart" in e["detail"] or e["to"] != e["from"] for e in st["events"])


def test_orphan_containers_are_reported(agent: Agent, hello_image: str) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image))
    # Forget the service in the registry only: the container is now nobody's.
    agent.registry.delete_service(svc)
    agent.monitor.refresh()
    assert f"{svc}/web (container)" in agent.health()["orphans"]


def test_bad_names_and_unknown_services(agent: Agent) -> None:
    with pytest.raises(ValidationError):
        agent.status("../x")
    with pytest.raises(ValidationError):
        agent.stop("a,b")
    with pytest.raises(NotFoundError):
        agent.status("nosuchservice")
    with pytest.raises(NotFoundError):
        agent.undeploy("nosuchservice")


def test_concurrent_deploys(agent: Agent, hello_image: str) -> None:
    names = [name() for _ in range(4)]
    errors: list[BaseException] = []

    def go(svc: str) -> None:
        try:
            agent.deploy(hello(svc, hello_image, svc))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in names]
    threads += [threading.Thread(target=go, args=(names[0],))]  # same service twice
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors
    ports = {port_of(agent, n) for n in names}
    assert len(ports) == 4
    for n in names:
        assert wait_http(port_of(agent, n)) == f"hello from {n}\n"
    assert len(owned_containers(agent)) == 4


def test_colliding_workload_names_are_refused(agent: Agent, hello_image: str) -> None:
    # Service "<x>-a" component "web" and service "<x>" component "a-web" would both be
    # container mcp-<x>-a-web: the second deploy must not replace the first one's container.
    base = name()
    first = agent.deploy(hello(f"{base}-a", hello_image, "first"))
    port = port_of(agent, f"{base}-a")
    before = agent.runtime("container").inspect(f"{base}-a", "web")
    assert first["drift"] is False and before is not None
    clash = from_dict({"name": base, "components": [
        {"name": "a-web", "image": hello_image, "env": ["MESSAGE=second"],
         "routes": [{"port": 8080}]}]})
    with pytest.raises(ConflictError, match=f"mcp-{base}-a-web"):
        agent.deploy(clash)
    assert not agent.registry.has_service(base)
    after = agent.runtime("container").inspect(f"{base}-a", "web")
    assert after is not None and after.id == before.id and after.state == "running"
    assert wait_http(port) == "hello from first\n"


def test_failed_redeploy_of_a_stopped_service_leaves_it_stopped(
        agent: Agent, hello_image: str, foreign: Callable[[str, str], None]) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image, "good"))
    port = port_of(agent, svc)
    agent.stop(svc)
    foreign(svc, "web1")
    with pytest.raises(ConflictError, match="not managed by this agent"):
        agent.deploy(hello(svc, hello_image, "bad", comps=2))
    rec = agent.registry.get_service(svc)
    assert rec.active is False
    assert [c.desired_state for c in rec.components] == ["stopped"]
    assert rec.components[0].defn.env == ("MESSAGE=good",)
    live = agent.runtime("container").inspect(svc, "web")
    assert live is None or live.state != "running"
    assert refused(port)


def test_undeploy_reads_the_record_under_the_service_lock(agent: Agent,
                                                          hello_image: str) -> None:
    # An undeploy that waits for a deploy on the same service must remove what that deploy
    # made, not what the service had before it: no container may outlive its registry rows.
    svc = name()
    agent.deploy(hello(svc, hello_image))
    done: list[BaseException | None] = []

    def undeploy() -> None:
        try:
            agent.undeploy(svc)
            done.append(None)
        except BaseException as exc:  # reported below
            done.append(exc)

    with agent._service_lock(svc):
        t = threading.Thread(target=undeploy)
        t.start()
        # Wait (bounded) until the undeploy is blocked on the lock we hold.
        deadline = time.monotonic() + 30
        while not _blocked_in(t, "hold"):
            assert time.monotonic() < deadline, "undeploy never reached the service lock"
            time.sleep(0.01)
        # What a concurrent deploy adding a component does while it holds the lock.
        rec = agent.registry.put_service(hello(svc, hello_image, comps=2))
        agent.runtime("container").run(agent.spec(svc, rec.component("web1")))
    t.join(timeout=120)
    assert done == [None]
    assert owned_containers(agent) == []
    assert not agent.registry.has_service(svc)


def _blocked_in(thread: threading.Thread, function: str) -> bool:
    import sys
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_unchanged_redeploys_are_not_state_changes(agent: Agent, hello_image: str) -> None:
    # A redeploy that leaves the container alone changes no observed state: it must not
    # add events, nor count towards flapping (flap_changes=3 in this fixture).
    svc = name()
    agent.deploy(hello(svc, hello_image))
    for _ in range(4):
        st = agent.deploy(hello(svc, hello_image))
    assert st["flapping"] is False
    # one deploy event (the first; the unchanged ones begin no rollout) and one change
    assert [(e["component"], e["from"], e["to"]) for e in st["events"]
            if e["to"] != "succeeded"] == [("", "", "deploy"), ("web", "unknown", "running")]


def test_operator_stop_start_is_not_flapping(agent: Agent, hello_image: str) -> None:
    svc = name()
    agent.deploy(hello(svc, hello_image))
    for _ in range(3):
        agent.stop(svc)
        agent.start(svc)
    agent.monitor.refresh()
    st = agent.status(svc)
    assert st["flapping"] is False
    changes = [e for e in st["events"] if e["from"] != e["to"]]
    assert len(changes) >= 6 and not any(e["unplanned"] for e in changes)
    # Stopped behind the agent's back: that change is unplanned.
    podman_cli("stop", "-t", "1", f"mcp-{svc}-web", check=True)
    agent.monitor.refresh()
    assert agent.status(svc)["events"][-1]["unplanned"] is True


def test_service_lock_serialises_across_processes(agent: Agent) -> None:
    """Another process (``mcp --local``) holding a service's lock file holds up the agent."""
    import fcntl
    import os

    path = agent.state_dir / "locks" / "service-held.lock"
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    errors: list[BaseException] = []

    def undeploy() -> None:
        try:
            agent.undeploy("held")
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    t = threading.Thread(target=undeploy)
    try:
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive(), "the operation did not wait for the other process's lock"
    finally:
        os.close(fd)  # releases the flock
    t.join(timeout=10)
    assert not t.is_alive() and isinstance(errors[0], NotFoundError)
