"""Issue 21 on the fake runtime: the event log is bounded (by count per service, by
age) and its queries have indexes that fit them; flapping is still judged right at the
cap; and an undeployed service leaves no map entry, metric series or lock file."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import ValidationError
from mcp_node.metrics import Metrics, render
from mcp_node.records import Event
from mcp_node.registry import Registry
from mcp_node.servicedef import from_dict
from mcp_node.states import RUNNING, STOPPED


def make_agent(world: FakeWorld, tmp_path: Path, **history: Any) -> Agent:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")},
                            **({"history": history} if history else {})})
    return Agent(cfg, runtimes=world.runtimes(), reconcile=True)


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def agent(world: FakeWorld, tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(world, tmp_path, max_events_per_service=100)
    try:
        yield a
    finally:
        a.close()


def shop(name: str = "shop", **web: Any) -> Any:
    return from_dict({"name": name, "components": [
        {"name": "web", "image": "img:v1", "routes": [{"port": 8080}], **web}]})


def changes(n: int, service: str = "shop", unplanned: bool = False,
            at: float | None = None) -> list[Event]:
    t = time.time() if at is None else at
    return [Event(service, "web", t, RUNNING if i % 2 else STOPPED,
                  STOPPED if i % 2 else RUNNING, f"change {i}", unplanned=unplanned)
            for i in range(n)]


# -- the event log --------------------------------------------------------------------


def test_a_service_keeps_its_newest_events_up_to_the_cap(agent: Agent) -> None:
    agent.deploy(shop())
    agent.deploy(shop("other"))
    for _ in range(3):
        agent.registry.record_observed(changes(60))
    agent.registry.record_events(changes(7, unplanned=False))
    rows = agent.registry.events("shop", limit=10_000)
    assert len(rows) == 100                                   # the cap, exactly
    assert [e.detail for e in rows[-7:]] == [f"change {i}" for i in range(7)]  # newest kept
    assert rows == sorted(rows, key=lambda e: e.id)
    assert 0 < len(agent.registry.events("other", limit=10_000)) < 100   # its own cap


def test_events_past_their_age_go_each_round(world: FakeWorld, tmp_path: Path) -> None:
    a = make_agent(world, tmp_path, event_keep_days=2)
    try:
        a.deploy(shop())
        a.registry.record_observed(changes(4, at=time.time() - 3 * 86400))
        a.registry.record_observed(changes(2, at=time.time() - 86400))
        a.monitor.refresh()                                    # a round prunes
        left = a.registry.events("shop", limit=1000)
        assert all(e.time > time.time() - 2 * 86400 for e in left)
        assert len([e for e in left if e.time < time.time() - 3600]) == 2   # the younger
    finally:
        a.close()


def test_flapping_is_judged_from_the_window_at_the_cap(agent: Agent) -> None:
    agent.deploy(shop())
    # an hour ago, outside the 600 s window: crashes, and the cap's worth of them
    agent.registry.record_observed(changes(150, unplanned=True, at=time.time() - 3600))
    agent.monitor.refresh()
    assert ("shop", "web") not in agent.monitor.view.flapping
    agent.registry.record_observed(changes(3, unplanned=True))   # flap_changes: not more
    agent.monitor.refresh()
    assert ("shop", "web") not in agent.monitor.view.flapping
    agent.registry.record_observed(changes(1, unplanned=True))
    agent.monitor.refresh()
    assert len(agent.registry.events("shop", limit=10_000)) == 100
    assert ("shop", "web") in agent.monitor.view.flapping


def test_the_queries_of_a_round_and_of_status_use_their_indexes(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    try:
        plans = {
            "counts": ("SELECT service, component, COUNT(*) FROM events WHERE time>=? AND "
                       "unplanned=1 GROUP BY service, component", (0.0,)),
            "status": ("SELECT * FROM events WHERE time>=? AND id>? AND service=? "
                       "ORDER BY id DESC LIMIT ?", (0.0, 0, "shop", 20)),
            "age": ("SELECT 1 FROM events WHERE time < ? LIMIT 1", (0.0,)),
            "cap": ("DELETE FROM events WHERE service=? AND id < (SELECT id FROM events "
                    "WHERE service=? ORDER BY id DESC LIMIT 1 OFFSET ?)", ("s", "s", 9)),
        }
        for what, (sql, args) in plans.items():
            detail = " ".join(r[3] for r in reg._db.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            assert "SCAN events" not in detail, (what, detail)
            assert "USING" in detail and "INDEX" in detail, (what, detail)
    finally:
        reg.close()


def test_event_keep_days_must_keep_the_flap_window(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as exc:
        config_from_dict({"state": {"dir": str(tmp_path)}, "history": {"event_keep_days": 1},
                          "monitor": {"flap_window_s": 2 * 86400}})
    assert exc.value.field == "history.event_keep_days"
    assert "monitor.flap_window_s = 172800 s" in str(exc.value)


# -- nothing left after undeploy ------------------------------------------------------


def maps_of(agent: Agent, service: str) -> dict[str, list[Any]]:
    """Every in-memory map the agent keys by service or (service, component)."""
    def keyed(m: Any) -> list[Any]:
        return [k for k in m if (k[0] if isinstance(k, tuple) else k) == service]

    return {
        "monitor restarts": keyed(agent.monitor._restarts),
        "reconcile backoff": keyed(agent.reconciler.backoff),
        "reconcile escaped": keyed(agent.reconciler.escaped),
        "check states": keyed(agent.checks._states),
        "check failures": keyed(agent.checks._failed),
        "rollouts": keyed(agent.rollouts._by_service),
        "image refs": keyed(agent.images._refs),
        "image digests": keyed(agent.images._digests),
        "progress": keyed(agent.progress._ops),
        "node route holds": keyed(agent.node_routes._held),
        "node route failures": keyed(agent.node_routes.failures),
        "service locks": keyed(agent.locks._locks),
    }


def test_undeploy_leaves_no_map_entry_metric_series_or_lock_file(agent: Agent,
                                                                 world: FakeWorld) -> None:
    world.tcp["web"] = ""
    for name in ("shop", "keep"):
        agent.deploy(shop(name, check_interval_s=1))
    for name in ("shop", "keep"):
        world.crash(name, "web")
    agent.monitor.refresh()
    agent.monitor.refresh()
    agent.checks.tick()
    present = maps_of(agent, "shop")
    assert present["reconcile backoff"] and present["check states"]   # the walk sees them
    text = render(Metrics(agent)).decode()
    assert 'mcp_component_restarts{component="web",service="shop"} 1.0' in text
    agent.undeploy("shop")
    agent.monitor.refresh()
    agent.checks.tick()
    assert {k: v for k, v in maps_of(agent, "shop").items() if v} == {}
    assert maps_of(agent, "keep")["reconcile backoff"]                # the other one stays
    text = render(Metrics(agent)).decode()
    assert 'service="shop"' not in text and 'service="keep"' in text
    locks = sorted(p.name for p in (agent.state_dir / "locks").glob("*"))
    assert "service-shop.lock" not in locks and all("shop" not in n for n in locks)
    assert agent.registry.events("shop") == []


def test_list_services_is_read_again_only_after_a_write(tmp_path: Path) -> None:
    """An idle round reads every record: kept while nothing wrote, this process or
    another (``mcp --local`` beside the daemon)."""
    reg, other = Registry(tmp_path / "r.db"), Registry(tmp_path / "r.db")
    try:
        reg.put_service(shop())
        first = reg.list_services()
        assert reg.list_services()[0] is first[0]                  # nothing wrote
        reg.set_desired("shop", STOPPED)
        again = reg.list_services()
        assert again[0] is not first[0] and again[0].components[0].desired_state == STOPPED
        other.put_service(shop("late"))                            # another connection
        assert [r.name for r in reg.list_services()] == ["late", "shop"]
    finally:
        reg.close()
        other.close()


def test_rollouts_in_progress_are_judged_from_the_round_s_view(world: FakeWorld,
                                                               tmp_path: Path) -> None:
    """Each in-progress rollout read its service's row every round (a SQLite read and a
    record parsed per rollout: 300 at once made a round 5x dearer); the round's view
    has the records. Still judged: a deploy's rollout ends once its check passes."""
    a = make_agent(world, tmp_path)
    try:
        for i in range(20):
            a.deploy_local(from_dict({"name": f"s{i:02d}", "update": {"min_healthy_s": 0.2},
                                      "components": [{"name": "web", "image": "img:v1",
                                                      "routes": [{"port": 8080}]}]}))
        a.monitor.refresh_safely()
        assert sum(r.state == "in_progress" for r in a.rollouts._by_service.values()) == 20
        reads: list[str] = []
        me = threading.get_ident()   # the round's (deploys prune images on a thread)
        a.registry._db.set_trace_callback(
            lambda sql: reads.append(sql) if threading.get_ident() == me and
            sql.lstrip().startswith("SELECT") else None)
        a.monitor.refresh_safely()
        a.registry._db.set_trace_callback(None)
        per_service = [r for r in reads if "WHERE name=" in r or "WHERE service='s" in r]
        assert per_service == [], per_service[:3]
        world.tcp["web"] = ""
        a.checks.start()
        deadline = time.monotonic() + 30
        while any(r.state == "in_progress" for r in a.rollouts._by_service.values()):
            assert time.monotonic() < deadline, a.rollouts._by_service
            a.monitor.refresh_safely()
            time.sleep(0.2)
        assert {r.state for r in a.rollouts._by_service.values()} == {"succeeded"}
    finally:
        a.close()
