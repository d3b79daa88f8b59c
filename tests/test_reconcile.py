"""Reconcile on the fake runtime: reboots, crash loops and restart policies, spec drift,
orphans, and convergence from any perturbed world (hypothesis, many rounds)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.reconcile import Action, Backoff, Policy, plan, wants_restart
from mcp_node.runtime import RUNTIME_NAMES, Workload
from mcp_node.servicedef import ServiceDef, from_dict

CONTAINER, VM = RUNTIME_NAMES


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_agent(world: FakeWorld, tmp_path: Path, clock: Clock) -> Agent:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")},
                            "monitor": {"flap_changes": 3, "flap_window_s": 600}})
    a = Agent(cfg, runtimes=world.runtimes(), reconcile=True)
    a.reconciler.clock = clock
    return a


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(world: FakeWorld, tmp_path: Path, clock: Clock) -> Iterator[Agent]:
    a = make_agent(world, tmp_path, clock)
    try:
        yield a
    finally:
        a.close()


def svc(name: str, restart: str = "", image: str = "img:v1", vm_too: bool = True) -> ServiceDef:
    comps: list[dict[str, Any]] = [{"name": "web", "image": image, "restart": restart,
                                    "routes": [{"port": 8080}]}]
    if vm_too:
        comps.append({"name": "vm", "image": image, "runtime": VM, "memory_mb": 128,
                      "restart": restart})
    return from_dict({"name": name, "components": comps})


def comp_row(agent: Agent, service: str, comp: str = "web") -> dict[str, Any]:
    return next(c for c in agent.status(service)["components"] if c["component"] == comp)


def test_reboot_brings_running_services_back_and_keeps_stopped_ones_down(
        agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("up"))
    agent.deploy(svc("down"))
    agent.stop("down")
    world.workloads.clear()          # what a reboot does: containers gone, VMs killed
    world.reset_calls()
    agent.monitor.refresh()
    assert sorted(world.ops("run")) == [("run", "vm"), ("run", "web")]
    assert {k for k, w in world.workloads.items() if w.state == "running"} == {
        ("up", "web"), ("up", "vm")}
    agent.monitor.refresh()
    assert agent.health()["status"] == "healthy", agent.health()["reasons"]


def test_an_exited_workload_is_started_not_recreated(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("s", vm_too=False))
    world.workloads[("s", "web")].log.append(b"before\n")
    world.crash("s", "web", 0)
    world.reset_calls()
    agent.monitor.refresh()
    assert world.ops("start", "run") == [("start", "web")]
    assert world.workloads[("s", "web")].log == [b"before\n"]  # the same workload, log kept


def test_crash_loop_backs_off_counts_and_flaps(agent: Agent, world: FakeWorld,
                                               clock: Clock) -> None:
    agent.deploy(svc("loop", vm_too=False))
    delays = []
    for _ in range(5):
        world.crash("loop", "web", 3)
        agent.monitor.refresh()                  # restarts at once or waits its turn
        agent.monitor.refresh()                  # and sees the result
        row = comp_row(agent, "loop")
        while row["state"] == "backoff":
            assert row["next_attempt"] is not None and row["exit_code"] == 3
            b = agent.reconciler.backoff[("loop", "web")]
            delays.append(b.next_attempt - clock.t)
            clock.t = b.next_attempt
            agent.monitor.refresh()
            agent.monitor.refresh()
            row = comp_row(agent, "loop")
        assert row["state"] == "starting"   # up again (nothing listens in the fake)
    row = comp_row(agent, "loop")
    # the run now up has no exit code; the last run's 3 is in the events (below)
    assert row["restarts"] == 5 and row["exit_code"] is None
    assert delays == [1.0, 2.0, 4.0, 8.0]       # the first restart is immediate
    st = agent.status("loop")
    assert st["flapping"] is True
    assert any("exited (3)" in e["detail"] for e in st["events"])
    h = agent.health()
    assert h["status"] == "degraded" and any("flapping" in r for r in h["reasons"])


def test_backoff_resets_after_running_for_a_while(agent: Agent, world: FakeWorld,
                                                  clock: Clock) -> None:
    agent.deploy(svc("s", vm_too=False))
    world.crash("s", "web", 1)
    agent.monitor.refresh()
    assert agent.reconciler.backoff[("s", "web")].restarts == 1
    agent.monitor.refresh()                      # seen running: the clock starts
    clock.t += agent.reconciler.policy.reset_after_s + 1
    agent.monitor.refresh()
    assert agent.reconciler.backoff[("s", "web")].restarts == 0


def test_restart_no_is_left_down_and_reported(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("once", restart="no", vm_too=False))
    world.crash("once", "web", 3)
    world.reset_calls()
    agent.monitor.refresh()
    assert world.ops("run", "start") == []
    row = comp_row(agent, "once")
    assert row["state"] == "stopped" and row["exit_code"] == 3 and row["drift"] is True
    h = agent.health()
    assert any("not restarted by policy: once/web" in r for r in h["reasons"])


@pytest.mark.parametrize(("code", "restarted"), [(0, False), (3, True)])
def test_on_failure_restarts_only_a_failure(agent: Agent, world: FakeWorld, code: int,
                                            restarted: bool) -> None:
    agent.deploy(svc("s", restart="on-failure", vm_too=False))
    world.crash("s", "web", code)
    world.reset_calls()
    agent.monitor.refresh()
    assert bool(world.ops("start", "run")) is restarted


def test_spec_drift_after_an_interrupted_redeploy_is_replaced(agent: Agent,
                                                              world: FakeWorld) -> None:
    agent.deploy(svc("s"))
    # The crash point: the new definition is committed, the runtimes never changed.
    agent.registry.put_service(svc("s", image="img:v2"))
    agent.reconciling = False
    agent.monitor.refresh()
    h = agent.health()
    assert h["spec_drift"] == ["s/web", "s/vm"] and h["status"] == "degraded"
    assert comp_row(agent, "s")["spec_drift"] is True
    agent.reconciling = True
    agent.monitor.refresh()
    assert {w.spec.image for w in world.workloads.values()} == {"img:v2"}
    agent.monitor.refresh()
    assert agent.health()["spec_drift"] == [] and comp_row(agent, "s")["spec_drift"] is False


def test_orphans_are_removed(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("keep"))
    agent.deploy(svc("gone"))
    agent.registry.delete_service("gone")        # a crash mid-undeploy: row gone first
    agent.monitor.refresh()
    assert set(world.workloads) == {("keep", "web"), ("keep", "vm")}


def test_desired_stopped_but_running_is_stopped(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("s", vm_too=False))
    agent.registry.set_desired("s", "stopped")   # a crash after recording a stop
    agent.monitor.refresh()
    assert world.workloads[("s", "web")].state == "stopped"


def test_a_service_under_an_operation_is_skipped(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("s", vm_too=False))
    world.workloads.clear()
    with agent._service_lock("s"):
        agent.monitor.refresh()
        assert world.workloads == {}
    agent.monitor.refresh()
    assert set(world.workloads) == {("s", "web")}


def test_an_unlistable_runtime_is_left_alone(agent: Agent, world: FakeWorld) -> None:
    agent.deploy(svc("s"))
    world.workloads.clear()
    world.unavailable[VM] = "qemu gone"
    world.reset_calls()
    agent.monitor.refresh()
    assert world.ops("run") == [("run", "web")]


def test_nothing_differs_costs_one_listing_per_runtime(agent: Agent, world: FakeWorld) -> None:
    for i in range(5):
        agent.deploy(svc(f"s{i}"))
    agent.monitor.refresh()
    world.reset_calls()
    agent.monitor.refresh()
    assert world.ops() == [("list", ""), ("list", "")]


def test_policy_table() -> None:
    assert not wants_restart("no", 3)
    assert wants_restart("on-failure", 3) and wants_restart("on-failure", None)
    assert not wants_restart("on-failure", 0)
    assert all(wants_restart(p, 0) for p in ("always", "unless-stopped", ""))


def test_backoff_is_capped() -> None:
    b = Backoff(restarts=40)
    assert b.delay(60.0) == 60.0 and Backoff(restarts=3).delay(60.0) == 4.0


def test_plan_is_pure_of_records_it_cannot_judge() -> None:
    rec = svc("s")
    from mcp_node.records import ComponentRecord, ServiceRecord
    r = ServiceRecord("s", True, [ComponentRecord(c) for c in rec.components])
    w = Workload("s", "web", CONTAINER, "stopped", exit_code=1)
    out = plan([r], {("s", "web"): w}, [], lambda *_: "d", {}, 0.0, Policy(), [VM])
    assert out.actions == [Action("start", "s", "web", CONTAINER, "exited (1)", restart=True)]


# -- convergence from any perturbed world ----------------------------------------------

PERTURB = st.sampled_from(["remove", "crash", "crash0", "stale", "orphan", "stop", "nothing"])


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(moves=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["web", "vm"]), PERTURB),
                      max_size=8),
       stopped=st.sets(st.integers(0, 2)))
def test_one_round_converges_from_any_perturbation(tmp_path_factory: pytest.TempPathFactory,
                                                   moves: list[tuple[int, str, str]],
                                                   stopped: set[int]) -> None:
    world, clock = FakeWorld(), Clock()
    agent = make_agent(world, tmp_path_factory.mktemp("conv"), clock)
    try:
        for i in range(3):
            agent.deploy(svc(f"s{i}"))
        for i in stopped:
            agent.stop(f"s{i}")
        for i, comp, move in moves:
            key = (f"s{i}", comp)
            w = world.workloads.get(key)
            if move == "remove":
                world.workloads.pop(key, None)
            elif move in ("crash", "crash0") and w is not None:
                world.crash(*key, 0 if move == "crash0" else 2)
            elif move == "stale" and w is not None:
                w.spec = replace(w.spec, image="img:old")
            elif move == "orphan":
                world.workloads[(f"x{i}", comp)] = replace(
                    world.workloads.get(key) or next(iter(world.workloads.values())),
                    spec=replace(next(iter(world.workloads.values())).spec,
                                 service=f"x{i}", component=comp))
            elif move == "stop" and w is not None:
                w.state = "running"    # running although the operator stopped it
        clock.t += 1000                # past any backoff
        agent.monitor.refresh()
        for i in range(3):
            rec = agent.registry.get_service(f"s{i}")
            for c in rec.components:
                w = world.workloads.get((f"s{i}", c.defn.name))
                if c.desired_state == "running":
                    assert w is not None and w.state == "running", (i, c.defn.name, moves)
                    assert w.spec.digest == agent.spec(rec.name, c).digest
                else:
                    assert w is None or w.state != "running"
        assert {s for s, _ in world.workloads} <= {"s0", "s1", "s2"}
    finally:
        agent.close()
