"""Fleet state at the size of a node with many services (issue 21): with 200 services
on one node, against a real etcd that refuses requests over 128 KiB (a twelfth of
etcd's default 1.5 MiB), every fleet deploy is placed and answered, no request the
member sends comes near that limit, and what the node publishes is one small key per
service. Before this layout the node's one observed value (every service's status,
about 1.1-1.6 KiB each) passed 128 KiB near 100 services."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etcd_env import LIMITED_REQUEST_BYTES, EtcdCluster
from fake_runtime import FakeWorld

from mcp_node.cluster import OBSERVED
from mcp_node.config import from_dict as config_from_dict
from mcp_node.fleetops import FleetOperations
from mcp_node.servicedef import from_dict
from mcp_node.wiring import node_agent

SERVICES = 200


def defn(name: str) -> Any:
    return from_dict({"name": name, "node": "c1", "components": [
        {"name": "web", "image": "localhost/web:v1", "memory_mb": 1}]})


def test_a_deploy_with_200_services_on_a_node_stays_far_under_the_request_limit(
        etcd_limited: EtcdCluster, tmp_path: Path) -> None:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "c1")}, "cluster": {
        "etcd": etcd_limited.endpoints, "node": "c1", "memory_mb": 100_000,
        "lease_ttl_s": 60, "deploy_wait_s": 30}})
    a = FleetOperations(node_agent(cfg, runtimes=FakeWorld().runtimes()))
    sent: list[int] = []
    add = a.fleet.traffic.add
    a.fleet.traffic.add = lambda s, r: (sent.append(s), add(s, r))[1]  # type: ignore
    a.fleet.start()
    try:
        for i in range(SERVICES):
            st = a.deploy(defn(f"s{i:03d}"))
            assert st["node"] == "c1" and not st.get("pending"), st
        del sent[:]
        st = a.deploy(defn("last"))                    # the 201st: placed and answered
        assert st["node"] == "c1" and not st.get("pending") and st["components"], st
        assert sent and max(sent) < LIMITED_REQUEST_BYTES / 8, max(sent)
        _, kvs = a.fleet.etcd.get_prefix(OBSERVED)
        assert len(kvs) == SERVICES + 1 and OBSERVED + "c1" not in kvs
        assert max(len(str(kv.value)) for kv in kvs.values()) < 4096
        assert a.status("s000")["fleet"]["node"] == "c1"
    finally:
        a.close()
