"""scale, fleet section (issue 21 item 4): etcd requests and bytes per fleet deploy as
the node holds more services and the fleet has more node records, each figure against
the same run's smallest (1 node record, 10 services).

A real single-member etcd (Debian's etcd-server) and one in-process fleet member
(its watch, lease guard, fleet thread and 1 s monitor rounds running) on fake
runtimes: what is counted is the member's own etcd client (``cluster.Traffic``:
requests, and request plus response bodies, the watch streams' included), which no
runtime touches. Other node
records are written as live nodes write theirs (the member's own record, renamed,
under a lease of their own); the services on the node are placed through the fleet
like any deploy. Each measured deploy places a new service pinned to the node and
returns once the node answered; per deploy is the mean of ``DEPLOYS`` of them, counted
until the member's traffic is still for a second (the rollout's end, 0.5 s healthy,
included).
Target: <= 2x across the range.

    .venv/bin/python bench/scale.py --only fleet
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (tests/ on the path)
from etcd_env import EtcdCluster
from fake_runtime import FakeWorld

from mcp_node.cluster import NODES
from mcp_node.config import from_dict as config_from_dict
from mcp_node.fleetops import FleetOperations
from mcp_node.servicedef import from_dict
from mcp_node.wiring import node_agent

DEPLOYS = 5
REQUEST_LIMIT = int(1.5 * 1024 * 1024)   # etcd's default --max-request-bytes


def defn(name: str) -> Any:
    return from_dict({"name": name, "node": "c1", "update": {"min_healthy_s": 0.5},
                      "components": [
        {"name": "web", "image": "localhost/web:v1", "memory_mb": 1,
         "env": ["GREETING=hello"]}]})


def settle(a: FleetOperations) -> None:
    """Until the member's traffic stopped moving for a second (what a deploy set off,
    its rollout's end among it, has ended)."""
    t = a.fleet.traffic
    last = -1
    while t.bytes != last:
        last = t.bytes
        time.sleep(1.0)


def per_deploy(a: FleetOperations, tag: str) -> tuple[float, float]:
    settle(a)
    t = a.fleet.traffic
    r0, b0 = t.requests, t.bytes
    names = [f"m-{tag}-{i}" for i in range(DEPLOYS)]
    for n in names:
        st = a.deploy(defn(n))
        assert st.get("node") == "c1" and not st.get("pending"), st
    settle(a)
    out = ((t.requests - r0) / DEPLOYS, (t.bytes - b0) / DEPLOYS)
    for n in names:
        a.undeploy(n)
    return out


def set_records(a: FleetOperations, n: int, lease: list[int]) -> None:
    """``n`` node records in all (the member's own among them), the others under one
    lease of their own (revoked to take them away)."""
    etcd = a.fleet.etcd
    if lease:
        etcd.revoke(lease.pop())
    if n <= 1:
        return
    lease.append(etcd.grant(3600))
    rec = a.fleet.record()
    for i in range(1, n):
        name = f"n{i:04d}"
        etcd.put(NODES + name, {**rec, "node": name, "holder": f"{name}/x"}, lease=lease[0])


def run(nodes: tuple[int, ...] = (1, 100, 1000), services: tuple[int, ...] = (10, 200)
        ) -> list[str]:
    base = Path(tempfile.mkdtemp(prefix="mcp-bench-scale-fleet-"))
    etcd = EtcdCluster(base / "etcd", size=1)
    etcd.base.mkdir()
    a: FleetOperations | None = None
    rows: dict[tuple[int, int], tuple[float, float]] = {}
    try:
        etcd.start(0)
        etcd.wait_healthy()
        cfg = config_from_dict({"state": {"dir": str(base / "c1")},
                                "monitor": {"interval_s": 1.0}, "cluster": {
            "etcd": etcd.endpoints, "node": "c1", "memory_mb": 100_000, "lease_ttl_s": 60,
            "deploy_wait_s": 30}})
        a = FleetOperations(node_agent(cfg, runtimes=FakeWorld().runtimes()))
        a.start_monitor(reconcile=True)   # its rounds publish what changed, as a node's do
        held, lease = 0, []
        for s in services:
            set_records(a, 1, lease)
            for i in range(held, s):
                a.deploy(defn(f"s{i:04d}"))
            held = s
            for n in nodes:
                set_records(a, n, lease)
                rows[(s, n)] = per_deploy(a, f"{s}-{n}")
        biggest = max(len(str(kv.value)) for kv in
                      a.fleet.etcd.get_prefix("/mcp/")[1].values())
    finally:
        if a is not None:
            a.close()
        etcd.stop_all()
    r0, b0 = rows[(services[0], nodes[0])]
    out = [f"  fleet deploy, etcd traffic per deploy (mean of {DEPLOYS}; one member's "
           f"client, watch streams included):"]
    for (s, n), (r, b) in rows.items():
        out.append(f"    {s:4} services on the node, {n:5} node records: {r:6.1f} requests "
                   f"{b / 1024:8.1f} KiB  {r / r0:5.2f}x requests {b / b0:6.2f}x bytes")
    worst = max(b for _, b in rows.values()) / b0
    out.append(f"  fleet deploy bytes, most / least: {worst:.2f}x (target <= 2x); the largest "
               f"value in etcd {biggest / 1024:.1f} KiB (request limit "
               f"{REQUEST_LIMIT / 1024:.0f} KiB)")
    return out


if __name__ == "__main__":
    print("\n".join(run()))
