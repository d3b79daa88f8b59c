"""Fleet mode's rollouts on an in-memory etcd (issue 19 item 6): the node a service is
placed on rolls a fleet deploy out; the deploy answers with that rollout, ``mcp deploy
--wait`` (``wait_ready``) through any agent ends with its outcome (succeeded, or
reverted naming why), and a revert is the fleet's too: etcd's record is the definition
the node runs again, a generation later, so no resync, restart or other node deploys
the failing version again. The node agents are real (fake runtimes, their monitors
running); each fleet's round (sync, write-back, publish) is pumped by the test, since a
fake etcd has no watch. Real etcd and two agents: test_cluster_fleet.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from fake_etcd import FakeEtcd
from fake_runtime import FakeWorld

from mcp_node.clictx import LocalBackend
from mcp_node.cliwait import wait_ready
from mcp_node.cluster import SERVICES
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import MCPError
from mcp_node.fleetnode import Fleet
from mcp_node.fleetops import FleetOperations
from mcp_node.servicedef import from_dict
from mcp_node.wiring import node_agent


def svc(web: str) -> Any:
    return from_dict({"name": "shop", "node": "c2",
                      "update": {"min_healthy_s": 0.3, "healthy_deadline_s": 1.5},
                      "components": [
                          {"name": "web", "image": f"localhost/web:{web}", "restart": "always"},
                          {"name": "db", "image": "localhost/db:v1"}]})


class Fleet2:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp, self.etcd = tmp_path, FakeEtcd()
        self.worlds = {name: FakeWorld() for name in ("c1", "c2")}
        self.agents = {name: self.agent(name) for name in ("c1", "c2")}
        self.stop = threading.Event()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def agent(self, name: str) -> FleetOperations:
        """The node's agent (again, on its state dir and world: a restart)."""
        cfg = config_from_dict({
            "state": {"dir": str(self.tmp / name)},
            "monitor": {"interval_s": 0.05, "restart_backoff_max_s": 1},
            "cluster": {"etcd": ["http://127.0.0.1:9"], "node": name, "memory_mb": 1000,
                        "deploy_wait_s": 10, "lease_ttl_s": 600}})
        a = FleetOperations(node_agent(cfg, runtimes=self.worlds[name].runtimes(),
                                       monitor=True))
        a.fleet.etcd = self.etcd  # type: ignore[assignment]
        a.fleet._join()
        a.fleet._await = self._await(a.fleet)  # type: ignore[method-assign]
        return a

    def _await(self, f: Fleet) -> Any:
        def wait(name: str, node: str, gen: int) -> dict[str, Any]:
            if node in self.paused:   # placed, not followed: as a node whose agent died
                return {"service": name, "node": node, "pending": True, "components": []}
            self.agents[node].fleet.sync()
            return Fleet._await(f, name, node, gen)
        return wait

    def _pump(self) -> None:
        """Each fleet's round, as its own thread would run it (not a paused node's)."""
        while not self.stop.wait(0.05):
            for name, a in list(self.agents.items()):
                if name not in self.paused:
                    a.fleet._round()

    paused: set[str] = set()

    def close(self) -> None:
        self.stop.set()
        self.pump.join(10)
        for a in self.agents.values():
            a.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet2]:
    f = Fleet2(tmp_path)
    try:
        yield f
    finally:
        f.close()


def crash_loop(world: FakeWorld, stop: threading.Event) -> None:
    """web v2 exits a moment after every start."""
    while not stop.wait(0.1):
        w = world.workloads.get(("shop", "web"))
        if w is not None and w.spec.image.endswith(":v2") and w.state == "running":
            world.crash("shop", "web")


