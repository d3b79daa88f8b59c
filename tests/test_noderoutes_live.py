"""Node routes with real components (issue 11): podman, Caddy, HAProxy, Pebble (real
HTTP-01 through BIND), BIND9 with TSIG dynamic updates, a client in a netns."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from edge_env import Caddy, Pebble
from route_env import HOST_ADDR, ZONE, Bind, RouteNetns, make_route_config, tls_get

from mcp_node.agent import Agent
from mcp_node.config import AgentConfig
from mcp_node.noderoutes import RouteError
from mcp_node.servicedef import from_dict as service_from_dict


@dataclass
class Live:
    agent: Agent
    caddy: Caddy
    bind: Bind
    pebble: Pebble
    netns: RouteNetns
    root: Path
    secret_file: Path
    image: str

    def fetch(self, name: str, port: int, mode: str = "l7") -> str:
        return self.netns.fetch(self.bind.port, name, port, self.root, mode)

    def ours_in_caddy(self) -> list[str]:
        cfg = self.caddy.config() or {}
        servers = (((cfg.get("apps") or {}).get("http") or {}).get("servers") or {})
        return sorted(n for n in servers if n.startswith("mcp_node_"))

    def cert_files(self) -> list[str]:
        d = self.agent.state_dir / "routes" / "certs"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def free_on(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path, podman_config: AgentConfig, podman_cleanup: Any, hello_image: str,
         caddy: Caddy, bind_dns: Bind, route_pebble: Pebble,
         route_netns: RouteNetns) -> Iterator[Live]:
    secret = bind_dns.secret_file(tmp_path / "tsig.secret")
    cfg = make_route_config(podman_config, caddy, route_pebble, bind_dns, secret)
    agent = Agent(cfg)
    podman_cleanup.add(agent.owner)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(route_pebble.root_pem())
    try:
        yield Live(agent, caddy, bind_dns, route_pebble, route_netns, root, secret, hello_image)
    finally:
        if agent._routes is not None:
            agent.node_routes.l4.stop()   # our HAProxy, by the pid its pid file holds
        agent.close()


def svc(name: str, image: str, routes: dict[str, tuple[int, str]]) -> Any:
    """One hello component per route (hello listens on $PORT: a single unnamed route)."""
    return service_from_dict({"name": name, "components": [
        {"name": comp, "image": image, "routes": [{"port": port, "mode": mode}]}
        for comp, (port, mode) in routes.items()]})


def test_l7_and_l4_routes_lifecycle(live: Live) -> None:
    a = live.agent
    p7, p4, p4b = free_on(HOST_ADDR), free_on(HOST_ADDR), free_on(HOST_ADDR)
    host = f"rt.{ZONE}"
    st = a.deploy(svc("rt", live.image, {"web": (p7, "l7"), "raw": (p4, "l4")}))
    routes = {c["component"]: c["routes"][0] for c in st["components"]}
    assert routes["web"]["url"] == f"https://{host}:{p7}/"
    assert routes["web"]["dns"] == f"registered {HOST_ADDR}"
    assert routes["web"]["proxy"] == "serving" and routes["raw"]["proxy"] == "serving"
    out = live.fetch(host, p7)
    addr, serial, reply = out.split(" ", 2)
    assert addr == HOST_ADDR and "200" in reply.splitlines()[0]
    assert serial == routes["web"]["cert_serial"] and routes["web"]["cert_expires"]
    assert "200" in live.fetch(host, p4, "l4")
    assert live.bind.query(host, "A") == [HOST_ADDR]

    # An open l4 connection survives another route's change (a hitless HAProxy reload).
    with socket.create_connection((HOST_ADDR, p4), timeout=10) as held:
        reloads = a.node_routes.l4.reloads
        a.deploy(svc("rt2", live.image, {"tcp": (p4b, "l4")}))
        assert a.node_routes.l4.reloads == reloads + 1
        held.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert b"200" in held.recv(4096).split(b"\r\n")[0]

    # Redeploy onto a new host port (a renamed component): the URL stays and answers.
    old_hp = routes["web"]["host_port"]
    st = a.deploy(svc("rt", live.image, {"web2": (p7, "l7"), "raw": (p4, "l4")}))
    web2 = next(c["routes"][0] for c in st["components"] if c["component"] == "web2")
    assert web2["host_port"] != old_hp and web2["url"] == f"https://{host}:{p7}/"
    assert web2["cert_serial"] == routes["web"]["cert_serial"]   # same name, same cert
    assert "200" in live.fetch(host, p7).split(" ", 2)[2]

    # Stop takes the route out of the proxy; start puts it back.
    a.stop("rt")
    assert live.ours_in_caddy() == []
    a.start("rt")
    assert live.ours_in_caddy() == [f"mcp_node_{p7}"]

    # Caddy restarted empty: reconcile restores the route (one PUT of the apps tree).
    live.caddy.stop()
    live.caddy.start()
    assert live.ours_in_caddy() == []
    calls = a.node_routes.caddy.admin_calls
    a.node_routes.reconcile()
    assert a.node_routes.caddy.admin_calls - calls == 2   # GET apps + one PUT
    assert "200" in live.fetch(host, p7).split(" ", 2)[2]

    # Undeploy: route, certificate files, DNS records and the HAProxy listener go.
    a.undeploy("rt")
    assert live.ours_in_caddy() == [] and live.cert_files() == []
    assert live.bind.query(host, "A") == [] and live.bind.query(host, "TXT") == []
    a.undeploy("rt2")
    assert not a.node_routes.l4.running()
    assert a.registry.node_hosts() == {}


def test_hostname_rules_and_hijack(live: Live) -> None:
    a = live.agent
    with pytest.raises(Exception) as err:
        a.deploy(service_from_dict({"name": "out", "components": [{
            "name": "web", "image": live.image,
            "routes": [{"port": free_on(HOST_ADDR), "hostname": "out.example.net"}]}]}))
    assert err.value.__class__.__name__ == "ValidationError"
    assert "components[0].routes[0].hostname" in str(err.value)
    with pytest.raises(Exception) as err:
        a.deploy(svc("low", live.image, {"web": (443, "l7")}))
    assert "components[0].routes[0].port" in str(err.value) and "low_ports" in str(err.value)
    assert a.registry.list_services() == []

    # A name registered for another address is refused, naming who holds it.
    import dns.name
    import dns.query
    import dns.tsigkeyring
    import dns.update

    keyring = dns.tsigkeyring.from_text({"mcp-test-key": live.bind.secret})
    upd = dns.update.UpdateMessage(ZONE, keyring=keyring,
                                   keyname=dns.name.from_text("mcp-test-key"))
    upd.add(f"taken.{ZONE}.", 60, "A", "100.64.1.2")
    upd.add(f"taken.{ZONE}.", 60, "TXT", '"mcp-node=other-node"')
    dns.query.tcp(upd, "127.0.0.1", port=live.bind.port, timeout=3)
    with pytest.raises(RouteError) as rerr:
        a.deploy(svc("taken", live.image, {"web": (free_on(HOST_ADDR), "l7")}))
    msg = str(rerr.value)
    assert "dns step failed" in msg and "100.64.1.2" in msg and "other-node" in msg
    assert live.bind.query(f"taken.{ZONE}", "A") == ["100.64.1.2"]
    assert live.cert_files() == [] and live.ours_in_caddy() == []
    assert a.ps()[0]["state"] in ("running", "starting")   # the component runs
    a.monitor.refresh()
    assert any("taken" in r for r in a.health()["reasons"])


@pytest.mark.parametrize("fault", ["tsig", "bind_down", "pebble_down", "caddy_down"])
def test_fault_leaves_nothing_half_made(live: Live, fault: str) -> None:
    a = live.agent
    host, port = f"f-{fault.replace('_', '-')}.{ZONE}", free_on(HOST_ADDR)
    name = host.split(".")[0]
    if fault == "tsig":
        live.bind.secret_file(live.secret_file, "d3Jvbmcgc2VjcmV0IHdyb25nIHNlY3JldA==")
    faults: dict[str, Bind | Pebble | Caddy] = {
        "bind_down": live.bind, "pebble_down": live.pebble, "caddy_down": live.caddy}
    stopped = faults.get(fault)
    if stopped is not None:
        stopped.stop()
    with pytest.raises(RouteError) as err:
        a.deploy(svc(name, live.image, {"web": (port, "l7")}))
    step = {"tsig": "dns", "bind_down": "dns", "pebble_down": "certificate",
            "caddy_down": "proxy"}[fault]
    assert f"{step} step failed" in str(err.value), str(err.value)
    assert "components run" in str(err.value)
    # the component runs; health names the route and step; nothing half-made
    assert [r["service"] for r in a.ps()] == [name]
    a.monitor.refresh()
    reasons = a.health()["reasons"]
    assert any(host in r and f"{step} step failed" in r for r in reasons), reasons
    assert live.cert_files() == [] and a.registry.node_hosts() == {}
    if fault != "caddy_down":
        assert live.ours_in_caddy() == []
    if fault != "bind_down":
        assert live.bind.query(host, "A") == []
    [row] = a.status(name)["components"][0]["routes"]
    assert row["error"].startswith(f"{step} step failed") and row["proxy"] != "serving"
    # the cause fixed, the next sync (reconcile without its backoff) serves the route
    if fault == "tsig":
        live.bind.secret_file(live.secret_file)
    elif stopped is not None:
        stopped.start()
        if fault == "pebble_down":
            live.root.write_bytes(live.pebble.root_pem())
    assert a.node_routes.sync() == {}
    assert "200" in live.fetch(host, port).split(" ", 2)[2]


class Load:
    """GET / through the node proxy (TLS to the node's address, the route's name) every
    ``every`` s on a thread of its own, each answer's status line kept."""

    def __init__(self, live: Live, host: str, port: int, every: float) -> None:
        import ssl
        import threading

        self.host, self.port, self.every = host, port, every
        self.tls = ssl.create_default_context(cafile=str(live.root))
        self.answers: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def get(self) -> str:
        """The whole answer (status line first), or why there was none."""
        return tls_get(self.port, self.host, self.tls)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.answers.append(self.get())
            self.stop.wait(self.every)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    @property
    def failed(self) -> list[str]:
        """The status line (or error) of each request that did not answer 200."""
        lines = [x.split("\r\n", 1)[0] for x in self.answers]
        return [x for x in lines if " 200 " not in x + " "]

    def body(self) -> str:
        """The last answer's ("" before the first)."""
        return self.answers[-1].partition("\r\n\r\n")[2] if self.answers else ""


