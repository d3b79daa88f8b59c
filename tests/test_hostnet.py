"""Bridged networking's host side (issue 23): the argv and ruleset builders exactly, then
links, nft rules, isolation and the per-service dnsmasq for real, inside network
namespaces the test makes (testbed.md: nothing outside them is addressed)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from conftest import need, until

from mcp_node import hostnet
from mcp_node.errors import NetworkSetupError, WorkloadError
from mcp_node.hostnet import Forward, ruleset_text

# -- pure builders ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eth0", "mcpbr", "mcpt", "mcpbrA1", "mcpbr1;x", "mcpbr1 up",
                                  'mcpbr1"', "mcpt1x2345678901", "mcpxx1", "", "mcpbr-1"])
def test_names_that_are_not_ours_are_refused_before_any_command(name: str) -> None:
    for build in (hostnet.bridge_argv, hostnet.tap_argv, hostnet.delete_argv):
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            build(name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        hostnet.ensure_bridge(name, "10.89.1.1/24")
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        hostnet.ensure_tap("mcpt1x2", name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        hostnet.set_route_localnet(name, True)


def test_link_argv() -> None:
    assert hostnet.bridge_argv("mcpbr255") == ["ip", "link", "add", "name", "mcpbr255",
                                               "type", "bridge"]
    assert hostnet.tap_argv("mcpt255x254") == ["ip", "tuntap", "add", "dev", "mcpt255x254",
                                               "mode", "tap"]
    assert hostnet.up_argv("mcpbr3") == ["ip", "link", "set", "dev", "mcpbr3", "up"]
    assert hostnet.up_argv("mcpt3x2", "mcpbr3") == ["ip", "link", "set", "dev", "mcpt3x2",
                                                    "master", "mcpbr3", "up"]
    assert hostnet.addr_argv("mcpbr3", "10.89.3.1/24") == ["ip", "addr", "add",
                                                           "10.89.3.1/24", "dev", "mcpbr3"]
    assert hostnet.delete_argv("mcpt3x2") == ["ip", "link", "delete", "dev", "mcpt3x2"]


@pytest.mark.parametrize("cidr", ["10.89.1.1", "10.89.1.0/24", "10.89.1.255/24", "x/24",
                                  "10.89.1.1/33", "fd00::1/64", "10.89.1.1/24 dev eth0"])
def test_bad_gateways_are_refused(cidr: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(cidr))):
        hostnet.addr_argv("mcpbr1", cidr)


def test_run_logs_each_command_and_names_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcp_node.hostnet")
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('no such bridge'); sys.exit(2)"]
    with pytest.raises(NetworkSetupError) as e:
        hostnet.run(argv)
    assert str(e.value) == f"{' '.join(argv)} failed: no such bridge"
    assert isinstance(e.value.__cause__, subprocess.CalledProcessError)
    assert [r.getMessage() for r in caplog.records if r.name == "mcp_node.hostnet"] == [
        " ".join(argv)]
    with pytest.raises(NetworkSetupError, match="/nonexistent/ip") as e:
        hostnet.run(["/nonexistent/ip", "link"])
    assert isinstance(e.value.__cause__, OSError)
    assert isinstance(e.value, WorkloadError) and (e.value.status, e.value.code) == (
        502, "network")
    assert hostnet.run(argv, check=False).returncode == 2      # a probe reads it itself


TWO = {"mcpbr1": "10.89.1.1", "mcpbr2": "10.89.2.1"}


def test_ruleset_text_is_the_whole_table() -> None:
    text = ruleset_text({"mcpbr2": "10.89.2.1", "mcpbr1": "10.89.1.1", "mcpbr3": "10.89.3.1"},
                        [("mcpbr1", "mcpbr2"), ("mcpbr1", "mcpbr2")],
                        [Forward(18080, "10.89.1.2", 8080), Forward(18022, "10.89.3.5", 22)])
    assert text == textwrap.dedent("""\
        table inet mcp_node {}
        delete table inet mcp_node
        table inet mcp_node {
        \tchain forward {
        \t\ttype filter hook forward priority -10; policy accept;
        \t\tct state established,related accept
        \t\tiifname "mcpbr1" oifname "mcpbr2" accept
        \t\tiifname "mcpbr1" oifname "mcpbr*" oifname != "mcpbr1" drop
        \t\tiifname "mcpbr2" oifname "mcpbr*" oifname != "mcpbr2" drop
        \t\tiifname "mcpbr3" oifname "mcpbr*" oifname != "mcpbr3" drop
        \t}
        \tchain input {
        \t\ttype filter hook input priority -10; policy accept;
        \t\tiifname "mcpbr1" ip daddr { 10.89.2.1, 10.89.3.1 } drop
        \t\tiifname "mcpbr2" ip daddr { 10.89.1.1, 10.89.3.1 } drop
        \t\tiifname "mcpbr3" ip daddr { 10.89.1.1, 10.89.2.1 } drop
        \t}
        \tchain nat_output {
        \t\ttype nat hook output priority -100; policy accept;
        \t\tip daddr 127.0.0.1 tcp dport 18022 dnat ip to 10.89.3.5:22
        \t\tip daddr 127.0.0.1 tcp dport 18080 dnat ip to 10.89.1.2:8080
        \t}
        \tchain nat_postrouting {
        \t\ttype nat hook postrouting priority 100; policy accept;
        \t\tip saddr 127.0.0.0/8 oifname "mcpbr*" masquerade
        \t}
        }
        """)


def test_an_empty_state_only_removes_the_table() -> None:
    assert ruleset_text({}, [], []) == ("table inet mcp_node {}\n"
                                        "delete table inet mcp_node\n")
    # A lone bridge: no other gateway to keep it from, the forward chain still drops.
    one = ruleset_text({"mcpbr7": "10.89.7.1"}, [], [])
    assert 'iifname "mcpbr7" oifname "mcpbr*" oifname != "mcpbr7" drop' in one
    assert "ip daddr {" not in one


def test_ruleset_text_refuses_bad_state() -> None:
    cases: list[tuple[Any, Any, Any, str]] = [
        ({'mcpbr1" accept': "10.89.1.1"}, [], [], "mcpbr1\" accept"),
        ({"eth0": "10.89.1.1"}, [], [], "'eth0'"),
        ({"mcpbr1": "10.89.1.1; flush ruleset"}, [], [], "gateway of mcpbr1"),
        (TWO, [("mcpbr1", "mcpbr9")], [], "mcpbr9, not a bridge"),
        (TWO, [], [Forward(80, "10.89.1.2", 80), Forward(80, "10.89.2.2", 80)],
         "host port 80 forwarded twice"),
        (TWO, [], [("80", "10.89.1.2", "80")], "is not a Forward"),
    ]
    for bridges, allow, forwards, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            ruleset_text(bridges, allow, forwards)
    for args, message in [((0, "10.89.1.2", 80), "host port 0"),
                          ((80, "10.89.1.2", 70000), "port 70000"),
                          ((80, "10.89.1.2 ", 80), "'10.89.1.2 '"),
                          ((True, "10.89.1.2", 80), "host port True")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Forward(*args)


def test_hosts_text_nameservers_and_dnsmasq_argv() -> None:
    assert hostnet.hosts_text({"10.89.1.3": ["web", "web.svc.internal"],
                               "10.89.1.2": ["db"]}) == (
        "10.89.1.2 db\n10.89.1.3 web web.svc.internal\n")
    for hosts, message in [({"10.89.1.300": ["x"]}, "'10.89.1.300'"),
                           ({"10.89.1.3": "web"}, "non-empty list"),
                           ({"10.89.1.3": []}, "non-empty list"),
                           ({"10.89.1.3": ["we b"]}, "'we b'"),
                           ({"10.89.1.3": ["web\n10.0.0.1 evil"]}, "is not a DNS name")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            hostnet.hosts_text(hosts)
    assert hostnet.nameservers("# c\nnameserver 10.0.0.53\nsearch x\nnameserver fe80::1%eth0\n"
                               "nameserver bogus\nnameserver 10.0.0.53\n") == [
        "10.0.0.53", "fe80::1"]
    assert hostnet.nameservers("") == []
    run = Path("/state/net")
    assert hostnet.dnsmasq_argv("web", "10.89.1.1", run, ["10.0.0.53", "10.89.1.1"]) == [
        "/usr/sbin/dnsmasq", "--pid-file=/state/net/web.pid", "--conf-file=/dev/null",
        "--no-resolv", "--no-hosts", "--addn-hosts=/state/net/web.hosts",
        "--listen-address=10.89.1.1", "--bind-interfaces", "--except-interface=lo",
        "--port=53", "--domain-needed", "--local-ttl=1", "--local=/internal/",
        "--log-facility=/state/net/web.log",
        "--user=nobody", "--group=nogroup", "--server=10.0.0.53"]
    assert not any(a.startswith("--server") for a in
                   hostnet.dnsmasq_argv("web", "10.89.1.1", run, []))
    dhcp = hostnet.Dhcp("mcpbr1", "10.89.1.0/24", {"52:54:0a:59:01:05": "10.89.1.5"})
    assert hostnet.dnsmasq_argv("web", "10.89.1.1", run, [], dhcp)[-8:] == [
        "--interface=mcpbr1", "--dhcp-range=10.89.1.0,static,255.255.255.0,infinite",
        "--dhcp-hostsfile=/state/net/web.dhcp", "--dhcp-authoritative", "--no-ping",
        "--leasefile-ro", "--dhcp-option=option:router,10.89.1.1",
        "--dhcp-option=option:dns-server,10.89.1.1"]
    with pytest.raises(ValueError, match="not ours"):
        hostnet.dnsmasq_argv("web", "10.89.1.1", run, [], replace(dhcp, bridge="eth0"))
    assert hostnet.leases_text({"52:54:0a:59:01:05": "10.89.1.5",
                                "52:54:0a:59:01:03": "10.89.1.3"}) == (
        "52:54:0a:59:01:03,10.89.1.3\n52:54:0a:59:01:05,10.89.1.5\n")
    for leases, message in [({"52:54:0A:59:01:05": "10.89.1.5"}, "'52:54:0A:59:01:05'"),
                            ({"52:54:0a:59:01:05\n": "10.89.1.5"}, "is not a lower-case MAC"),
                            ({"52:54:0a:59:01:05": "10.89.1.5,x"}, "'10.89.1.5,x'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            hostnet.leases_text(leases)
    for service in ("../etc", "Web", "", "a/b"):
        with pytest.raises(ValueError, match=re.escape(repr(service))):
            hostnet.dnsmasq_argv(service, "10.89.1.1", run, [])
    with pytest.raises(ValueError, match="listen address"):
        hostnet.dnsmasq_argv("web", "0.0.0.0/0", run, [])


# -- live, in namespaces of the test's own ----------------------------------------------

NS_RE = re.compile(r"^mcphn(\d+)x[0-9a-f]{6}$")

CHILD = textwrap.dedent("""\
    import json, sys
    from pathlib import Path
    from mcp_node import hostnet
    name, args, kw = json.loads(sys.argv[1])
    obj = hostnet
    if name.startswith("Resolver."):
        obj = hostnet.Resolver(Path(kw.pop("run_dir")), Path(kw.pop("resolv_conf")))
        name = name.split(".", 1)[1]
    try:
        print(json.dumps({"ok": getattr(obj, name)(*args, **kw)}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    """)

LISTENER = textwrap.dedent("""\
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b"ok")
        c.close()
    """)

PROBE = textwrap.dedent("""\
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as c:
            sys.exit(0 if c.recv(2) == b"ok" else 1)
    except OSError:
        sys.exit(1)
    """)

QUERY = textwrap.dedent("""\
    import json, sys
    import dns.resolver
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [sys.argv[1]]
    r.lifetime = 2
    try:
        print(json.dumps(sorted(a.address for a in r.resolve(sys.argv[2], "A"))))
    except Exception as exc:
        print(json.dumps(type(exc).__name__))
    """)


def _kill_in(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                          timeout=10).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _reap_stale() -> None:
    """Namespaces a killed run of this module left (its pid in the name, now dead)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    for line in out.splitlines():
        m = NS_RE.match(line.split()[0]) if line.strip() else None
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_in(m.group(0))
            subprocess.run(["ip", "netns", "del", m.group(0)], capture_output=True, timeout=20)


@dataclass
class Lab:
    """A namespace acting as the node (``node``), plus guest namespaces joined to its
    bridges by veth pairs; all of it removed by ``stop``."""

    node: str = ""
    made: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def netns(self) -> str:
        name = f"mcphn{os.getpid()}x{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
        self.made.append(name)
        self.sh(name, "ip", "link", "set", "lo", "up")
        return name

    def start(self) -> Lab:
        _reap_stale()
        self.node = self.netns()
        self.sh(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)
        for ns in self.made:
            _kill_in(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def sh(self, ns: str, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def call(self, func: str, *args: Any, **kw: Any) -> Any:
        """hostnet.<func>(*args, **kw) run in a process inside the node namespace."""
        out = json.loads(self.sh(self.node, sys.executable, "-c", CHILD,
                                 json.dumps([func, args, kw])))
        if "error" in out:
            raise AssertionError(f"{func}: {out['error']}: {out['message']}")
        return out["ok"]

    def guest(self, bridge: str, addr: str, gateway: str) -> str:
        """A namespace on ``bridge`` (a veth pair) with ``addr``/24, routed via ``gateway``."""
        ns = self.netns()
        host_if = f"mcv{len(self.made)}"
        subprocess.run(["ip", "-n", self.node, "link", "add", host_if, "type", "veth",
                        "peer", "name", "eth0", "netns", ns], check=True, timeout=20)
        self.sh(self.node, "ip", "link", "set", host_if, "master", bridge, "up")
        self.sh(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        self.sh(ns, "ip", "link", "set", "eth0", "up")
        self.sh(ns, "ip", "route", "add", "default", "via", gateway)
        return ns

    def listen(self, ns: str, addr: str, port: int) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                            LISTENER, addr, str(port)]))
        until(lambda: self.reaches(ns, addr if addr != "0.0.0.0" else "127.0.0.1", port),
              10, f"listener {addr}:{port} in {ns} never answered")

    def reaches(self, ns: str, addr: str, port: int) -> bool:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, addr,
                               str(port)], timeout=30).returncode == 0

    def links(self) -> dict[str, Any]:
        found = json.loads(self.sh(self.node, "ip", "-j", "-d", "addr", "show"))
        return {d["ifname"]: d for d in found}

    def nft(self) -> str:
        return self.sh(self.node, "nft", "list", "ruleset")


