"""A real 3-member etcd cluster (Debian's etcd-server) on loopback, for fleet tests.

Each member is a child process recorded by pid, stopped by that pid, on free
ports; ``kill(i)`` SIGKILLs one and ``start(i)`` brings it back on its data dir.
Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import need
from egress import no_egress_env
from netns import VethNetns

from mcp_node.fleetops import FleetOperations
from mcp_node.wiring import node_agent

__all__ = ["LIMITED_REQUEST_BYTES", "PUBLIC", "EtcdCluster", "NodeNetns", "NodePodman",
           "SimFleet", "SimNode", "etcd_cluster", "etcd_limited", "etcd_tls", "free_ports"]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class EtcdCluster:
    def __init__(self, base: Path, size: int = 3, extra: tuple[str, ...] = ()) -> None:
        self.base, self.extra = base, extra
        ports = free_ports(2 * size)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.names = [f"e{i + 1}" for i in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}"
                                for n, p in zip(self.names, self.peer_ports, strict=True))

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def start(self, i: int) -> None:
        name, cp, pp = self.names[i], self.client_ports[i], self.peer_ports[i]
        data = self.base / name
        state = "existing" if data.exists() else "new"
        with open(self.base / f"{name}.log", "ab") as logf:
            self.procs[i] = subprocess.Popen(
                ["etcd", "--name", name, "--data-dir", str(data),
                 "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                 "--listen-client-urls", f"http://127.0.0.1:{cp}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                 "--initial-cluster", self.initial, "--initial-cluster-state", state,
                 "--initial-cluster-token", f"mcp-test-{os.getpid()}",
                 "--heartbeat-interval", "50", "--election-timeout", "500",
                 "--logger", "zap", "--log-level", "error", *self.extra],
                stdout=logf, stderr=logf)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.procs[i] = None

    def stop_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(i)
            self.procs[i] = None

    def healthy(self, i: int) -> bool:
        with contextlib.suppress(requests.RequestException, ValueError):
            r = requests.get(f"{self.endpoints[i]}/health", timeout=1)
            return bool(r.json().get("health") == "true")
        return False

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for i in members if members is not None else range(len(self.names)):
            while not self.healthy(i):
                p = self.procs[i]
                assert p is not None and p.poll() is None, self.log(i)
                assert time.monotonic() < deadline, f"etcd {self.names[i]} not healthy"
                time.sleep(0.1)

    def log(self, i: int) -> str:
        path = self.base / f"{self.names[i]}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    need("etcd")
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.base.mkdir()
    try:
        for i in range(3):
            cluster.start(i)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()


LIMITED_REQUEST_BYTES = 128 * 1024


@pytest.fixture
def etcd_limited(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One member that refuses requests over 128 KiB (etcd's default: 1.5 MiB)."""
    need("etcd")
    cluster = EtcdCluster(tmp_path / "etcd", size=1,
                          extra=("--max-request-bytes", str(LIMITED_REQUEST_BYTES)))
    cluster.base.mkdir()
    try:
        cluster.start(0)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()


# -- simulated nodes: a Tailnet address of their own, a podman of their own ----------


class NodeNetns:
    """A network namespace with a veth pair: ``addr`` (the node's Tailnet address, on
    the host side, where its proxy listens) and ``peer`` inside. Made and deleted here."""

    def __init__(self, index: int) -> None:
        import secrets

        self.name = f"mcpfleet{index}{secrets.token_hex(2)}"
        self.addr, self.peer = f"100.64.{20 + index}.1", f"100.64.{20 + index}.2"
        self.ns: VethNetns | None = None

    def start(self) -> NodeNetns:
        self.ns = VethNetns(self.name, f"mcf{self.name[-6:]}h", self.addr, self.peer).start()
        return self

    def stop(self) -> None:
        if self.ns is not None:
            self.ns.stop()
            self.ns = None


