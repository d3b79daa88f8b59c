"""Start-first replaces through the agent on fakes (issue 19 item 3): the new workload
runs beside the current one, the node proxy is held on the current one's ports until the
new one passes its check, then switched; the old one drains and goes. A new one that
never passes leaves the current one untouched; a crash's leftovers are orphans that
reconcile removes first. Real podman (and a Nanos VM) behind real Caddy:
test_noderoutes_live.py; the real daemon killed mid-replace: test_startfirst_crash.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import WorkloadError
from mcp_node.reconcile import Policy, plan
from mcp_node.runtime import Workload
from mcp_node.servicedef import from_dict
from mcp_node.states import RUNNING


class FakeRoutes:
    """The node proxy as the agent drives it: which port each component's route is
    served on, from the registry unless held; every switch noted with what ran then."""

    def __init__(self, agent: Agent, world: FakeWorld) -> None:
        self.a, self.world = agent, world
        self.held: dict[tuple[str, str], dict[str, int]] = {}
        self.log: list[tuple[str, str, dict[str, int], list[str]]] = []

    def served(self, service: str, component: str) -> dict[str, int]:
        c = self.a.registry.get_service(service).component(component)
        return {**c.host_ports, **self.held.get((service, component), {})}

    def hold(self, service: str, component: str, ports: dict[str, int]) -> None:
        self.held[(service, component)] = dict(ports)

    def release(self, service: str, component: str) -> None:
        self.held.pop((service, component), None)

    def switch(self, service: str, component: str) -> None:
        self.held.pop((service, component), None)
        self.log.append(("switch", component, self.served(service, component),
                         sorted(c for _s, c in self.world.workloads)))

    def check(self, defn: Any) -> None:
        return None

    def after_change(self, service: str) -> None:
        return None

    def reconcile(self, reassert: bool = False) -> None:
        return None

    def health(self) -> list[str]:
        return []

    def describe(self, service: str, component: str,
                 routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return routes


def svc(web: str, order: str = "start-first", **update: Any) -> Any:
    return from_dict({"name": "shop",
                      "update": {"order": order, "drain_s": 0, "healthy_deadline_s": 1,
                                 **update},
                      "components": [
                          {"name": "web", "image": f"localhost/web:{web}", "check": "tcp",
                           "routes": [{"name": "http", "port": 443,
                                       "hostname": "shop.svc.mcp.example.net"}]},
                          {"name": "worker", "image": f"localhost/worker:{web}"}]})


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Agent, FakeWorld, FakeRoutes]]:
    world = FakeWorld()
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "st")},
                            "proxy": {"serve_routes": True}})
    a = Agent(cfg, runtimes=world.runtimes())
    routes = FakeRoutes(a, world)
    a._routes = routes
    a.steps.sleep = lambda s: None
    world.tcp["web"] = world.tcp["web.next"] = ""
    yield a, world, routes
    a.close()


def web_port(a: Agent) -> int:
    return a.registry.get_service("shop").component("web").host_ports["http"]


def test_the_new_workload_runs_beside_the_old_one_until_the_proxy_is_switched(
        agent: tuple[Agent, FakeWorld, FakeRoutes]) -> None:
    a, world, routes = agent
    a.deploy(svc("v1"))
    old_id, old_port = world.workloads[("shop", "web")].id, web_port(a)
    world.reset_calls()
    a.deploy(svc("v2"))
    new_port = web_port(a)
    assert new_port != old_port
    # At the switch both ran; the proxy then went to the new workload's port.
    assert routes.log == [("switch", "web", {"http": new_port},
                           ["web", "web.next", "worker"])]
    ops = world.ops("run", "stop", "remove", "promote")
    assert [o for o in ops if o[1].startswith("web")] == [
        ("run", "web.next"), ("promote", "web"), ("remove", "web.old")]   # never stopped
    assert ("run", "worker") in ops     # no proxied route: stop-first
    w = world.workloads[("shop", "web")]
    assert w.id != old_id and w.spec.image == "localhost/web:v2" and w.state == RUNNING
    assert w.spec.ports == (new_port,)
    assert sorted(c for _s, c in world.workloads) == ["web", "worker"]
    st = a.status("shop")
    assert st["components"][0]["state"] == "running"
    assert not routes.held


def test_a_new_workload_that_never_passes_leaves_the_old_one_serving(
        agent: tuple[Agent, FakeWorld, FakeRoutes]) -> None:
    a, world, routes = agent
    a.deploy(svc("v1"))
    old_id, old_port = world.workloads[("shop", "web")].id, web_port(a)
    world.tcp["web.next"] = "connection refused"
    with pytest.raises(WorkloadError) as e:
        a.deploy(svc("v2"))
    assert str(e.value) == (
        "shop/web: its new workload did not pass its tcp check within 1s "
        "(healthy_deadline_s; last: connection refused); the current one still serves")
    assert routes.log == []   # never switched
    w = world.workloads[("shop", "web")]
    assert (w.id, w.spec.image, w.state) == (old_id, "localhost/web:v1", RUNNING)
    assert ("shop", "web.next") not in world.workloads
    assert web_port(a) == old_port   # the record is the previous one again
    assert a.registry.get_service("shop").definition() == svc("v1")
    assert not routes.held


def test_stop_first_and_a_stopped_component_are_replaced_in_place(
        agent: tuple[Agent, FakeWorld, FakeRoutes]) -> None:
    a, world, routes = agent
    a.deploy(svc("v1", order="stop-first"))
    port = web_port(a)
    world.reset_calls()
    a.deploy(svc("v2", order="stop-first"))
    assert ("run", "web") in world.ops("run") and routes.log == []
    assert web_port(a) == port
    a.stop("shop", "web")
    world.reset_calls()
    a.deploy(svc("v3"))   # start-first, but nothing runs to keep serving
    assert sorted(world.ops("run", "promote")) == [("run", "web"), ("run", "worker")]
    assert routes.log == []


def test_a_crash_left_next_and_old_are_orphans_removed_before_anything_runs(
        agent: tuple[Agent, FakeWorld, FakeRoutes]) -> None:
    a, _world, _routes = agent
    a.deploy(svc("v1"))
    rec = a.registry.get_service("shop")
    listed = {("shop", c): Workload("shop", c, "container", RUNNING, spec_digest="x")
              for (_s, c) in [("shop", "web"), ("shop", "web.next"), ("shop", "web.old")]}
    known = {k: w for k, w in listed.items() if k == ("shop", "web")}
    orphans = [w for k, w in listed.items() if k not in known]
    p = plan([rec], known, orphans, lambda r, c: "y", {}, 0.0, Policy(60, 60))
    kinds = [(x.kind, x.component) for x in p.actions]
    assert kinds[:2] == [("remove", "web.next"), ("remove", "web.old")]
    assert ("run", "web") in kinds   # spec drift, after the orphans are gone


def test_health_during_a_replace_is_truthful_and_a_crash_left_next_is_an_orphan(
        agent: tuple[Agent, FakeWorld, FakeRoutes]) -> None:
    """While a start-first replace runs, its ``web.next`` (and, draining, ``web.old``)
    is the replace's own: health lists the replace, no orphan and no spec drift (the
    record is the new version while the old one still serves). The same ``web.next``
    with no replace in flight (an agent crash left it) is an orphan."""
    a, world, routes = agent
    a.deploy(svc("v1"))
    seen: list[dict[str, Any]] = []
    switch = routes.switch

    def switch_and_look(service: str, component: str) -> None:
        seen.append(a.health())           # both run, the proxy still on the old one
        web = a.status("shop")["components"][0]
        assert (web["state"], web["spec_drift"]) == ("running", False), web
        switch(service, component)

    routes.switch = switch_and_look       # type: ignore[method-assign]
    a.steps.sleep = lambda s: seen.append(a.health())   # while the old one drains
    v2 = svc("v2").to_dict()
    v2["components"][1]["image"] = "localhost/worker:v1"   # only web changes
    a.deploy(from_dict(v2))
    assert len(seen) == 2, seen
    for h in seen:
        assert (h["status"], h["orphans"], h["spec_drift"], h["replacing"]) == (
            "healthy", [], [], ["shop/web"]), h["reasons"]
    after = a.health()
    assert (after["status"], after["replacing"]) == ("healthy", [])
    # A .next no replace owns: what a crash between its run and the switch leaves.
    rt = a.runtime("container")
    rt.run(replace(a.spec("shop", a.registry.get_service("shop").component("web")),
                   slot="next"))
    h = a.health()
    assert h["status"] == "degraded" and h["orphans"] == ["shop/web.next (container)"], h
