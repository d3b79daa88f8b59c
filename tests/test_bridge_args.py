"""Bridge mode's pure parts (issue 23): subnets and names, the numbers the registry
allocates, the config checks, and what each runtime is given (podman's create body,
qemu's netdev, the Nanos manifest, the initramfs kernel command line)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from test_qemu_args import NANOS, params
from test_vmimage import req

from mcp_node import netplan
from mcp_node.config import from_dict, parse
from mcp_node.errors import ResourceError
from mcp_node.nanos import nanos_manifest
from mcp_node.netplan import NetAttach, ServiceNet
from mcp_node.podmanargs import create_kwargs, create_payload
from mcp_node.qemuargs import qemu_argv
from mcp_node.registry import Registry
from mcp_node.runtime import WorkloadSpec
from mcp_node.servicedef import from_dict as from_sd

NET = ServiceNet("shop", 3, "10.89.0.0/16", {"web": 2, "db": 7})


def test_subnets_names_and_addresses() -> None:
    assert str(netplan.subnet("10.89.0.0/16", 0)) == "10.89.0.0/24"
    assert str(netplan.subnet("10.89.0.0/16", 255)) == "10.89.255.0/24"
    assert str(netplan.subnet("172.16.0.0/12", 300)) == "172.17.44.0/24"
    with pytest.raises(ValueError, match="outside"):
        netplan.subnet("10.89.0.0/16", 256)
    assert netplan.subnet_count("10.89.0.0/16") == 256
    assert (NET.bridge, NET.gateway, NET.subnet) == ("mcpbr3", "10.89.3.1", "10.89.3.0/24")
    assert (NET.address("db"), NET.tap("db")) == ("10.89.3.7", "mcpt3x7")
    assert NET.names() == {"10.89.3.7": ["db", "db.shop.internal"],
                           "10.89.3.2": ["web", "web.shop.internal"]}
    vm = NET.attach("db", vm=True)
    assert vm == NetAttach("mcp-shop", "mcpbr3", "10.89.3.7", "10.89.3.1", 24, "mcpt3x7",
                           "shop.internal")
    assert NET.attach("web", vm=False).tap == ""
    assert (vm.netmask, vm.cidr) == ("255.255.255.0", "10.89.3.7/24")
    assert len(netplan.tap_name(65535, 254)) <= 15
    assert netplan.hosts_text(NET.names()) == ("10.89.3.2 web web.shop.internal\n"
                                               "10.89.3.7 db db.shop.internal\n")
    assert netplan.resolv_conf(vm).startswith("nameserver 10.89.3.1\nsearch shop.internal\n")


@pytest.mark.parametrize("cidr,problem", [
    ("10.89.0.0/16", ""),
    ("192.168.0.0/23", ""),
    ("10.89.0.0/24", "must be /8 to /23"),
    ("10.89.0.1/16", "is not an IPv4 network"),
    ("8.8.0.0/16", "not a private range"),
    ("fd00::/64", "is not an IPv4 network"),
    ("bridge", "is not an IPv4 network"),
])
def test_cidr_checked(cidr: str, problem: str) -> None:
    got = netplan.cidr_problem(cidr)
    assert (problem in got) if problem else got == ""


def test_config_network_section() -> None:
    cfg = from_dict({"network": {"mode": "bridge", "cidr": "10.200.0.0/16"}})
    assert (cfg.network.mode, cfg.network.cidr) == ("bridge", "10.200.0.0/16")
    assert from_dict({}).network.mode == "user"
    _, errors = parse({"network": {"mode": "tap", "cidr": "10.0.0.0/30", "bridge": 1}})
    assert sorted(str(e) for e in errors) == [
        "network.bridge: unknown key (known: mode, cidr)",
        "network.cidr: 10.0.0.0/30 must be /8 to /23: each service takes a /24 of it",
        "network.mode: 'tap' is not user or bridge",
    ]


def test_registry_allocates_lowest_free_and_keeps_numbers(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    try:
        assert reg.allocate_network("a", ["web", "db"], 4) == (0, {"web": 2, "db": 3})
        assert reg.allocate_network("b", ["x"], 4) == (1, {"x": 2})
        # Again, with one more component: the old numbers stay, the new gets the next.
        assert reg.allocate_network("a", ["db", "web", "cache"], 4) == (
            0, {"web": 2, "db": 3, "cache": 4})
        reg.release_hosts("a", ["cache"])
        assert reg.networks()["a"] == (0, {"cache": 4})
        assert reg.allocate_network("a", ["cache", "web"], 4)[1] == {"cache": 4, "web": 2}
        reg.release_network("a")
        assert set(reg.networks()) == {"b"}
        assert reg.allocate_network("c", ["x"], 4)[0] == 0   # a's index is free again
        reg.allocate_network("d", ["x"], 4)
        reg.allocate_network("e", ["x"], 4)
        with pytest.raises(ResourceError, match="all 4 /24s"):
            reg.allocate_network("f", ["x"], 4)
        assert "f" not in reg.networks()   # the refusal wrote nothing
    finally:
        reg.close()


def test_a_start_first_switch_swaps_numbers_in_one_step(tmp_path: Path) -> None:
    """The side workload's number becomes the component's, the old one keeps the
    component's until it goes; a crash's leftover side rows go with ``release_hosts``."""
    reg = Registry(tmp_path / "r.db")
    try:
        reg.allocate_network("a", ["web", "db"], 4)
        assert reg.allocate_network("a", ["web.next"], 4)[1] == {
            "web": 2, "db": 3, "web.next": 4}
        reg.promote_host("a", "web", "web.next", "web.old")
        assert reg.networks()["a"] == (0, {"web": 4, "db": 3, "web.old": 2})
        reg.drop_host("a", "web.old")
        assert reg.networks()["a"] == (0, {"web": 4, "db": 3})
        with pytest.raises(ResourceError, match="no address of 'db.next'"):
            reg.promote_host("a", "db", "db.next", "db.old")
        assert reg.networks()["a"] == (0, {"web": 4, "db": 3})   # refused: unchanged
        reg.allocate_network("a", ["db.next"], 4)
        reg.release_hosts("a", ["web", "db"])   # the round after a crash
        assert reg.networks()["a"] == (0, {"web": 4, "db": 3})
    finally:
        reg.close()


def test_side_workloads_have_an_address_and_no_name() -> None:
    net = ServiceNet("shop", 3, "10.89.0.0/16", {"web": 2, "web.next": 5})
    assert net.attach("web.next", vm=True).address == "10.89.3.5"
    assert net.tap("web.next") == "mcpt3x5"
    assert net.names() == {"10.89.3.2": ["web", "web.shop.internal"]}
    # Both on the bridge at once: a MAC each, from the address.
    assert (net.attach("web", vm=True).mac, net.attach("web.next", vm=True).mac) == (
        "52:54:0a:59:03:02", "52:54:0a:59:03:05")


@pytest.mark.parametrize(("bridged", "serve_routes", "beside"), [
    (False, False, set()),                   # user mode, no proxy: stop-first
    (False, True, {"web"}),                  # user mode: what the proxy switches
    (True, False, {"web", "worker", "vm"}),  # bridged: every changed one, proxy or not
    (True, True, {"web", "worker", "vm"}),
])
def test_which_components_a_start_first_deploy_replaces_beside(
        bridged: bool, serve_routes: bool, beside: set[str]) -> None:
    from mcp_node.converge import beside_components
    from mcp_node.records import ComponentRecord, ServiceRecord

    def comps(tag: str) -> list[dict[str, object]]:
        return [{"name": "web", "image": f"w:{tag}", "routes": [{"port": 80}]},
                {"name": "worker", "image": f"k:{tag}"},
                {"name": "vm", "image": f"v:{tag}", "runtime": "unikernel", "memory_mb": 64},
                {"name": "same", "image": "s:1"}]
    old = from_sd({"name": "shop", "components": comps("1")})
    new = from_sd({"name": "shop", "update": {"order": "start-first"},
                   "components": comps("2")})
    prev = ServiceRecord("shop", True, [ComponentRecord(defn=c) for c in old.components])
    changed = ("web", "worker", "vm")
    assert beside_components(new, prev, changed, bridged, serve_routes) == beside
    assert beside_components(replace(new, update=old.update), prev, changed, bridged,
                             serve_routes) == set()   # stop-first
    assert beside_components(new, None, changed, bridged, serve_routes) == set()
    pinned = from_sd({"name": "shop", "update": {"order": "start-first"}, "components": [
        {**c, "image_sha256": "0" * 64} if c["name"] == "vm" else c for c in comps("2")]})
    assert beside_components(pinned, prev, changed, bridged, serve_routes) == beside


def test_two_allocations_racing_get_different_indexes(tmp_path: Path) -> None:
    regs = [Registry(tmp_path / "r.db") for _ in range(2)]
    got: list[int] = []
    threads = [threading.Thread(target=lambda r=r, i=i: got.extend(
        r.allocate_network(f"s{i}-{k}", ["c"], 256)[0] for k in range(20)))
        for i, r in enumerate(regs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in regs:
        r.close()
    assert sorted(got) == list(range(40))


def test_podman_create_joins_the_service_network() -> None:
    spec = WorkloadSpec(service="shop", component="web", image="img", ports=(18080,),
                        net=NET.attach("web", vm=False))
    body = create_payload(create_kwargs(spec, "owner"))
    assert body["netns"] == {"nsmode": "bridge"}
    assert body["networks"] == {"mcp-shop": {"static_ips": ["10.89.3.2"]}}
    assert body["dns_server"] == ["10.89.3.1"] and body["dns_search"] == ["shop.internal"]
    # Its host port is the agent's DNAT rule to its address, which a start-first switch
    # moves; a podman mapping would hold the port on the old container.
    assert body["portmappings"] == []
    plain = create_payload(create_kwargs(replace(spec, net=None), "owner"))
    assert plain["portmappings"] == [{"container_port": 18080, "protocol": "tcp",
                                      "host_ip": "127.0.0.1", "host_port": 18080}]


def test_podman_create_without_a_network_names_none() -> None:
    """podman-py renders no network as [None]: podman 4.3 took it for a network named ""
    and refused every create once the host had two networks."""
    body = create_payload(create_kwargs(WorkloadSpec(service="s", component="c", image="i"),
                                        "owner"))
    assert "cni_networks" not in body and not body.get("networks")


def test_spec_digest_covers_the_attach_only_when_set() -> None:
    plain = WorkloadSpec(service="shop", component="web", image="img")
    assert plain.digest == replace(plain, net=None).digest
    bridged = replace(plain, net=NET.attach("web", vm=False))
    assert bridged.digest != plain.digest
    moved = replace(plain, net=replace(NET.attach("web", vm=False), address="10.89.3.9"))
    assert moved.digest != bridged.digest


def test_qemu_opens_the_tap_instead_of_user_mode() -> None:
    argv = qemu_argv(params(NANOS, tap="mcpt3x7"))
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == "tap,id=n0,ifname=mcpt3x7,script=no,downscript=no"
    assert "hostfwd" not in " ".join(argv)
    user = qemu_argv(params(NANOS))
    assert user[user.index("-netdev") + 1].startswith("user,id=n0,hostfwd=tcp:127.0.0.1:")
    for bad in ("eth0", "mcpt3x7,script=/bin/sh", "mcpt3x7 ", "mcpbr3"):
        with pytest.raises(ValueError, match="TAP name"):
            qemu_argv(params(NANOS, tap=bad))


def test_nanos_manifest_gives_the_guest_its_resolver_not_its_address(tmp_path: Path) -> None:
    """The address comes by DHCP (its lease by MAC): the manifest, so the image, is the
    same at either address of a start-first pair."""
    resolv = tmp_path / "resolv.conf"
    m = nanos_manifest(req(tmp_path, net=NET.attach("db", vm=True)), resolv)
    assert f"resolv.conf:(contents:(host:{resolv}))" in m
    assert "ipaddr" not in m and "10.89.3.7" not in m
    assert m == nanos_manifest(req(tmp_path, net=NET.attach("web", vm=True)), resolv)
    plain = nanos_manifest(req(tmp_path))
    assert "ipaddr" not in plain and "resolv.conf" not in plain


def test_a_service_s_leases_name_every_number_by_its_mac() -> None:
    assert NET.leases() == {"52:54:0a:59:03:02": "10.89.3.2", "52:54:0a:59:03:07": "10.89.3.7"}
    assert NET.leases() == {NET.attach(c, vm=True).mac: NET.address(c) for c in ("web", "db")}


def test_initramfs_guest_address_on_the_kernel_command_line() -> None:
    att = NET.attach("db", vm=True)
    assert netplan.kernel_args(att) == "mcp.ip=10.89.3.7/24 mcp.gw=10.89.3.1"


def test_bridge_mode_that_cannot_be_set_up_warns_and_degrades(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: check-config warns; the agent starts on user-mode networking and its
    health is degraded, naming why (issue 22 row 3's rule, for issue 23's key)."""
    from click.testing import CliRunner
    from fake_runtime import FakeWorld

    from mcp_node.agent import Agent
    from mcp_node.agent_cli import main

    monkeypatch.setattr("mcp_node.servicenet.os.geteuid", lambda: 1000)
    conf = tmp_path / "agent.toml"
    conf.write_text('[network]\nmode = "bridge"\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 0
    assert res.output == (
        f"{conf}: warning: network.mode: bridge mode needs root (bridges, TAPs, nftables); "
        "services would get user-mode networking and health would say degraded\n"
        f"{conf}: ok (1 warning(s))\n")
    a = Agent(from_dict({"state": {"dir": str(tmp_path / "s")},
                         "network": {"mode": "bridge"}}), runtimes=FakeWorld().runtimes())
    try:
        h = a.health()
        assert h["status"] == "degraded"
        assert h["network"] == {"mode": "user", "configured": "bridge",
                                "reason": "bridge mode needs root (bridges, TAPs, nftables)"}
        assert "network: bridge mode needs root (bridges, TAPs, nftables); services use " \
               "user-mode networking" in h["reasons"]
        a.deploy(from_sd({"name": "shop", "components": [
            {"name": "web", "image": "img:v1", "routes": [{"port": 8080}]}]}))
        assert a.registry.networks() == {}   # nothing allocated on user-mode
    finally:
        a.close()