class NodePodman:
    """A podman of the node's own: its own storage, CNI network (bridge and subnet)
    and REST service, so two simulated nodes may run workloads of the same name, as
    two machines do. The service is stopped by its pid; storage and bridge removed."""

    def __init__(self, base: Path, index: int, conf: str) -> None:
        self.base, self.index = base, index
        self.net = f"mcpfleet{index}"
        self.sock = base / "podman.sock"
        self.env = no_egress_env(dict(os.environ,
                                      CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
                                      CONTAINERS_CONF=str(base / "containers.conf")))
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, images: list[str]) -> NodePodman:
        import json

        b = self.base
        (b / "net").mkdir(parents=True, exist_ok=True)
        (b / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{b}/root"\nrunroot = "{b}/run"\n')
        # Its own tmp_dir too: conmon's exit files live there (/run/libpod by default),
        # and a second podman sharing them made the main one's stops time out in CI.
        (b / "containers.conf").write_text(
            Path(self.conf).read_text().replace("[engine]\n", f'[engine]\ntmp_dir = "{b}/tmp"\n')
            + f'\n[network]\nnetwork_config_dir = "{b}/net"\ndefault_network = "{self.net}"\n')
        subnet = f"10.78.{self.index}"
        (b / "net" / f"{self.net}.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": self.net, "plugins": [
                {"type": "bridge", "bridge": f"cni-mcpf{self.index}", "isGateway": True,
                 "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                          "ranges": [[{"subnet": f"{subnet}.0/24",
                                       "gateway": f"{subnet}.1"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "firewall"}, {"type": "tuning"}]}))
        for image in images:
            tar = b / "image.tar"
            subprocess.run(["podman", "save", "-o", str(tar), image], check=True,
                           capture_output=True, timeout=120)
            subprocess.run(["podman", "load", "-i", str(tar)], env=self.env, check=True,
                           capture_output=True, timeout=120)
            tar.unlink()
        with open(b / "podman.log", "ab") as logf:
            self.proc = subprocess.Popen(
                ["podman", "system", "service", "--time=0", f"unix://{self.sock}"],
                env=self.env, stdout=logf, stderr=logf)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, "podman service died"
            assert time.monotonic() < deadline, "podman service did not come up"
            time.sleep(0.05)
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=120)

    def kill_workloads(self) -> None:
        """As the machine dying: every container of this node gone."""
        self.cli("rm", "-f", "-a", "-t", "0")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        self.kill_workloads()
        self.cli("system", "reset", "-f")
        subprocess.run(["ip", "link", "del", f"cni-mcpf{self.index}"], capture_output=True,
                       timeout=20)


# -- a whole simulated fleet: two compute nodes and one edge, real components --------

PUBLIC = "app.example.net"


