"""Fleet logic without etcd or workloads: the pure placement rules, and many seeded
rounds of the real Fleet code (placement transactions, failover by the leader, drain,
uncordon, returns) on an in-memory etcd, checking after every step that capacity
is never overcommitted and every service is where the rules say."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from fake_etcd import FakeEtcd
from fake_runtime import FakeWorld

from mcp_node import fleetmoves
from mcp_node.cluster import ALLOC, SERVICES
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import ResourceError, ValidationError
from mcp_node.fleetedge import wanted
from mcp_node.fleetops import FleetOperations
from mcp_node.fleetviews import Fleetview
from mcp_node.multinode import drained_text, nodes_table, placed_text
from mcp_node.placement import Demand, NodeInfo, choose, demand_of, parse_target
from mcp_node.servicedef import from_dict
from mcp_node.wiring import node_agent


def node(name: str, mem: int = 1000, **kw: Any) -> NodeInfo:
    return NodeInfo(name=name, memory_mb=mem, vcpus=4, runtimes=("container", "unikernel"),
                    **kw)


def test_choose_rules_and_reasons() -> None:
    nodes = {"a": node("a", held=Demand(600)), "b": node("b", held=Demand(100)),
             "e": node("e", roles=("edge",)), "p": node("p", pool="gpu", held=Demand(900))}
    want = Demand(memory_mb=200, runtimes=("container",))
    assert choose("s", want, "", nodes).node == "b"                 # most free memory
    assert choose("s", want, "a", nodes).node == "a"                # pinned
    assert choose("s", want, "pool:gpu", nodes).node == ""          # 100 free in the pool
    c = choose("s", want, "pool:gpu", nodes)
    assert c.reasons["p"] == "needs 200 MB memory, 100 MB free" and c.mode == "pool:gpu"
    assert "e: not a compute node" in choose("s", Demand(5000), "", nodes).refusal("s")
    assert list(choose("s", Demand(5000), "a", nodes).reasons) == ["a"]   # pinned: its own
    # a redeploy in place frees what it holds first, and does not move
    assert choose("s", Demand(300), "", nodes, current="p",
                  holding=Demand(250)).node == "p"
    assert choose("s", want, "", nodes, exclude=frozenset({"b"})).node == "a"
    cordoned = {**nodes, "b": node("b", cordoned=True)}
    assert choose("s", want, "", cordoned).reasons["b"].startswith("cordoned")
    assert choose("s", Demand(runtimes=("unikernel",)), "", {"x": NodeInfo(
        "x", memory_mb=9, runtimes=("container",))}).reasons["x"] == "no unikernel runtime"
    assert choose("s", want, "ghost", nodes).reasons["ghost"].startswith("not up")
    ties = {"z": node("z"), "m": node("m")}
    assert choose("s", want, "", ties).node == "m"                  # ties go by name
    assert parse_target("pool:x") == ("pool", "x") and parse_target("n1") == ("node", "n1")


def test_demand_counts_memory_vm_vcpus_ports() -> None:
    d = demand_of(from_dict({"name": "s", "components": [
        {"name": "a", "image": "i:1", "memory_mb": 100, "routes": [{"port": 1}]},
        {"name": "b", "image": "i:1", "runtime": "unikernel", "memory_mb": 128, "vcpus": 2}]}))
    assert (d.memory_mb, d.vcpus, d.ports, d.runtimes) == (228, 2, 1,
                                                           ("container", "unikernel"))


def test_definition_keys_and_refusals() -> None:
    d = from_dict({"name": "s", "node": "pool:blue", "components": [
        {"name": "w", "image": "i:1", "routes": [{"port": 8443,
                                                  "public_hostname": "App.Example.net"}]}]})
    assert d.node == "pool:blue"
    assert d.components[0].routes[0].public_hostname == "app.example.net"
    local = d.local_part()
    assert local.node == "" and local.components[0].routes[0].public_hostname == ""
    assert "node" not in local.to_dict() and "public_hostname" not in str(local.to_dict())
    for bad, field in (({"node": "Bad_Name"}, "node"), ({"node": 3}, "node"),
                       ({"node": "pool:"}, "node")):
        with pytest.raises(ValidationError, match=field):
            from_dict({"name": "s", **bad, "components": [{"name": "w", "image": "i:1"}]})
    with pytest.raises(ValidationError, match="public_hostname"):
        from_dict({"name": "s", "components": [{"name": "w", "image": "i:1", "routes": [
            {"port": 1, "public_hostname": "not a name"}]}]})


def test_cluster_config_checks() -> None:
    from mcp_node.config import parse

    cfg, errors = parse({"cluster": {"etcd": ["127.0.0.1:2379"], "roles": ["compute", "db"],
                                     "node": "Bad", "cert_file": "/c", "lease_ttl_s": 1}})
    text = "\n".join(map(str, errors))
    for want in ("cluster.etcd: '127.0.0.1:2379' is not an http", "cluster.roles: 'db'",
                 "cluster.node: 'Bad'", "cluster.cert_file: cert_file and key_file",
                 "cluster.lease_ttl_s: must be 2-3600"):
        assert want in text
    assert not config_from_dict({}).cluster.enabled


def test_edge_wants_public_routes_of_placed_running_services() -> None:
    rec = {"node": "c1", "state": "running", "definition": {"name": "s", "components": [
        {"name": "w", "image": "i:1", "routes": [
            {"name": "a", "port": 8443, "public_hostname": "app.example.net"},
            {"name": "b", "port": 9000, "hostname": "b.svc.z"}]}]}}
    got = wanted({"s": rec, "t": {**rec, "node": ""}, "u": {**rec, "state": "stopped"}}, "svc.z")
    assert got == {"app.example.net": {"backend": "s.svc.z", "port": 8443, "node": "c1",
                                       "service": "s"}}


def test_cli_texts() -> None:
    assert placed_text({"placement": "spread", "node": "c2"}) == \
        " on node c2 (most free memory)"
    assert placed_text({"service": "x"}) == ""
    out = nodes_table([{"node": "c1", "state": "up", "roles": ["compute"], "pool": "",
                        "services": 2, "memory_mb": {"free": 10, "total": 20},
                        "cordoned": True, "leader": False}])
    assert "c1" in out and "10/20" in out and "yes" in out
    assert "moved a -> c2" in drained_text({"node": "c1", "moved": [
        {"service": "a", "to": "c2"}], "stayed": []})


# -- many rounds of the real Fleet code on an in-memory etcd -------------------------

NAMES = ("c1", "c2", "c3")


def fleet_agents(tmp_path: Path, etcd: FakeEtcd) -> dict[str, FleetOperations]:
    agents = {}
    for i, name in enumerate(NAMES):
        cfg = config_from_dict({"state": {"dir": str(tmp_path / name)}, "cluster": {
            "etcd": ["http://127.0.0.1:9"], "node": name, "pool": "p" if i < 2 else "q",
            "memory_mb": 1000, "grace_s": 0}})
        a = FleetOperations(node_agent(cfg, runtimes=FakeWorld().runtimes()))
        a.fleet.etcd = etcd  # type: ignore[assignment]
        a.fleet._await = lambda name, node, gen: {"service": name}  # type: ignore
        a.fleet._join()
        agents[name] = a
    return agents


def check_invariants(etcd: FakeEtcd, live: set[str], seed: int) -> None:
    _, svcs = etcd.get_prefix(SERVICES)
    _, allocs = etcd.get_prefix(ALLOC)
    held: dict[str, int] = {}
    for k, kv in svcs.items():
        rec = kv.value
        held[rec["node"]] = held.get(rec["node"], 0) + rec["demand"]["memory_mb"]
        pinned = parse_target(rec.get("target", ""))[0] == "node"
        if rec["node"] not in live:       # only pinned ones, or ones that fit nowhere, wait
            assert pinned or rec.get("waiting"), (seed, k, rec)
    view = Fleetview(allocs=allocs)
    for n in NAMES:
        total = sum(d["memory_mb"] for d in view.alloc(n).values())
        assert total == held.get(n, 0), (seed, n, total, held)   # alloc matches records
        assert total <= 1000, (seed, n, total)                    # never overcommitted


@pytest.mark.parametrize("seed", [11, 22, 33, 44, 55, 66, 77, 88])
def test_random_deploys_deaths_drains_keep_the_rules(tmp_path: Path, seed: int) -> None:
    print(f"seed {seed}")
    rnd = random.Random(seed)
    etcd = FakeEtcd()
    agents = fleet_agents(tmp_path, etcd)
    live = set(NAMES)
    try:
        for _step in range(200):
            op = rnd.choice(["deploy"] * 5 + ["undeploy", "kill", "back", "drain", "uncordon"])
            a = agents[rnd.choice(sorted(live))] if live else None
            if op == "deploy" and a is not None:
                target = rnd.choice(["", "", "pool:p", "pool:q", *NAMES])
                d = from_dict({"name": f"s{rnd.randrange(12)}", **(
                    {"node": target} if target else {}), "components": [
                    {"name": "w", "image": "i:1", "memory_mb": rnd.choice([100, 200, 400])}]})
                try:
                    st = a.deploy(d)
                    kv = etcd.get(SERVICES + d.name)
                    assert kv is not None and kv.value["node"] == st["node"]
                    if target in NAMES:
                        assert st["node"] == target
                except ResourceError as exc:
                    assert "fits no node" in str(exc)
            elif op == "undeploy" and a is not None:
                _, svcs = etcd.get_prefix(SERVICES)
                if svcs:
                    a.undeploy(rnd.choice(sorted(svcs))[len(SERVICES):])
            elif op == "kill" and len(live) > 1:
                dead = rnd.choice(sorted(live))
                fl = agents[dead].fleet
                assert fl is not None
                etcd.expire(fl.lease)
                live.discard(dead)
                for n in live:                       # someone wins the election
                    f = agents[n].fleet
                    assert f is not None
                    f.leader = False
                    f._campaign()
                leader = next(agents[n].fleet for n in sorted(live)
                              if agents[n].fleet.leader)  # type: ignore[union-attr]
                assert leader is not None
                fleetmoves.leader_round(leader)      # notes the loss (grace 0)
                fleetmoves.leader_round(leader)      # moves what may move
            elif op == "back":
                gone = sorted(set(NAMES) - live)
                if gone:
                    n = rnd.choice(gone)
                    agents[n].fleet._join()  # type: ignore[union-attr]
                    live.add(n)
                    for m in live:
                        f = agents[m].fleet
                        if f is not None and f.leader:
                            fleetmoves.leader_round(f)
            elif op == "drain" and a is not None and a.fleet is not None:
                out = a.fleet.drain(rnd.choice(NAMES))
                assert all(m["to"] != out["node"] for m in out["moved"])
            elif op == "uncordon" and a is not None and a.fleet is not None:
                _, cords = etcd.get_prefix("/mcp/cordon/")
                if cords:
                    a.fleet.uncordon(rnd.choice(sorted(cords)).rsplit("/", 1)[1])
            check_invariants(etcd, live, seed)
    finally:
        for a in agents.values():
            a.close()


def test_the_old_layout_is_read_and_moved_into_keys_per_service(tmp_path: Path) -> None:
    """A fleet upgraded in place: a node's one alloc value still counts, and the first
    placement on that node moves it into one key per service in the same transaction;
    a node's one observed value is read where no per-service key exists, and a node
    of this version removes its own when it publishes."""
    from mcp_node import fleetstate
    from mcp_node.cluster import OBSERVED

    etcd = FakeEtcd()
    agents = fleet_agents(tmp_path, etcd)
    etcd.put(ALLOC + "c1", {"old": {"memory_mb": 900, "vcpus": 0, "ports": 0,
                                    "runtimes": ["container"]}})
    with pytest.raises(ResourceError, match="fits no node"):      # the old value counts
        agents["c2"].deploy(from_dict({"name": "big", "node": "c1", "components": [
            {"name": "w", "image": "i:1", "memory_mb": 200}]}))
    agents["c2"].deploy(from_dict({"name": "small", "node": "c1", "components": [
        {"name": "w", "image": "i:1", "memory_mb": 50}]}))
    _, allocs = etcd.get_prefix(ALLOC + "c1")
    assert sorted(allocs) == [ALLOC + "c1/old", ALLOC + "c1/small"]
    assert allocs[ALLOC + "c1/old"].value["memory_mb"] == 900
    legacy = {"node": "c9", "services": {"x": {"generation": 3, "error": "",
                                               "status": {"service": "x"}}}}
    etcd.put(OBSERVED + "c9", legacy)
    assert fleetstate.observed(etcd, "c9", "x") == {"c9": {"services": {
        "x": legacy["services"]["x"]}}}
    assert fleetstate.observed(etcd)["c9"]["services"]["x"]["generation"] == 3
    etcd.put(OBSERVED + "c1", {"node": "c1", "services": {}})
    agents["c1"].fleet.sync()                  # runs "small" and publishes
    assert etcd.get(OBSERVED + "c1") is None
    assert etcd.get(fleetstate.key("c1", "small")) is not None