@pytest.fixture
def lab() -> Iterator[Lab]:
    need("ip", "nft", "dnsmasq", "sysctl")
    if os.geteuid() != 0:
        need(also=("root (for network namespaces)",))
    lab = Lab()
    try:
        yield lab.start()
    finally:
        lab.stop()


live = pytest.mark.integration


def v4(link: dict[str, Any]) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
            if a.get("family") == "inet"]


@live
def test_links_are_made_once_and_removed(lab: Lab) -> None:
    for _ in range(2):
        lab.call("ensure_bridge", "mcpbr1", "10.89.1.1/24")
        lab.call("ensure_tap", "mcpt1x2", "mcpbr1")
    got = lab.links()
    assert v4(got["mcpbr1"]) == ["10.89.1.1/24"] and "UP" in got["mcpbr1"]["flags"]
    assert got["mcpt1x2"]["linkinfo"]["info_kind"] == "tun"
    assert got["mcpt1x2"]["master"] == "mcpbr1" and "UP" in got["mcpt1x2"]["flags"]
    # Another address on the bridge is left alone; a TAP taken off is put back.
    lab.sh(lab.node, "ip", "addr", "add", "10.89.1.9/24", "dev", "mcpbr1")
    lab.sh(lab.node, "ip", "link", "set", "mcpt1x2", "nomaster")
    lab.call("ensure_bridge", "mcpbr1", "10.89.1.1/24")
    lab.call("ensure_tap", "mcpt1x2", "mcpbr1")
    got = lab.links()
    assert v4(got["mcpbr1"]) == ["10.89.1.1/24", "10.89.1.9/24"]
    assert got["mcpt1x2"]["master"] == "mcpbr1"
    assert lab.call("links") == {"mcpbr1": "bridge", "mcpt1x2": "tun"}
    with pytest.raises(AssertionError, match="NetworkSetupError: mcpbr1 exists but is a "
                                             "bridge link, not a TAP"):
        lab.call("ensure_tap", "mcpbr1", "mcpbr1")
    lab.sh(lab.node, "ip", "tuntap", "add", "dev", "mcpt1x3", "mode", "tun")
    with pytest.raises(AssertionError, match="mcpt1x3 exists but is a tun link, not a TAP"):
        lab.call("ensure_tap", "mcpt1x3", "mcpbr1")
    lab.call("delete_link", "mcpt1x3")
    lab.call("delete_link", "mcpt1x2")
    lab.call("delete_link", "mcpt1x2")
    lab.call("delete_link", "mcpbr9")
    assert lab.call("links") == {"mcpbr1": "bridge"}
    with pytest.raises(AssertionError, match=r"NetworkSetupError: ip link set dev mcpt1x2 "
                                             r"master mcpbr404 up failed: .*mcpbr404"):
        lab.call("ensure_tap", "mcpt1x2", "mcpbr404")
    lab.call("set_route_localnet", "mcpbr1", True)
    assert lab.sh(lab.node, "cat", "/proc/sys/net/ipv4/conf/mcpbr1/route_localnet") == "1\n"
    lab.call("set_route_localnet", "mcpbr1", False)
    assert lab.sh(lab.node, "cat", "/proc/sys/net/ipv4/conf/mcpbr1/route_localnet") == "0\n"