class SimNode:
    """One in-process agent with its node's config (its podman, address and Caddy)."""

    def __init__(self, name: str, cfg: dict[str, Any], pod: NodePodman | None,
                 caddy: Any) -> None:
        self.name, self.raw, self.pod, self.caddy = name, cfg, pod, caddy
        self.agent: FleetOperations | None = None

    def start(self) -> FleetOperations:
        from mcp_node.config import from_dict

        self.agent = FleetOperations(node_agent(from_dict(self.raw)))
        self.agent.start_monitor(reconcile=True)
        return self.agent

    @property
    def address(self) -> str:
        return str(self.raw.get("node", {}).get("advertise", ""))

    def crash(self) -> None:
        """The agent dies: it stops without a word (its lease just expires) and its
        workloads are left running, as a real crash leaves them; the node's fence
        must stop them before the lease can expire (issue 18)."""
        a = self.agent
        assert a is not None
        a.close(revoke=False)        # its lease is not revoked: it expires
        self.agent = None

    def stop_fence(self) -> None:
        """The fence process the node's agent started, stopped by its pid."""
        from mcp_node import fence

        pid = fence.fence_pid(Path(self.raw["state"]["dir"]))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class SimFleet:
    """etcd endpoints given; BIND (TSIG updates), Pebble, a Caddy per node, and for
    each compute node a Tailnet address and a podman of its own. ``close`` stops
    everything this made, by pid, and removes namespaces, bridges and storage."""

    def __init__(self, base: Path, etcd: list[str], image: str, *, ttl: int = 3,
                 grace: float = 1.0) -> None:
        self.base, self.etcd, self.image, self.ttl, self.grace = base, etcd, image, ttl, grace
        self.made: list[Any] = []
        self.nodes: dict[str, SimNode] = {}
        self.route_port = 0

    def start(self) -> SimFleet:
        from edge_env import Caddy, Pebble
        from edge_env import free_port as edge_free_port
        from podman_env import containers_conf
        from route_env import TSIG_NAME, ZONE, Bind

        base = self.base
        self.bind = Bind(base / "bind").start()
        self.made.append(self.bind)
        pebble = Pebble(base / "pebble", self.bind.port, always_valid=True).start()
        self.made.append(pebble)
        self.root = base / "pebble-root.pem"
        self.root.write_bytes(pebble.root_pem())
        secret = self.bind.secret_file(base / "tsig.secret")
        self.route_port = edge_free_port()
        self.zone = ZONE
        for i, name in enumerate(("c1", "c2", "e1"), start=1):
            caddy = Caddy(base / f"caddy-{name}").start()
            self.made.append(caddy)
            compute = name != "e1"
            cfg: dict[str, Any] = {
                "state": {"dir": str(base / name / "state")},
                "monitor": {"interval_s": 0.5},
                "proxy": {"admin": caddy.admin_url, "https_port": caddy.https_port,
                          "serve_routes": compute},
                "acme": {"directory": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle),
                         "http01_port": pebble.http01_port if compute else edge_free_port()},
                "dns": {"update_server": f"127.0.0.1:{self.bind.port}", "tsig_name": TSIG_NAME,
                        "tsig_secret_file": str(secret), "timeout_s": 2.0,
                        "nameservers": [f"127.0.0.1:{self.bind.port}"]},
                "edge": {"internal_zone": ZONE, "allowed_domains": ["example.net"],
                         "backend_ca": str(self.root)},
                "cluster": {"etcd": self.etcd, "node": name,
                            "roles": ["compute"] if compute else ["edge"],
                            "lease_ttl_s": self.ttl, "grace_s": self.grace, "memory_mb": 2048,
                            "timeout_s": 1, "deploy_wait_s": 90},
            }
            pod = None
            if compute:
                ns = NodeNetns(i).start()
                self.made.append(ns)
                pod = NodePodman(base / f"podman-{name}", i, containers_conf()).start(
                    [self.image])
                self.made.append(pod)
                cfg["node"] = {"advertise": ns.addr}
                cfg["podman"] = {"socket": f"unix://{pod.sock}",
                                 "containers_conf": str(pod.base / "containers.conf")}
            self.nodes[name] = SimNode(name, cfg, pod, caddy)
        for n in self.nodes.values():
            n.start()
        return self

    def agent(self, name: str) -> FleetOperations:
        a = self.nodes[name].agent
        assert a is not None, f"{name} is down"
        return a

    def public_body(self) -> str:
        """GET / of the public hostname through the edge's public port ('' unless 200)."""
        from edge_env import https_get

        status, body, _cert = https_get(self.nodes["e1"].caddy.https_port, PUBLIC, self.root)
        return body if status == 200 else ""

    def close(self) -> None:
        for n in self.nodes.values():
            if n.agent is not None:
                with contextlib.suppress(Exception):
                    n.agent.close()
                n.agent = None
            n.stop_fence()
        for thing in reversed(self.made):
            with contextlib.suppress(Exception):
                thing.stop()
        self.made.clear()


@pytest.fixture
def etcd_tls(tmp_path: Path) -> Iterator[dict[str, str]]:
    """One etcd member that wants TLS and a client certificate from its CA; yields the
    endpoint and the CA, client certificate and key files (a second CA's pair too)."""
    need("etcd")
    from edge_env import TestCA

    ca, other = TestCA("etcd-test-ca"), TestCA("someone-else")
    files: dict[str, str] = {}
    for name, data in (("ca", ca.pem), *zip(("server_cert", "server_key"),
                                            ca.leaf(["localhost"], ("127.0.0.1",)), strict=True),
                       *zip(("cert", "key"), ca.leaf(["mcp-agent"]), strict=True),
                       *zip(("bad_cert", "bad_key"), other.leaf(["intruder"]), strict=True)):
        path = tmp_path / f"etcd-{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        files[name] = str(path)
    cp, pp = free_ports(2)
    files["endpoint"] = f"https://127.0.0.1:{cp}"
    with open(tmp_path / "etcd-tls.log", "ab") as logf:
        proc = subprocess.Popen(
            ["etcd", "--name", "t1", "--data-dir", str(tmp_path / "etcd-tls"),
             "--listen-peer-urls", f"http://127.0.0.1:{pp}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
             "--initial-cluster", f"t1=http://127.0.0.1:{pp}",
             "--listen-client-urls", files["endpoint"], "--advertise-client-urls",
             files["endpoint"], "--cert-file", files["server_cert"], "--key-file",
             files["server_key"], "--client-cert-auth", "--trusted-ca-file", files["ca"],
             "--log-level", "error", "--logger", "zap"], stdout=logf, stderr=logf)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "etcd-tls.log").read_text()[-2000:]
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{files['endpoint']}/health", timeout=1, verify=files["ca"],
                                 cert=(files["cert"], files["key"]))
                if r.ok:
                    break
            assert time.monotonic() < deadline, "TLS etcd did not come up"
            time.sleep(0.1)
        yield files
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
