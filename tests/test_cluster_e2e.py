"""Fleet mode end to end with real components (issue 12): a 3-member etcd, two compute
agents and one edge agent, each simulated node with a Tailnet address of its own (the
host side of a veth into its network namespace) and a podman of its own; BIND9 takes
the nodes' DNS registrations (TSIG), Pebble issues every certificate, each node has
its own Caddy. One case, run once (it is the slow one):

deploy through the edge agent -> placed on a compute node, served on its proxy, and
the public hostname answers through the edge's public port; SIGKILL-like death of
that node's agent and its workloads -> the service answers again through the same
public hostname from the other node (the time is printed); the node comes back and
removes what moved away; undeploy removes the edge route.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from edge_env import Caddy, Pebble, free_port, https_get
from etcd_env import EtcdCluster, NodeNetns, NodePodman
from podman_env import containers_conf
from route_env import TSIG_NAME, ZONE, Bind

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.servicedef import from_dict

PUBLIC = "app.example.net"


class SimNode:
    def __init__(self, name: str, cfg: dict[str, Any], pod: NodePodman | None) -> None:
        self.name, self.raw, self.pod = name, cfg, pod
        self.agent: Agent | None = None

    def start(self) -> Agent:
        self.agent = Agent(config_from_dict(self.raw))
        self.agent.start_monitor(reconcile=True)
        return self.agent

    def crash(self) -> None:
        """The machine dies: the agent stops without a word (its lease just expires)
        and every workload of the node is gone."""
        a = self.agent
        assert a is not None and a.fleet is not None
        f = a.fleet
        f._stop.set()
        f._wake.set()
        for t in f._threads:
            t.join(timeout=10)
        f.lease = 0
        a.close()
        self.agent = None
        if self.pod is not None:
            self.pod.kill_workloads()


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
def fleet3(etcd_cluster: EtcdCluster, tmp_path: Path, hello_image: str) -> Iterator[
        dict[str, Any]]:
    need("named", "caddy", "pebble", "ip", "podman")
    made: list[Any] = []
    nodes: dict[str, SimNode] = {}
    try:
        bind = Bind(tmp_path / "bind").start()
        made.append(bind)
        pebble = Pebble(tmp_path / "pebble", bind.port, always_valid=True).start()
        made.append(pebble)
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        secret = bind.secret_file(tmp_path / "tsig.secret")
        route_port = free_port()
        for i, name in enumerate(("c1", "c2", "e1"), start=1):
            caddy = Caddy(tmp_path / f"caddy-{name}").start()
            made.append(caddy)
            compute = name != "e1"
            ns = pod = None
            if compute:
                ns = NodeNetns(i).start()
                made.append(ns)
                pod = NodePodman(tmp_path / f"podman-{name}", i, containers_conf()).start(
                    [hello_image])
                made.append(pod)
            cfg: dict[str, Any] = {
                "state": {"dir": str(tmp_path / name / "state")},
                "monitor": {"interval_s": 0.5},
                "proxy": {"admin": caddy.admin_url, "https_port": caddy.https_port,
                          "serve_routes": compute},
                "acme": {"directory": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle),
                         "http01_port": pebble.http01_port if compute else free_port()},
                "dns": {"update_server": f"127.0.0.1:{bind.port}", "tsig_name": TSIG_NAME,
                        "tsig_secret_file": str(secret), "timeout_s": 2.0,
                        "nameservers": [f"127.0.0.1:{bind.port}"]},
                "edge": {"internal_zone": ZONE, "allowed_domains": ["example.net"],
                         "backend_ca": str(root)},
                "cluster": {"etcd": etcd_cluster.endpoints, "node": name,
                            "roles": ["compute"] if compute else ["edge"],
                            "lease_ttl_s": 3, "grace_s": 1, "memory_mb": 2048,
                            "timeout_s": 1, "deploy_wait_s": 90},
            }
            if ns is not None and pod is not None:
                cfg["node"] = {"advertise": ns.addr}
                cfg["podman"] = {"socket": f"unix://{pod.sock}",
                                 "containers_conf": str(pod.base / "containers.conf")}
            nodes[name] = SimNode(name, cfg, pod)
            nodes[name].caddy = caddy  # type: ignore[attr-defined]
        for n in nodes.values():
            n.start()
        yield {"nodes": nodes, "bind": bind, "root": root, "route_port": route_port,
               "image": hello_image}
    finally:
        for n in nodes.values():
            if n.agent is not None:
                n.agent.close()
        for thing in reversed(made):
            with contextlib.suppress(Exception):
                thing.stop()


def public_body(env: dict[str, Any]) -> str:
    edge = env["nodes"]["e1"]
    status, body, _cert = https_get(edge.caddy.https_port, PUBLIC, env["root"])
    return body if status == 200 else ""


def test_public_hostname_follows_the_service_across_nodes(fleet3: dict[str, Any]) -> None:
    nodes: dict[str, SimNode] = fleet3["nodes"]
    e1 = nodes["e1"].agent
    assert e1 is not None
    defn = from_dict({"name": "web", "components": [{
        "name": "web", "image": fleet3["image"], "memory_mb": 64,
        "routes": [{"port": fleet3["route_port"], "public_hostname": PUBLIC}]}]})
    st = e1.deploy(defn)                     # through the edge agent: placed, not run there
    first = st["node"]
    other = "c2" if first == "c1" else "c1"
    assert first in ("c1", "c2") and st["placement"] == "spread"
    assert "hello" in until(lambda: public_body(fleet3), 60, "public hostname never answered")
    addr = nodes[first].raw["node"]["advertise"]
    assert fleet3["bind"].query(f"web.{ZONE}", "A") == [addr]
    nodes[first].crash()
    t0 = time.monotonic()
    until(lambda: e1.status("web")["node"] == other, 60, "web was not re-placed")
    moved = time.monotonic() - t0
    new_addr = nodes[other].raw["node"]["advertise"]
    until(lambda: fleet3["bind"].query(f"web.{ZONE}", "A") == [new_addr], 60,
          "the new node did not take the DNS name over")
    assert "hello" in until(lambda: public_body(fleet3), 90,
                            "public hostname did not answer again")
    total = time.monotonic() - t0
    print(f"\nfailover {first} -> {other}: re-placed {moved:.1f} s after the kill, public "
          f"hostname answering again {total:.1f} s after it (lease ttl 3 s, grace 1 s)")
    # the node comes back: what moved away is removed, and nothing of it is served there
    back = nodes[first].start()
    until(lambda: not back.registry.has_service("web"), 30, "returned node kept web")
    pod = nodes[first].pod
    assert pod is not None
    assert "mcp-web-web" not in pod.cli("ps", "-a", "--format", "{{.Names}}").stdout
    assert "hello" in public_body(fleet3)
    # undeploy anywhere: the edge route and the DNS name go
    back.undeploy("web")
    until(lambda: not e1.registry.get_edge_route(PUBLIC), 30, "edge route stayed")
    until(lambda: fleet3["bind"].query(f"web.{ZONE}", "A") == [], 30, "DNS name stayed")