@live
def test_rules_replace_the_whole_table_and_nothing_else(lab: Lab) -> None:
    lab.sh(lab.node, "nft", "add", "table", "inet", "someone_else")
    assert lab.call("current_rules") is None
    lab.call("remove_rules")                                   # absent: no error
    lab.call("apply_rules", ruleset_text(TWO, [("mcpbr1", "mcpbr2")],
                                         [Forward(18080, "10.89.1.2", 8080)]))
    first = lab.call("current_rules")
    assert 'iifname "mcpbr1" oifname "mcpbr2" accept' in first
    assert "ip daddr 127.0.0.1 tcp dport 18080 dnat ip to 10.89.1.2:8080" in first
    lab.call("apply_rules", ruleset_text({"mcpbr3": "10.89.3.1"}, [],
                                         [Forward(18081, "10.89.3.2", 80)]))
    second = lab.call("current_rules")
    assert "dnat ip to 10.89.3.2:80" in second and 'oifname != "mcpbr3" drop' in second
    assert "mcpbr1" not in second and "18080" not in second
    assert lab.nft().count("table inet mcp_node") == 1
    with pytest.raises(AssertionError, match=r"nft -f - failed: .*"):
        lab.call("apply_rules", "table inet mcp_node {\n\tchain x { nonsense; }\n}\n")
    assert lab.call("current_rules") == second                 # a refused load changes nothing
    lab.call("apply_rules", ruleset_text({}, [], []))
    assert lab.call("current_rules") is None
    assert "table inet someone_else" in lab.nft()