def test_a_fleet_deploy_reports_its_rollout_and_a_revert_is_the_fleets(
        fleet: Fleet2) -> None:
    c1, c2 = fleet.agents["c1"], fleet.agents["c2"]
    st = c1.deploy(svc("v1"))
    assert st["node"] == "c2" and st["rollout"]["state"] == "in_progress", st
    assert (st["unchanged"], st["rollout"]["generation"]) == (False, 1)
    st = wait_ready(LocalBackend(c1), "shop", 20, rollout=st["rollout"]["version"])
    assert st["rollout"]["state"] == "succeeded" and st["fleet"]["reverted"] is None

    stop = threading.Event()
    t = threading.Thread(target=crash_loop, args=(fleet.worlds["c2"], stop), daemon=True)
    t.start()
    try:
        began = c1.deploy(svc("v2"))
        assert (began["node"], began["generation"]) == ("c2", 2)
        r = began["rollout"]
        assert (r["version"], r["state"], r["previous"], r["components"]) == (
            2, "in_progress", 1, ["web"]), r
        with pytest.raises(MCPError) as e:       # what mcp deploy --wait says (exit 1)
            wait_ready(LocalBackend(c1), "shop", 20, rollout=2)
    finally:
        stop.set()
        t.join()
    msg = str(e.value)
    assert msg.startswith("shop: the rollout of version 2 reverted: web ") and \
        msg.endswith("; version 1 runs again") and "needs 0.3 s healthy" in msg, msg

    # etcd's desired state is what runs again, a generation later, saying why.
    def written_back() -> Any:
        kv = fleet.etcd.get(SERVICES + "shop")
        return kv if kv is not None and kv.value["generation"] == 3 else None

    kv = until(written_back, 10, "the revert was not written back to etcd")
    assert kv.value["definition"]["components"][0]["image"] == "localhost/web:v1"
    assert kv.value["definition"]["node"] == "c2" and kv.value["node"] == "c2"
    rev = kv.value["reverted"]
    assert (rev["generation"], rev["version"], rev["to"], rev["node"]) == (2, 2, 1, "c2")
    assert rev["reason"].startswith("web ")
    st = until(lambda: (s := c1.status("shop"))["fleet"]["generation"] == 3 and s, 10,
               "the node did not publish generation 3")
    assert st["rollout"]["state"] == "reverted" and st["fleet"]["reverted"] == rev
    assert st["definition"]["components"][0]["image"] == "localhost/web:v1"

    # A resync (the minute's, any service's change) deploys nothing again.
    versions = [h["version"] for h in c2.local.history("shop")]
    c2.fleet.sync()
    assert [h["version"] for h in c2.local.history("shop")] == versions == [1, 2, 3]
    assert c2.local.rollouts.of("shop").version == 2     # type: ignore[union-attr]
    assert fleet.worlds["c2"].workloads[("shop", "web")].spec.image == "localhost/web:v1"
    assert c2.local.rollouts.counts["started"] == 2

    # The same (reverted-to) version again changes nothing there: the answer says so,
    # and --wait waits for readiness, not for version 2's outcome (mcp deploy --wait).
    again = c1.deploy(svc("v1"))
    assert (again["generation"], again["unchanged"], again["rollout"]["version"]) == (
        4, True, 2), again
    assert wait_ready(LocalBackend(c1), "shop", 20, None)["rollout"]["state"] == "reverted"
    assert [h["version"] for h in c2.local.history("shop")] == [1, 2, 3]

    # A new deploy of a good version rolls out as usual from there.
    st = c1.deploy(svc("v3"))
    assert (st["generation"], st["unchanged"], st["rollout"]["version"]) == (5, False, 4)
    st = wait_ready(LocalBackend(c1), "shop", 20, rollout=st["rollout"]["version"])
    assert st["rollout"]["state"] == "succeeded"
    assert fleet.worlds["c2"].workloads[("shop", "web")].spec.image == "localhost/web:v3"


def test_a_fleet_deploy_the_nodes_death_cut_short_is_reverted_once(fleet: Fleet2) -> None:
    """c2's agent dies after its registry write of generation 2 (a crash-looping v2),
    before the deploy recorded its version: the restarted agent records it and rolls it
    out (Rollouts.resume_interrupted), reverts it, and writes the revert back to etcd as
    for any fleet rollout: v2 is rolled out once, never deployed again."""
    c1 = fleet.agents["c1"]
    st = c1.deploy(svc("v1"))
    wait_ready(LocalBackend(c1), "shop", 20, rollout=st["rollout"]["version"])
    fleet.paused = {"c2"}
    placed = c1.deploy(svc("v2"))               # in etcd; c2 does not follow it yet
    assert placed["pending"] and fleet.etcd.get(SERVICES + "shop").value["generation"] == 2
    c2 = fleet.agents["c2"]
    c2.local.registry.put_service(svc("v2").local_part())   # what the killed deploy left
    c2.close(revoke=False)
    stop = threading.Event()
    t = threading.Thread(target=crash_loop, args=(fleet.worlds["c2"], stop), daemon=True)
    t.start()
    try:
        fleet.agents["c2"] = c2 = fleet.agent("c2")           # restarted
        fleet.paused = set()
        r = until(lambda: (x := c2.local.rollouts.of("shop")) is not None and
                  x.state == "reverted" and x, 20, "the resumed rollout was not reverted")
        kv = until(lambda: (k := fleet.etcd.get(SERVICES + "shop")) is not None and
                   k.value["generation"] == 3 and k, 10, "the revert was not written back")
    finally:
        stop.set()
        t.join()
    assert (r.version, r.previous) == (2, 1)
    assert kv.value["definition"]["components"][0]["image"] == "localhost/web:v1"
    assert kv.value["reverted"]["generation"] == 2
    c2.fleet.sync()
    assert [h["version"] for h in c2.local.history("shop")] == [1, 2, 3]
    assert c2.local.rollouts.counts["started"] == 1        # v2 rolled out once
    assert fleet.worlds["c2"].workloads[("shop", "web")].spec.image == "localhost/web:v1"