def start_first(name: str, component: dict[str, Any], order: str = "start-first") -> Any:
    return service_from_dict({"name": name, "update": {"order": order, "drain_s": 0.5},
                              "components": [component]})


@pytest.mark.parametrize("order", ["start-first", "stop-first"])
def test_start_first_replaces_without_a_failed_request(live: Live, order: str) -> None:
    """Issue 19 item 3: requests through the node proxy every 20 ms during start-first
    redeploys (a changed env each time) all answer; the new workload is on a new host
    port, the old one is gone, and nothing of the replace is left. The same redeploys
    stop-first fail requests (the old one stops before the new one listens), so the
    load would see a gap."""
    a, port, host = live.agent, free_on(HOST_ADDR), f"sf.{ZONE}"

    def defn(version: str) -> Any:
        return start_first("sf", {"name": "web", "image": live.image,
                                  "env": [f"VERSION={version}"], "routes": [{"port": port}]},
                           order)

    a.deploy(defn("v1"))
    load = Load(live, host, port, 0.02)
    assert " 200 " in load.get()
    ports = [a.registry.get_service("sf").component("web").host_ports[""]]
    with load:
        for version in ("v2", "v3"):
            a.deploy(defn(version))
            ports.append(a.registry.get_service("sf").component("web").host_ports[""])
    assert len(load.answers) > (20 if order == "start-first" else 5), load.answers
    if order == "stop-first":
        assert load.failed, f"stop-first failed no request of {len(load.answers)}"
        assert len(set(ports)) == 1   # replaced in place, on its port
    else:
        assert load.failed == [], (len(load.answers), load.failed[:5])
        assert len(set(ports)) == 3   # each replace on a new host port
    names = [w.extra["name"] for w in a.runtime("container").list() if w.service == "sf"]
    assert names == ["mcp-sf-web"]
    assert a.status("sf")["components"][0]["routes"][0]["host_port"] == ports[-1]
    a.undeploy("sf")


