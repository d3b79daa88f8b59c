"""The checker's logic on the fake runtime (its tcp answers scripted, time in the
test's hands): when it probes, what it counts, when a component is unhealthy, and what
the reconciler then does. No podman, no threads, milliseconds each."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.metrics import Metrics, render
from mcp_node.reconcile import UNHEALTHY_STOP_S, Backoff, Policy, plan
from mcp_node.records import ComponentRecord, ServiceRecord
from mcp_node.runtime import Workload
from mcp_node.servicedef import ComponentDef, RouteDef, from_dict
from mcp_node.states import RUNNING

KEY = ("shop", "web")
# The checker's wall clock: now-ish (the event log forgets events older than
# history.event_keep_days), a whole second, so the times it prints are exact.
WALL = float(int(time.time()))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL + self.t


@pytest.fixture
def world() -> FakeWorld:
    w = FakeWorld()
    w.tcp["web"] = "connection refused"
    return w


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_agent(world: FakeWorld, clock: Clock, tmp_path: Path, reconcile: bool) -> Agent:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")}})
    a = Agent(cfg, runtimes=world.runtimes(), reconcile=reconcile)
    a.checks.clock, a.checks.wall = clock.mono, clock.wall
    return a


@pytest.fixture
def agent(world: FakeWorld, clock: Clock, tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(world, clock, tmp_path, reconcile=True)
    try:
        yield a
    finally:
        a.close()


def deploy(agent: Agent, world: FakeWorld, **web: Any) -> None:
    agent.deploy(from_dict({"name": "shop", "components": [
        {"name": "web", "image": "img:v1", "routes": [{"port": 8080}], **web}]}))
    world.tcp_probes.clear()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tick(agent: Agent, clock: Clock, at: float | None = None) -> None:
    """A monitor round (the reconciler acts on it), then a checker tick."""
    if at is not None:
        clock.t = at
    agent.monitor.refresh()
    agent.checks.tick()


def state(agent: Agent) -> str:
    [row] = agent.ps()
    return str(row["state"])


def details(agent: Agent) -> list[str]:
    return [e["detail"] for e in agent.events("shop")]


def test_probed_every_tick_until_it_passes_then_every_interval(agent: Agent,
                                                               world: FakeWorld,
                                                               clock: Clock) -> None:
    deploy(agent, world, check_interval_s=5)
    for _ in range(3):
        tick(agent, clock)
    assert world.tcp_probes == ["web"] * 3          # every tick while it has not passed
    st = agent.checks.result(*KEY)
    assert st is not None and st.ok is False and st.detail == "connection refused"
    assert st.failures == 0 and not st.passed        # failures before a pass do not count
    assert state(agent) == "starting" and agent.check_failures() == {}  # a read probes too
    world.tcp["web"] = ""
    tick(agent, clock)
    assert state(agent) == "running" and len(world.tcp_probes) == 5
    tick(agent, clock, at=4.9)
    assert len(world.tcp_probes) == 5                # not due before the interval
    tick(agent, clock, at=5.0)
    assert len(world.tcp_probes) == 6
    [c] = agent.status("shop")["components"]
    assert c["ready"] is True and c["check"] == {
        "ok": True, "time": iso(WALL + 5.0), "detail": "accepted"}


def test_interval_zero_checks_once_per_run(agent: Agent, world: FakeWorld,
                                           clock: Clock) -> None:
    deploy(agent, world, check_interval_s=0)
    world.tcp["web"] = ""
    tick(agent, clock)
    world.tcp["web"] = "connection refused"
    for t in (10.0, 1000.0, 100000.0):
        tick(agent, clock, at=t)
    assert world.tcp_probes == ["web"] and state(agent) == "running"
    agent.restart("shop")            # a new run is checked again (its status read probes)
    tick(agent, clock)
    assert world.tcp_probes == ["web"] * 3 and state(agent) == "starting"


def test_a_probe_that_hangs_adds_no_healthy_time(agent: Agent, world: FakeWorld,
                                                clock: Clock) -> None:
    """A pass vouches until the next probe is due: a workload that stops answering (a
    SIGSTOPped server: the probe waits out its timeout) was judged healthy for as long
    as the probe hung, and a rollout succeeded over it (CI, once)."""
    deploy(agent, world, check_interval_s=1, check_timeout_s=5)
    world.tcp["web"] = ""
    tick(agent, clock)
    tick(agent, clock, at=1.0)
    assert agent.checks.healthy_for(*KEY) == 1.0
    clock.t = 1.5                      # between probes: the last pass still vouches
    assert agent.checks.healthy_for(*KEY) == 1.5
    clock.t = 4.0                      # the probe due at 2.0 has not answered
    assert agent.checks.healthy_for(*KEY) == 2.0
    tick(agent, clock)                 # it does: a pass, the streak goes on
    assert agent.checks.healthy_for(*KEY) == 4.0


def test_checked_once_per_run_a_pass_vouches_for_the_run(agent: Agent, world: FakeWorld,
                                                         clock: Clock) -> None:
    deploy(agent, world, check_interval_s=0)
    world.tcp["web"] = ""
    tick(agent, clock)
    clock.t = 30.0
    assert agent.checks.healthy_for(*KEY) == 30.0


def test_unhealthy_after_n_failures_is_restarted_and_counted(agent: Agent,
                                                             world: FakeWorld,
                                                             clock: Clock) -> None:
    deploy(agent, world, check_interval_s=1, check_failures=3)
    world.tcp["web"] = ""
    tick(agent, clock)
    first = agent.checks.result(*KEY)
    assert first is not None and first.healthy_since == clock.wall()
    tick(agent, clock, at=3.0)
    assert agent.checks.healthy_for(*KEY) == 3.0
    world.tcp["web"] = "connection refused"
    for n, t in enumerate((4.0, 5.0), 1):
        tick(agent, clock, at=t)
        assert state(agent) == "running" and agent.checks.result(*KEY).failures == n  # type: ignore[union-attr]
    assert agent.checks.healthy_for(*KEY) == 0.0
    world.reset_calls()
    agent.checks.tick()                              # not due yet: nothing changes
    clock.t = 6.0
    agent.checks.tick()                              # the third failure in a row
    assert state(agent) == "unhealthy"
    [c] = agent.status("shop")["components"]
    assert c["ready"] is False and c["state"] == "unhealthy" and c["drift"] is False
    assert c["check"]["ok"] is False and c["check"]["detail"] == "connection refused"
    assert "unhealthy (tcp: connection refused x3): restarting it" in details(agent)
    assert world.ops("stop", "start", "run") == []   # the reconciler acts, in its round
    agent.monitor.refresh()
    assert world.ops("stop", "start", "run") == [("stop", "web"), ("start", "web")]
    assert world.stop_timeouts[-1] == UNHEALTHY_STOP_S
    assert "restarted: unhealthy (tcp: connection refused x3), restart 1" in details(agent)
    assert agent.restart_counts()[KEY] == 1 and agent.check_failures() == {KEY: 3}
    text = render(Metrics(agent)).decode()
    assert 'mcp_check_failures_total{component="web",service="shop"} 3.0' in text
    tick(agent, clock)                               # the new run starts over
    st = agent.checks.result(*KEY)
    assert st is not None and not st.passed and st.failures == 0 and not st.unhealthy
    assert state(agent) == "starting"
    world.tcp["web"] = ""
    tick(agent, clock)
    assert state(agent) == "running"
    agent.monitor.refresh()
    assert world.ops("stop", "start", "run") == [("stop", "web"), ("start", "web")]


def test_restart_no_leaves_it_unhealthy_until_it_passes_again(agent: Agent,
                                                              world: FakeWorld,
                                                              clock: Clock) -> None:
    deploy(agent, world, check_interval_s=1, check_failures=2, restart="no")
    world.tcp["web"] = ""
    tick(agent, clock)
    world.tcp["web"] = "HTTP 503"
    tick(agent, clock, at=1.0)
    tick(agent, clock, at=2.0)
    assert state(agent) == "unhealthy"
    world.reset_calls()
    tick(agent, clock, at=2.5)
    assert world.ops("stop", "start", "run") == []
    assert "unhealthy (tcp: HTTP 503 x2): not restarted (restart = no)" in details(agent)
    assert "mcp_components_unhealthy 1.0" in render(Metrics(agent)).decode()
    world.tcp["web"] = ""
    tick(agent, clock, at=3.0)
    assert state(agent) == "running"
    assert "healthy again: tcp check passes (accepted)" in details(agent)


def test_a_new_run_resets_the_count(agent: Agent, world: FakeWorld, clock: Clock) -> None:
    deploy(agent, world, check_interval_s=1, check_failures=3)
    world.tcp["web"] = ""
    tick(agent, clock)
    world.tcp["web"] = "connection refused"
    tick(agent, clock, at=1.0)
    tick(agent, clock, at=2.0)
    world.workloads[KEY].id = "another-container"    # replaced behind our back
    tick(agent, clock, at=3.0)
    st = agent.checks.result(*KEY)
    assert st is not None and st.run[0] == "another-container"
    assert st.failures == 0 and not st.passed and state(agent) == "starting"


def test_local_reads_check_but_record_and_restart_nothing(world: FakeWorld, clock: Clock,
                                                          tmp_path: Path) -> None:
    a = make_agent(world, clock, tmp_path, reconcile=False)
    try:
        deploy(a, world, check_interval_s=1, check_failures=1)
        world.tcp["web"] = ""
        assert state(a) == "running"                 # a read probes (no thread)
        world.tcp["web"] = "connection refused"
        clock.t = 1.0
        assert state(a) == "unhealthy"
        assert not [d for d in details(a) if "unhealthy" in d]
        assert world.ops("stop", "start") == []
    finally:
        a.close()


def test_with_the_thread_a_read_probes_only_a_run_never_probed(agent: Agent,
                                                                world: FakeWorld,
                                                                clock: Clock) -> None:
    agent.checks.tick_s = 3600.0                     # the thread is there, never ticks
    agent.checks.start()
    deploy(agent, world)                             # its status read probed the new run
    st = agent.checks.result(*KEY)
    assert st is not None and st.detail == "connection refused"
    for _ in range(3):
        assert state(agent) == "starting"
    assert world.tcp_probes == []                    # a run probed once: the thread's now
    world.tcp["web"] = ""
    agent.restart("shop")
    assert world.tcp_probes == ["web"] and state(agent) == "running"


def test_due_probes_run_side_by_side(agent: Agent, world: FakeWorld, clock: Clock) -> None:
    """Each probe waits for the other (bounded): one after the other, both would fail."""
    both = threading.Barrier(2, timeout=10)

    def meet() -> str:
        both.wait()
        return ""

    world.tcp["web"] = world.tcp["api"] = "connection refused"
    agent.deploy(from_dict({"name": "shop", "components": [
        {"name": n, "image": "img:v1", "routes": [{"port": 8080}]} for n in ("web", "api")]}))
    world.tcp["web"] = world.tcp["api"] = meet
    tick(agent, clock)
    assert {r["component"]: r["state"] for r in agent.ps()} == {"web": "running",
                                                               "api": "running"}


def test_plain_connects_are_the_checkers_own_the_rest_the_runtimes(
        agent: Agent, world: FakeWorld, clock: Clock) -> None:
    """A runtime that proves a tcp check by a plain connect has it made by the checker
    (connects side by side, no pool); one that cannot (a user-mode VM) gets tcp_check."""
    del world.tcp["web"]   # the fixture's: web's check is its runtime's default now
    world.tcp["api"] = "guest did not accept"
    agent.deploy(from_dict({"name": "shop", "components": [
        {"name": n, "image": "img:v1", "routes": [{"port": 8080}]} for n in ("web", "api")]}))
    world.tcp_probes.clear()
    [port] = agent.registry.get_service("shop").component("web").host_ports.values()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        tick(agent, clock)
    assert {r["component"]: r["state"] for r in agent.ps()} == {"web": "running",
                                                               "api": "starting"}
    assert set(world.tcp_probes) == {"api"}    # web's never went to tcp_check
    assert agent.checks.result("shop", "web").detail == "accepted"
    tick(agent, clock, clock.t + 10)   # due again; nothing listens now: refused
    assert agent.checks.result("shop", "web").detail == "connection refused"


def test_check_is_null_before_the_first_probe(agent: Agent) -> None:
    assert agent.checks.result(*KEY) is None and agent.checks.healthy_for(*KEY) == 0.0


def web_record(restart: str = "") -> ServiceRecord:
    d = ComponentDef(name="web", image="i", restart=restart,
                     routes=(RouteDef(name="", port=80),))
    return ServiceRecord("shop", True, [ComponentRecord(d, host_ports={"": 4000})])


@pytest.mark.parametrize(("restart", "run", "wanted"), [
    ("", ("id1", 5.0), True),
    ("always", ("id1", 5.0), True),
    ("on-failure", ("id1", 5.0), True),             # unhealthy is a failure
    ("no", ("id1", 5.0), False),
    ("", ("id1", 4.0), False),                      # another run: not that one
])
def test_plan_restarts_the_unhealthy_run_per_policy(restart: str, run: tuple[str, float],
                                                    wanted: bool) -> None:
    rec = web_record(restart)
    w = Workload("shop", "web", rec.components[0].defn.runtime, RUNNING, id="id1",
                 started_at=5.0)
    p = plan([rec], {KEY: w}, [], lambda r, c: "", {}, 100.0, Policy(),
             unhealthy={KEY: (run, "unhealthy (tcp: timed out after 2 s x3)")})
    kinds = [(a.kind, a.reason, a.restart) for a in p.actions]
    assert kinds == ([("restart", "unhealthy (tcp: timed out after 2 s x3)", True)]
                     if wanted else [])


def test_plan_waits_out_the_backoff_before_an_unhealthy_restart() -> None:
    rec = web_record()
    w = Workload("shop", "web", rec.components[0].defn.runtime, RUNNING, id="id1",
                 started_at=5.0)
    backoff = {KEY: Backoff(restarts=2, next_attempt=150.0)}
    p = plan([rec], {KEY: w}, [], lambda r, c: "", backoff, 100.0, Policy(),
             unhealthy={KEY: (("id1", 5.0), "unhealthy (tcp: x x3)")})
    assert p.actions == [] and p.waiting == {KEY: 150.0}


def test_status_text_shows_the_last_check_and_no_line_before_one() -> None:
    from mcp_node.cliformat import status_text

    web = {"component": "web", "runtime": "container", "state": "unhealthy",
           "desired_state": "running", "version": "v1", "uptime_s": 5, "restarts": 0,
           "routes": [], "drift": False,
           "check": {"ok": False, "time": "2026-12-02T06:00:00Z", "detail": "HTTP 503"}}
    st = {"service": "shop", "node": "n1", "active": True, "drift": False,
          "flapping": False, "events": [], "components": [web]}
    lines = status_text(st).splitlines()
    assert "  web: check failed at 2026-12-02T06:00:00Z (HTTP 503)" in lines
    assert not any("check=" in line for line in lines)       # not shown as an extra key
    assert not any("check" in line for line in status_text(
        {**st, "components": [{**web, "check": None}]}).splitlines())


def test_between_two_views_a_tick_takes_only_what_is_due(agent: Agent, world: FakeWorld,
                                                         clock: Clock,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """An idle node's tick costs what is due (issue 21): the whole pass over every
    component runs once per new view, the ticks between take the due from a heap."""
    world.tcp["web"] = ""
    for i in range(5):
        agent.deploy(from_dict({"name": f"s{i}", "components": [
            {"name": "web", "image": "img:v1", "routes": [{"port": 8080}],
             "check_interval_s": 5}]}))
    tick(agent, clock)                                   # a new view: all probed, passed
    passes: list[int] = []
    whole = agent.checks._pass
    monkeypatch.setattr(agent.checks, "_pass",
                        lambda *a: passes.append(1) or whole(*a))   # type: ignore[func-returns-value]
    world.tcp_probes.clear()
    agent.checks.tick()
    assert world.tcp_probes == [] and passes == []       # nothing due, nothing walked
    clock.t = 5.0
    agent.checks.tick()
    assert world.tcp_probes == ["web"] * 5 and passes == []   # the due, from the heap
    agent.checks.tick()
    assert len(world.tcp_probes) == 5                    # rescheduled 5 s on
    world.crash("s3", "web")
    agent.monitor.refresh()                              # a new view: one whole pass
    clock.t = 10.0
    agent.checks.tick()
    assert passes == [1] and len(world.tcp_probes) == 9   # s3 stopped: not probed