@live
def test_services_are_isolated_unless_allowed(lab: Lab) -> None:
    for bridge, gw in TWO.items():
        lab.call("ensure_bridge", bridge, f"{gw}/24")
    a = lab.guest("mcpbr1", "10.89.1.2", "10.89.1.1")
    b = lab.guest("mcpbr2", "10.89.2.2", "10.89.2.1")
    lab.listen(a, "10.89.1.2", 8000)
    lab.listen(b, "10.89.2.2", 8000)
    lab.listen(lab.node, "0.0.0.0", 8001)                      # the node's own service
    assert lab.reaches(a, "10.89.2.2", 8000) and lab.reaches(b, "10.89.1.2", 8000)
    assert lab.reaches(a, "10.89.2.1", 8001)                   # the other gateway, no rules

    lab.call("apply_rules", ruleset_text(TWO, [], []))
    assert not lab.reaches(a, "10.89.2.2", 8000) and not lab.reaches(b, "10.89.1.2", 8000)
    assert not lab.reaches(a, "10.89.2.1", 8001) and not lab.reaches(b, "10.89.1.1", 8001)
    assert lab.reaches(a, "10.89.1.1", 8001) and lab.reaches(b, "10.89.2.1", 8001)

    lab.call("apply_rules", ruleset_text(TWO, [("mcpbr1", "mcpbr2")], []))
    assert lab.reaches(a, "10.89.2.2", 8000)                   # allowed, replies come back
    assert not lab.reaches(b, "10.89.1.2", 8000)               # the pair is directed

    lab.call("remove_rules")
    assert lab.reaches(b, "10.89.1.2", 8000)