@pytest.fixture
def live_vm(tmp_path: Path, podman_config: AgentConfig, podman_cleanup: Any, nanos: Path,
            hello_image: str, caddy: Caddy, bind_dns: Bind, route_pebble: Pebble,
            route_netns: RouteNetns) -> Iterator[Live]:
    """``live`` with the unikernel runtime too: Nanos q35 guests under TCG."""
    from qemu_env import VMReaper, kernel_path

    secret = bind_dns.secret_file(tmp_path / "tsig.secret")
    cfg = make_route_config(podman_config, caddy, route_pebble, bind_dns, secret,
                            qemu={"kernel": str(kernel_path()), "accel": "tcg",
                                  "nanos_dir": str(nanos), "machine": "q35"})
    agent = Agent(cfg)
    podman_cleanup.add(agent.owner)
    reaper = VMReaper()
    reaper.watch(cfg.state_dir)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(route_pebble.root_pem())
    try:
        yield Live(agent, caddy, bind_dns, route_pebble, route_netns, root, secret, hello_image)
    finally:
        agent.close()
        reaper.run()


@pytest.mark.parametrize("order", ["start-first", "stop-first"])
def test_a_vm_replaced_start_first_fails_no_request(live_vm: Live, order: str) -> None:
    """Issue 19 item 3 for a VM: a Nanos unikernel's redeploy (a changed env) while a
    client GETs through Caddy every 50 ms. Start-first: the new VM boots beside the old
    one on a new host port, its check passes once the guest answers, the proxy switches,
    the old VM drains and goes: every request answers, one qemu is left. Stop-first: the
    old VM is powered off before the new one has booted: requests fail (502 while no
    qemu listens, then they wait on the new qemu's forwarder until the guest answers)."""
    from qemu_env import qemu_pids_in

    a, port, host = live_vm.agent, free_on(HOST_ADDR), f"vm.{ZONE}"

    def defn(version: str) -> Any:
        return start_first("vm", {"name": "web", "image": live_vm.image,
                                  "runtime": "unikernel", "memory_mb": 128,
                                  "check": "http:/", "env": [f"MESSAGE={version}"],
                                  "routes": [{"port": port}]}, order)

    a.deploy(defn("v1"))
    load = Load(live_vm, host, port, 0.05)
    until(lambda: "hello from v1" in load.get(), 60, "v1 through the proxy")
    before = a.registry.get_service("vm").component("web").host_ports[""]
    with load:
        a.deploy(defn("v2"))
        after = a.registry.get_service("vm").component("web").host_ports[""]
        # the new VM answers through the proxy before the load stops
        until(lambda: "hello from v2" in load.body(), 30, "v2 through the proxy")
    print(f"{order}: {len(load.answers)} requests, failed: {load.failed}")
    if order == "stop-first":   # a request may also hang on qemu's forwarder while
        # the new guest boots (it accepts before the guest listens): few answers in all
        assert load.failed, f"stop-first failed no request of {len(load.answers)}"
        assert after == before
    else:
        assert len(load.answers) > 10, load.answers
        assert load.failed == [], (len(load.answers), load.failed[:5])
        assert after != before   # beside the old one, on a new host port
    dirs = sorted(p.name for p in (a.state_dir / "vms").iterdir() if p.is_dir()
                  and not p.name.startswith("."))
    assert dirs == ["vm-web"], dirs
    assert len(qemu_pids_in(a.state_dir)) == 1
    st = a.status("vm")["components"][0]
    assert st["state"] == "running" and st["routes"][0]["host_port"] == after
    a.undeploy("vm")
    assert qemu_pids_in(a.state_dir) == []
