"""Agent logic on the fake runtime: deploy order, rollback, unchanged components,
name clashes, capacity, status and health shape. No podman, no root, milliseconds each."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import (
    ConflictError,
    ImageError,
    NotFoundError,
    ResourceError,
    RuntimeUnavailable,
    ValidationError,
    WorkloadError,
)
from mcp_node.runtime import RUNTIME_NAMES
from mcp_node.servicedef import ServiceDef, from_dict

CONTAINER, VM = RUNTIME_NAMES  # the two runtime names, without spelling them


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def agent(world: FakeWorld, tmp_path: Path) -> Iterator[Agent]:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")}})
    a = Agent(cfg, runtimes=world.runtimes())
    try:
        yield a
    finally:
        a.close()


def svc(name: str = "shop", *comps: dict[str, Any], **top: Any) -> ServiceDef:
    comps = comps or ({"name": "web", "image": "img:v1", "routes": [{"port": 8080}]},)
    return from_dict({"name": name, "components": list(comps), **top})


def vm(name: str = "vm", memory_mb: int = 256, image: str = "img:v1") -> dict[str, Any]:
    return {"name": name, "image": image, "runtime": VM, "memory_mb": memory_mb}


def test_deploy_order_is_available_pull_capacity_registry_run(agent: Agent,
                                                              world: FakeWorld) -> None:
    seen: list[str] = []
    put = agent.registry.put_service

    def spy_put(*a: Any, **k: Any) -> Any:
        seen.append(f"registry after {world.ops()[-1:]}")
        return put(*a, **k)

    agent.registry.put_service = spy_put  # type: ignore[method-assign]
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    ops = world.ops("pull", "capacity", "run")
    assert ops[:4] == [("pull", "web"), ("pull", "vm"), ("capacity", "web"), ("capacity", "vm")]
    assert sorted(ops[4:]) == [("run", "vm"), ("run", "web")]   # components run in parallel
    assert seen == ["registry after [('capacity', 'vm')]"]


@pytest.mark.parametrize("step", ["pull", "capacity"])
def test_a_failure_before_the_registry_write_changes_nothing(agent: Agent, world: FakeWorld,
                                                             step: str) -> None:
    world.fail(step, "vm", ResourceError("no room") if step == "capacity" else
               ImageError("no such image"))
    with pytest.raises(ResourceError if step == "capacity" else ImageError):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    assert not agent.registry.has_service("shop")
    assert world.ops("run") == [] and world.workloads == {}


def test_unavailable_runtime_refuses_before_anything(agent: Agent, world: FakeWorld) -> None:
    world.unavailable[VM] = "qemu binary not found"
    with pytest.raises(RuntimeUnavailable, match="qemu binary not found"):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    assert world.ops() == [] and not agent.registry.has_service("shop")


def test_failed_first_deploy_removes_what_it_started_and_the_row(agent: Agent,
                                                                  world: FakeWorld) -> None:
    world.fail("run", "vm")
    with pytest.raises(WorkloadError, match="injected run failure"):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    assert world.workloads == {}
    assert not agent.registry.has_service("shop")


def test_failed_redeploy_restores_the_previous_version(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    ports = agent.registry.get_service("shop").component("web").host_ports
    world.fail("run", "vm")
    with pytest.raises(WorkloadError):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}, vm(image="img:v2")))
    rec = agent.registry.get_service("shop")
    assert [c.defn.image for c in rec.components] == ["img:v1", "img:v1"]
    assert rec.component("web").host_ports == ports
    assert {k: w.spec.image for k, w in world.workloads.items()} == {
        ("shop", "web"): "img:v1", ("shop", "vm"): "img:v1"}
    assert all(w.state == "running" for w in world.workloads.values())


def test_failed_redeploy_leaves_the_unchanged_components_alone(agent: Agent,
                                                              world: FakeWorld) -> None:
    """Issue 19: the rollback of a failed deploy removed every component, unchanged
    ones too, then started the old ones again."""
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    vm_id = world.workloads[("shop", "vm")].id
    world.reset_calls()
    world.fail("run", "web")
    with pytest.raises(WorkloadError):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}, vm()))
    assert world.workloads[("shop", "vm")].id == vm_id
    assert [op for op in world.ops("run", "stop", "remove") if op[1] == "vm"] == []
    assert world.workloads[("shop", "web")].spec.image == "img:v1"
    assert world.workloads[("shop", "web")].state == "running"


def test_failed_redeploy_of_a_stopped_service_keeps_it_stopped(agent: Agent,
                                                               world: FakeWorld) -> None:
    agent.deploy(svc())
    agent.stop("shop")
    world.fail("run", "web")
    with pytest.raises(WorkloadError):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}, vm()))
    rec = agent.registry.get_service("shop")
    assert [c.desired_state for c in rec.components] == ["stopped"]
    assert world.workloads == {}  # the rollback removed what the redeploy made, ran nothing


def test_unchanged_components_are_left_alone(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    world.reset_calls()
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    assert world.ops("run", "stop", "remove") == []
    agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}, vm()))
    assert world.ops("run", "stop", "remove") == [("run", "web")]


def test_a_dead_unchanged_component_is_run_again(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc())
    world.workloads[("shop", "web")].state = "stopped"
    world.reset_calls()
    agent.deploy(svc())
    assert world.ops("run") == [("run", "web")]


def test_dropped_and_moved_components_are_removed(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm("a"), vm("b")))
    world.reset_calls()
    moved = {"name": "a", "image": "img:v1"}  # from the VM runtime to the container one
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, moved))
    assert sorted(world.ops("remove")) == [("remove", "a"), ("remove", "b")]
    assert {k: w.runtime for k, w in world.workloads.items()} == {
        ("shop", "web"): CONTAINER, ("shop", "a"): CONTAINER}


def test_workload_name_clash_is_refused_and_changes_nothing(agent: Agent,
                                                            world: FakeWorld) -> None:
    agent.deploy(svc("a-b", {"name": "c", "image": "img:v1"}))
    world.reset_calls()
    with pytest.raises(ConflictError, match="mcp-a-b-c"):
        agent.deploy(svc("a", {"name": "b-c", "image": "img:v1"}))
    assert not agent.registry.has_service("a")
    assert world.ops("run", "remove", "stop") == []
    assert list(world.workloads) == [("a-b", "c")]


def test_capacity_refusal_names_the_numbers(agent: Agent, world: FakeWorld) -> None:
    world.capacity_mb[VM] = 512
    agent.deploy(svc("one", vm(memory_mb=384)))
    with pytest.raises(ResourceError, match=r"256 MiB \+ 384 MiB > 512 MiB"):
        agent.deploy(svc("two", vm(memory_mb=256)))
    assert not agent.registry.has_service("two")
    # Replacing a VM frees its own memory: a redeploy of the same size fits.
    agent.deploy(svc("one", vm(memory_mb=384, image="img:v2")))
    # An inactive service takes no capacity.
    agent.deploy(svc("two", vm(memory_mb=256), active=False))


def test_status_shape_includes_the_runtime_extras(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1", "routes": [{"port": 8080}]},
                     vm()))
    st = agent.status("shop")
    assert set(st) == {"service", "active", "node", "drift", "flapping", "components",
                       "events", "definition", "rollout"}
    assert from_dict(st["definition"]) == agent.registry.get_service("shop").definition()
    web, box = st["components"]
    common = {"service", "component", "node", "runtime", "state", "desired_state", "version",
              "uptime_s", "routes", "image", "drift", "flapping", "restarts", "exit_code",
              "next_attempt", "spec_drift", "ready", "check", "started_at", "workload_id"}
    assert set(web) == common | {"fake_id", "memory_mb"}
    # Nothing listens on its port yet: running, but not ready.
    assert (web["runtime"], web["state"], web["drift"], web["ready"]) == (
        CONTAINER, "starting", False, False)
    assert (box["state"], box["ready"]) == ("running", True)   # no routes: ready when running
    with socket.socket() as s:
        s.bind(("127.0.0.1", web["routes"][0]["host_port"]))
        s.listen()
        web = agent.status("shop")["components"][0]
    assert (web["state"], web["ready"]) == ("running", True)
    assert box["runtime"] == VM and box["memory_mb"] == 256
    assert box["fake_id"] == world.workloads[("shop", "vm")].id
    [route] = web["routes"]
    assert route["port"] == 8080 and 10000 <= route["host_port"] <= 60000


def test_status_reports_drift_when_a_workload_vanishes(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc())
    del world.workloads[("shop", "web")]
    agent.monitor.refresh()
    st = agent.status("shop")
    assert st["drift"] is True and st["components"][0]["state"] == "missing"
    assert agent.health()["status"] == "degraded"


def test_stop_start_restart_and_undeploy(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc())
    world.reset_calls()
    assert agent.stop("shop")["components"][0]["state"] == "stopped"
    world.workloads[("shop", "web")].log.append(b"kept\n")
    assert agent.start("shop")["components"][0]["state"] == "starting"  # up; its port not listening
    # The stopped workload is started as it is, not made anew: its log survives.
    assert world.ops("stop", "start", "run") == [("stop", "web"), ("start", "web")]
    assert world.workloads[("shop", "web")].log == [b"kept\n"]
    world.reset_calls()
    agent.start("shop")  # already running: nothing to do
    assert world.ops("stop", "start", "run") == []
    agent.restart("shop")
    assert world.ops("stop", "start", "run") == [("stop", "web"), ("start", "web")]
    # A stopped workload made from another spec is replaced, not started.
    agent.stop("shop")
    stale = world.workloads[("shop", "web")]
    stale.spec = dataclasses.replace(stale.spec, image="old:1")
    world.reset_calls()
    agent.start("shop")
    assert world.ops("start", "run") == [("run", "web")]
    agent.undeploy("shop")
    assert world.workloads == {} and not agent.registry.has_service("shop")
    with pytest.raises(NotFoundError):
        agent.status("shop")


def test_failed_undeploy_keeps_the_record(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc())
    world.fail("remove", "web")
    with pytest.raises(WorkloadError):
        agent.undeploy("shop")
    assert agent.registry.has_service("shop")


def test_health_shape_and_unavailable_runtimes(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc())
    h = agent.health()
    assert h["status"] == "healthy" and h["reasons"] == []
    assert h["containers"] == 1 and h["services"] == 1
    assert set(h["runtimes"]) == set(RUNTIME_NAMES)
    assert h["runtimes"][CONTAINER] == {"available": True, "workloads": 1}
    # An unused, unavailable non-default runtime is reported but does not degrade health.
    world.unavailable[VM] = "no qemu"
    agent.monitor.refresh()
    h = agent.health()
    assert h["status"] == "healthy"
    assert h["runtimes"][VM]["available"] is False and "no qemu" in h["runtimes"][VM]["reason"]
    # The default runtime unavailable degrades health even with nothing deployed on it.
    world.unavailable[CONTAINER] = "podman gone"
    agent.monitor.refresh()
    h = agent.health()
    assert h["status"] == "degraded" and any("podman gone" in r for r in h["reasons"])


def test_close_closes_every_runtime_it_built(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    agent.close()
    assert sorted(world.closed) == sorted(RUNTIME_NAMES)


def test_monitor_lists_each_runtime_once_per_round(agent: Agent, world: FakeWorld) -> None:
    for i in range(5):
        agent.deploy(svc(f"s{i}", {"name": "web", "image": "img:v1"}, vm()))
    world.reset_calls()
    agent.monitor.refresh()
    assert sorted(world.ops("list")) == [("list", ""), ("list", "")]


def test_history_and_rollback(agent: Agent, world: FakeWorld) -> None:
    v1 = svc("shop", {"name": "web", "image": "img:v1"})
    v2 = svc("shop", {"name": "web", "image": "img:v2"})
    agent.deploy(v1)
    agent.deploy(v1)                       # unchanged: no new version
    agent.deploy(v2)
    hist = agent.history("shop")
    assert [(h["version"], h["images"], h["current"]) for h in hist] == [
        (1, ["img:v1"], False), (2, ["img:v2"], True)]
    assert len(hist[0]["digest"]) == 12 and hist[0]["time"].endswith("Z")
    agent.rollback("shop")                 # to the version before the current
    assert world.workloads[("shop", "web")].spec.image == "img:v1"
    assert [h["current"] for h in agent.history("shop")] == [False, False, True]
    agent.rollback("shop", 2)
    assert world.workloads[("shop", "web")].spec.image == "img:v2"
    with pytest.raises(NotFoundError, match="has no version 9"):
        agent.rollback("shop", 9)
    with pytest.raises(NotFoundError, match="no deployments"):
        agent.history("other")


def test_rollback_with_a_single_version_is_a_conflict(agent: Agent) -> None:
    agent.deploy(svc())
    with pytest.raises(ConflictError, match="no version before the current one"):
        agent.rollback("shop")


def test_a_failed_deploy_is_no_version(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc())
    world.fail("run", "web")
    with pytest.raises(WorkloadError):
        agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}))
    assert [h["version"] for h in agent.history("shop")] == [1]


def test_unchanged_redeploy_says_so(agent: Agent) -> None:
    assert agent.deploy(svc())["unchanged"] is False
    assert agent.deploy(svc())["unchanged"] is True
    assert agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}))["unchanged"] is False


def test_components_of_one_service_run_in_parallel(agent: Agent, world: FakeWorld) -> None:
    import threading
    import time as _time
    entered: list[str] = []
    both = threading.Barrier(2, timeout=5)
    real_step = type(agent.runtime(CONTAINER))._step

    def step(self: Any, op: str, component: str) -> None:
        real_step(self, op, component)
        if op == "run":
            entered.append(component)
            both.wait()          # would time out (BrokenBarrierError) if run one by one
            _time.sleep(0)

    for name in RUNTIME_NAMES:
        type(agent.runtime(name))._step = step  # type: ignore[method-assign]
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    assert sorted(entered) == ["vm", "web"]


def test_progress_names_each_components_step_while_an_operation_runs(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str, str | None, str | None]] = []
    real_step = type(agent.runtime(CONTAINER))._step

    def step(self: Any, op: str, component: str) -> None:
        p = agent.progress_of("shop")
        seen.append((op, component, p["components"].get(component), p["operation"]))
        real_step(self, op, component)

    for name in RUNTIME_NAMES:
        monkeypatch.setattr(type(agent.runtime(name)), "_step", step)
    agent.deploy(svc("shop", {"name": "web", "image": "img:v1"}, vm()))
    assert ("pull", "web", "pulling img:v1", "deploy") in seen
    assert ("run", "web", "starting", "deploy") in seen
    assert ("run", "vm", "starting", "deploy") in seen
    seen.clear()
    agent.deploy(svc("shop", {"name": "web", "image": "img:v2"}, vm()))
    assert [s for s in seen if s[0] == "run"] == [("run", "web", "replacing", "deploy")]
    seen.clear()
    agent.stop("shop", "web")
    assert seen == [("stop", "web", "stopping", "stop")]
    seen.clear()
    agent.restart("shop", "vm")
    assert [s[:3] for s in seen] == [("stop", "vm", "stopping"), ("start", "vm", "starting")]
    assert {s[3] for s in seen} == {"restart"}
    seen.clear()
    agent.undeploy("shop")
    assert sorted(seen) == [("remove", "vm", "removing", "undeploy"),
                            ("remove", "web", "removing", "undeploy")]
    assert agent.progress_of("shop") == {"service": "shop", "operation": None,
                                         "elapsed_s": 0.0, "components": {}}
    with pytest.raises(ValidationError):
        agent.progress_of("../x")