@live
def test_a_host_port_reaches_the_address_on_the_bridge(lab: Lab) -> None:
    lab.call("ensure_bridge", "mcpbr1", "10.89.1.1/24")
    a = lab.guest("mcpbr1", "10.89.1.2", "10.89.1.1")
    lab.listen(a, "10.89.1.2", 8000)
    lab.call("apply_rules", ruleset_text({"mcpbr1": "10.89.1.1"}, [],
                                         [Forward(18080, "10.89.1.2", 8000)]))
    assert not lab.reaches(lab.node, "127.0.0.1", 18080)       # martian without localnet
    lab.call("set_route_localnet", "mcpbr1", True)
    assert lab.reaches(lab.node, "127.0.0.1", 18080)


def _pid_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@live
def test_each_service_has_its_own_names(lab: Lab, tmp_path: Path) -> None:
    lab.call("ensure_bridge", "mcpbr1", "10.89.1.1/24")
    a = lab.guest("mcpbr1", "10.89.1.2", "10.89.1.1")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.89.250.53\n")   # no such server: never asked here
    where = {"run_dir": str(run_dir(tmp_path)), "resolv_conf": str(resolv)}

    def ask(name: str) -> Any:
        return json.loads(lab.sh(a, sys.executable, "-c", QUERY, "10.89.1.1", name))

    lab.call("Resolver.ensure", "web", "10.89.1.1", {"10.89.1.5": ["web", "web.svc.internal"]},
             **where)
    # The process that started it has exited: the dnsmasq lives on as a daemon.
    pid = lab.call("Resolver.running", **where)["web"]
    assert _pid_state(pid) not in (None, "Z")
    assert ask("web") == ["10.89.1.5"] and ask("web.svc.internal") == ["10.89.1.5"]
    assert ask("db") == "NXDOMAIN"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--server=10.89.250.53" in argv

    # Same hosts: adopted as it is. New address: the same process answers it (SIGHUP).
    lab.call("Resolver.ensure", "web", "10.89.1.1", {"10.89.1.5": ["web", "web.svc.internal"]},
             **where)
    lab.call("Resolver.ensure", "web", "10.89.1.1", {"10.89.1.6": ["web", "web.svc.internal"]},
             **where)
    until(lambda: ask("web.svc.internal") == ["10.89.1.6"], 10, "the new address never came")
    assert lab.call("Resolver.running", **where) == {"web": pid}

    # An agent that died after writing the hosts file but before its SIGHUP.
    hosts = run_dir(tmp_path) / "web.hosts"
    hosts.write_text("10.89.1.7 web web.svc.internal\n")
    lab.call("Resolver.ensure", "web", "10.89.1.1", {"10.89.1.7": ["web", "web.svc.internal"]},
             **where)
    until(lambda: ask("web") == ["10.89.1.7"], 10, "the rewritten hosts were never read")
    assert lab.call("Resolver.running", **where) == {"web": pid}

    lab.call("Resolver.stop", "web", **where)
    assert _pid_state(pid) in (None, "Z")
    assert lab.call("Resolver.running", **where) == {}
    assert list(run_dir(tmp_path).iterdir()) == []
    lab.call("Resolver.stop", "web", **where)                  # again: nothing to do


