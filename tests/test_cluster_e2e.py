"""Fleet mode end to end with real components (issue 12): a 3-member etcd, two compute
agents and one edge agent, each simulated node with a Tailnet address of its own (the
host side of a veth into its network namespace) and a podman of its own; BIND9 takes
the nodes' DNS registrations (TSIG), Pebble issues every certificate, each node has
its own Caddy (etcd_env.SimFleet). One case, run once (it is the slow one):

deploy through the edge agent -> placed on a compute node, served on its proxy, and
the public hostname answers through the edge's public port; death of that node's
agent, its workloads left running (its fence stops them before the move, checked)
-> the service answers again through the same public
hostname from the other node (the time is printed); the node comes back and removes
what moved away; undeploy removes the edge route and the DNS name.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from etcd_env import PUBLIC, EtcdCluster, SimFleet

from mcp_node.servicedef import from_dict


def until(what: Callable[[], Any], timeout: float, msg: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = what()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{msg} (last: {last!r})")


@pytest.fixture
def sim(etcd_cluster: EtcdCluster, tmp_path: Path, hello_image: str) -> Iterator[SimFleet]:
    need("named", "caddy", "pebble", "ip", "podman")
    fleet = SimFleet(tmp_path, etcd_cluster.endpoints, hello_image)
    try:
        yield fleet.start()
    finally:
        fleet.close()


def test_public_hostname_follows_the_service_across_nodes(sim: SimFleet) -> None:
    e1 = sim.agent("e1")
    defn = from_dict({"name": "web", "components": [{
        "name": "web", "image": sim.image, "memory_mb": 64,
        "routes": [{"port": sim.route_port, "public_hostname": PUBLIC}]}]})
    st = e1.deploy(defn)                     # through the edge agent: placed, not run there
    first = st["node"]
    other = "c2" if first == "c1" else "c1"
    assert first in ("c1", "c2") and st["placement"] == "spread"
    assert "hello" in until(sim.public_body, 60, "public hostname never answered")
    assert sim.bind.query(f"web.{sim.zone}", "A") == [sim.nodes[first].address]
    assert e1.local.registry.get_edge_route(PUBLIC).backend_address == sim.nodes[first].address
    sim.nodes[first].crash()
    t0 = time.monotonic()
    until(lambda: e1.status("web")["node"] == other, 60, "web was not re-placed")
    moved = time.monotonic() - t0
    pod = sim.nodes[first].pod
    assert pod is not None        # the dead agent's copy was fenced before the move
    assert "mcp-web-web" not in pod.cli("ps", "--format", "{{.Names}}").stdout
    until(lambda: sim.bind.query(f"web.{sim.zone}", "A") == [sim.nodes[other].address], 60,
          "the new node did not take the DNS name over")
    assert "hello" in until(sim.public_body, 90, "public hostname did not answer again")
    total = time.monotonic() - t0
    print(f"\nfailover {first} -> {other}: re-placed {moved:.1f} s after the kill, public "
          f"hostname answering again {total:.1f} s after it (lease ttl 3 s, grace 1 s)")
    assert e1.local.registry.get_edge_route(PUBLIC).backend_address == sim.nodes[other].address
    # the node comes back: what moved away is removed, and nothing of it is served there
    back = sim.nodes[first].start()
    until(lambda: not back.local.registry.has_service("web"), 30, "returned node kept web")
    assert "mcp-web-web" not in pod.cli("ps", "-a", "--format", "{{.Names}}").stdout
    assert "hello" in sim.public_body()
    # undeploy anywhere: the edge route and the DNS name go
    back.undeploy("web")
    until(lambda: not e1.local.registry.get_edge_route(PUBLIC), 30, "edge route stayed")
    until(lambda: sim.bind.query(f"web.{sim.zone}", "A") == [], 30, "DNS name stayed")
