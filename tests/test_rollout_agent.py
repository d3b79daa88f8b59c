"""Rollouts through the agent on fakes: a healthy release succeeds, a crash-looping one
is reverted by the agent itself (only its changed component touched, the revert in
history and events), and a deploy of the same definition begins none."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.clictx import LocalBackend
from mcp_node.cliwait import wait_ready
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import MCPError
from mcp_node.servicedef import from_dict


def svc(web: str, db: str = "v1", **update: Any) -> Any:
    return from_dict({"name": "shop", "update": {"min_healthy_s": 0.3,
                                                  "healthy_deadline_s": 1.5, **update},
                      "components": [
                          {"name": "web", "image": f"localhost/web:{web}", "restart": "always"},
                          {"name": "db", "image": f"localhost/db:{db}"}]})


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Agent, FakeWorld]]:
    world = FakeWorld()
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "st")},
                            "monitor": {"interval_s": 0.05, "restart_backoff_max_s": 1,
                                        "flap_changes": 1}})
    a = Agent(cfg, runtimes=world.runtimes(), monitor=True)
    yield a, world
    a.close()


def until(agent: Agent, state: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = agent.status("shop")["rollout"]
        if r is not None and r["state"] == state and not r["reverting"]:
            return r  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, r
        time.sleep(0.05)


def test_a_healthy_release_succeeds_and_the_same_one_again_begins_nothing(
        agent: tuple[Agent, FakeWorld]) -> None:
    a, _ = agent
    a.deploy(svc("v1"))
    st = wait_ready(LocalBackend(a), "shop", 20, rollout=1)
    r = st["rollout"]
    assert (r["version"], r["previous"], sorted(r["components"])) == (1, None, ["db", "web"])
    assert r["state"] == "succeeded"
    a.deploy(svc("v2"))
    r = until(a, "succeeded")
    assert (r["version"], r["previous"], r["components"]) == (2, 1, ["web"])
    a.deploy(svc("v2"))                        # unchanged: the rollout shown stays
    assert a.status("shop")["rollout"]["version"] == 2
    kinds = [(e["from"], e["to"]) for e in a.events("shop") if e["component"] == ""]
    assert kinds == [("", "deploy"), ("in_progress", "succeeded")] * 2


def test_a_crash_looping_release_is_reverted_by_the_agent(
        agent: tuple[Agent, FakeWorld]) -> None:
    a, world = agent
    a.deploy(svc("v1"))
    until(a, "succeeded")
    db_id = world.workloads[("shop", "db")].id
    stop = threading.Event()

    def crash_loop() -> None:               # v2 exits a moment after every start
        while not stop.wait(0.1):
            w = world.workloads.get(("shop", "web"))
            if w is not None and w.spec.image.endswith(":v2") and w.state == "running":
                world.crash("shop", "web")

    t = threading.Thread(target=crash_loop, daemon=True)
    t.start()
    try:
        began = a.deploy(svc("v2"))["rollout"]
        assert (began["version"], began["state"]) == (2, "in_progress")
        with pytest.raises(MCPError) as e:       # what mcp deploy --wait says (exit 1)
            wait_ready(LocalBackend(a), "shop", 20, rollout=2)
        r = until(a, "reverted")
    finally:
        stop.set()
        t.join()
    assert str(e.value) == (f"shop: the rollout of version 2 reverted: {r['reason']}; "
                            "version 1 runs again")
    assert r["version"] == 2 and r["previous"] == 1 and r["components"] == ["web"]
    assert r["reason"].startswith("web ") and "1.5 s after the deploy, needs 0.3 s healthy" \
        in r["reason"], r["reason"]
    assert world.workloads[("shop", "web")].spec.image == "localhost/web:v1"
    assert world.workloads[("shop", "db")].id == db_id          # never touched
    hist = a.history("shop")
    assert [h["version"] for h in hist][-1] == 3
    st = a.status("shop")
    assert st["definition"]["components"][0]["image"] == "localhost/web:v1"
    rows = [(e["from"], e["to"]) for e in a.events("shop") if e["component"] == ""]
    assert rows[-3:] == [("", "deploy"), ("in_progress", "failed"), ("failed", "reverted")]
    assert a.rollouts.counts == {"started": 2, "succeeded": 1, "failed": 1, "reverted": 1}
    # v2's crashes made web flap; once v1 was healthy for min_healthy_s that ends
    crashes = [e for e in a.events("shop") if e["component"] == "web" and e["unplanned"]]
    assert len(crashes) > 1
    deadline = time.monotonic() + 10
    while a.status("shop")["flapping"]:
        assert time.monotonic() < deadline, a.status("shop")["components"]
        time.sleep(0.05)
    assert a.status("shop")["rollout"]["state"] == "reverted"


def test_without_auto_revert_a_bad_release_stays_failed(
        agent: tuple[Agent, FakeWorld]) -> None:
    a, world = agent
    a.deploy(svc("v1"))
    until(a, "succeeded")
    world.fail("run", "web")                 # v2's web never starts
    with pytest.raises(Exception):           # noqa: B017 - the deploy itself fails
        a.deploy(svc("v2", auto_revert=False))
    a.deploy(svc("v3", auto_revert=False))
    stop = threading.Event()

    def crash_loop() -> None:
        while not stop.wait(0.1):
            w = world.workloads.get(("shop", "web"))
            if w is not None and w.state == "running":
                world.crash("shop", "web")

    t = threading.Thread(target=crash_loop, daemon=True)
    t.start()
    try:
        r = until(a, "failed")
    finally:
        stop.set()
        t.join()
    assert r["version"] == 2 and r["reverting"] is False   # the failed v2 deploy was none
    assert [h["version"] for h in a.history("shop")] == [1, 2]
    assert world.workloads[("shop", "web")].spec.image == "localhost/web:v3"


def test_a_deploy_cut_short_by_the_agents_death_is_recorded_and_rolled_out(
        tmp_path: Path) -> None:
    """Its record is written before its workloads run, its version and rollout after:
    the restarted agent finds the record in no version of history. It records it as the
    next version (noted), begins its rollout (only the changed component), and reconcile
    makes it run: history, status and what runs agree."""
    world = FakeWorld()
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "st")},
                            "monitor": {"interval_s": 0.05}})
    a = Agent(cfg, runtimes=world.runtimes(), monitor=True)
    try:
        a.deploy(svc("v1"))
        until(a, "succeeded")
        db_id = world.workloads[("shop", "db")].id
        a.registry.put_service(svc("v2"))    # what a deploy killed after it leaves
    finally:
        a.close()
    b = Agent(cfg, runtimes=world.runtimes(), monitor=True)
    try:
        hist = b.history("shop")
        assert [(h["version"], h["current"], h.get("note", "")) for h in hist] == [
            (1, False, ""), (2, True, "recorded at the agent's start: the deploy was cut "
                                      "short by its death")]
        r = until(b, "succeeded")
        assert (r["version"], r["previous"], r["components"]) == (2, 1, ["web"])
        assert world.workloads[("shop", "web")].spec.image == "localhost/web:v2"
        assert world.workloads[("shop", "db")].id == db_id       # never touched
    finally:
        b.close()
    c = Agent(cfg, runtimes=world.runtimes(), monitor=True)     # nothing more to resume
    try:
        assert [h["version"] for h in c.history("shop")] == [1, 2]
        assert c.rollouts.counts["started"] == 0
    finally:
        c.close()