@live
def test_a_dnsmasq_that_cannot_listen_is_an_error(lab: Lab, tmp_path: Path) -> None:
    lab.call("ensure_bridge", "mcpbr1", "10.89.1.1/24")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("")
    where = {"run_dir": str(run_dir(tmp_path)), "resolv_conf": str(resolv)}
    with pytest.raises(AssertionError, match=r"NetworkSetupError: /usr/sbin/dnsmasq .*"
                                             r"--listen-address=10.89.9.1 .* failed: .*10.89.9.1"):
        lab.call("Resolver.ensure", "web", "10.89.9.1", {"10.89.1.5": ["web"]}, **where)
    assert lab.call("Resolver.running", **where) == {}
    assert not [p for p in lab.sh(lab.node, "ip", "netns", "pids", lab.node).split()
                if "dnsmasq" in _cmdline(int(p))]


def run_dir(tmp_path: Path) -> Path:
    """The agent's kind of resolver dir (netplan.resolver_dir): dnsmasq reads it as
    nobody, which pytest's 0700 tmp dirs would refuse. Removed after the test."""
    from mcp_node.netplan import resolver_dir

    d = resolver_dir(tmp_path)
    _made.append(d)
    return d


_made: list[Path] = []


@pytest.fixture(autouse=True)
def _remove_run_dirs() -> Iterator[None]:
    yield
    import shutil

    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
