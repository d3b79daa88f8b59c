"""Bridge mode's lifecycle (issue 23): when a service's network is made, repaired and
removed. ``netplan`` says what it is, ``registry_net`` keeps the numbers, ``hostnet``
and ``nftrules`` touch the host, each runtime makes its own part (podman's network).

Deploy: numbers allocated, then the podman network (before the bridge has its
address: podman refuses a subnet an interface holds), the bridge, one TAP per VM
component, the service's resolver, and the node's rule table rewritten whole. Every
step is idempotent, so a deploy cut short is finished by the next round's repair.
Undeploy: the reverse, and the numbers go last. A round: for every service with
numbers, what is missing is made again (a podman network removed by hand too: one
listing of them per round); links, resolvers and numbers of services the
registry no longer has (a crash between the two) are removed. Nothing is torn down
when the agent starts: a VM's TAP and a container's address outlive an agent restart.
A start-first replace's new workload gets a number of its own (``begin_side``); its
switch gives the component that number, its names and its host ports' rules
(``promote_side``); the old one's number goes when it does (``end_side``)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hostnet
from .config import NetworkConfig
from .errors import MCPError, NetworkSetupError
from .netplan import (
    BRIDGE_PREFIX,
    TAP_PREFIX,
    NetAttach,
    ServiceNet,
    network_name,
    resolver_dir,
    subnet_count,
)
from .nftrules import Forward, ruleset_text

if TYPE_CHECKING:
    from .records import ServiceRecord
    from .registry import Registry
    from .runtime import Runtime

log = logging.getLogger("mcp_node.network")

TOOLS = ("ip", "nft", "dnsmasq")


def bridge_problem(mode: str) -> str:
    """Why bridge mode cannot be set up on this host ("" when it can)."""
    if mode != "bridge":
        return ""
    if os.geteuid() != 0:
        return "bridge mode needs root (bridges, TAPs, nftables)"
    missing = [t for t in TOOLS if shutil.which(t) is None and
               not Path("/usr/sbin", t).exists()]
    if missing:
        return f"bridge mode needs {', '.join(missing)} (Debian: iproute2, nftables, " \
               "dnsmasq-base)"
    if not Path("/dev/net/tun").exists():
        return "bridge mode needs /dev/net/tun"
    return ""


def drop_address(net: ServiceNet) -> None:
    """The gateway address off the bridge, if both are there (``_ensure`` adds it back)."""
    if net.bridge in hostnet.links("mcp"):
        with contextlib.suppress(NetworkSetupError):
            hostnet.run(["ip", "addr", "del", net.gateway_cidr, "dev", net.bridge])


class ServiceNetworks:
    def __init__(self, cfg: NetworkConfig, registry: Registry, state_dir: Path,
                 runtime: Callable[[str], Runtime], joins: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.registry = registry
        self.runtime = runtime            # by runtime name
        self.joins = joins                # runtime name -> "tap" | "network" (its Traits)
        self.problem = bridge_problem(cfg.mode)
        self.resolver = hostnet.Resolver(resolver_dir(state_dir))
        self._lock = threading.RLock()
        self._nets: dict[str, ServiceNet] | None = None
        self._rules = ""                  # the text last applied ("none": removed)
        self._fwd: dict[str, list[Forward]] = {}   # service -> its host ports' DNAT
        # service -> the side workloads (``web.next``, ``web.old``) of the start-first
        # replaces running now, each with a number of its own. In memory: after a crash
        # their numbers go back in the next round (reconcile removes the workloads).
        self._sides: dict[str, set[str]] = {}
        self.last_error = ""

    @property
    def active(self) -> bool:
        return self.cfg.mode == "bridge" and not self.problem

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "bridge" if self.active else "user",
                               "configured": self.cfg.mode}
        if self.problem:
            out["reason"] = self.problem
        if self.active:
            out.update(cidr=self.cfg.cidr, services=len(self._all()))
            if self.last_error:
                out["reason"] = self.last_error
        return out

    def reasons(self) -> list[str]:
        """What degrades health: bridge mode asked for and not in use, or a repair failing."""
        if self.problem:
            return [f"network: {self.problem}; services use user-mode networking"]
        return [f"network: {self.last_error}"] if self.active and self.last_error else []

    # -- numbers ------------------------------------------------------------------------

    def _all(self) -> dict[str, ServiceNet]:
        with self._lock:
            if self._nets is None:
                self._nets = {s: ServiceNet(s, idx, self.cfg.cidr, hosts)
                              for s, (idx, hosts) in self.registry.networks().items()}
            return self._nets

    def has_network(self, service: str) -> bool:
        """Bridge mode, and the service's numbers allocated (by an earlier deploy)."""
        return self.active and service in self._all()

    def attach(self, service: str, component: str, runtime: str) -> NetAttach | None:
        """A workload's attach, from numbers a deploy allocated (None in user mode, or
        for a service deployed before bridge mode was turned on: it keeps user-mode
        networking until it is deployed again)."""
        if not self.active:
            return None
        net = self._all().get(service)
        if net is None or component not in net.hosts:
            return None
        return net.attach(component, self.joins[runtime] == "tap")

    # -- deploy and undeploy ------------------------------------------------------------

    def prepare(self, rec: ServiceRecord) -> None:
        """Numbers for every component, then the host side, before any workload of the
        record (its host ports allocated) runs."""
        if not self.active:
            return
        with self._lock:
            records = self.registry.list_services()   # with rec: it was written first
            reach = self._reach(records)
            self._ensure(self._allocate(rec), {c.defn.name: c.defn.runtime
                                               for c in rec.components}, reach)
            for src in rec.network.allow_from:   # their resolvers learn its names now
                if src in self._all():
                    self._ensure_resolver(self._all()[src], reach)
            self._apply_rules(records)

    def _allocate(self, rec: ServiceRecord) -> ServiceNet:
        """The record's numbers (allocated where missing); components it no longer has
        give theirs back, and their TAPs go."""
        names = [c.defn.name for c in rec.components] + sorted(self._sides.get(rec.name, ()))
        old = self._all().get(rec.name)
        if old is not None and set(old.hosts) == set(names):
            net = old
        else:
            idx, hosts = self.registry.allocate_network(rec.name, names,
                                                        subnet_count(self.cfg.cidr))
            if old is not None:
                for c in sorted(set(old.hosts) - set(names)):
                    hostnet.delete_link(old.tap(c))
            self.registry.release_hosts(rec.name, names)
            net = ServiceNet(rec.name, idx, self.cfg.cidr,
                             {c: n for c, n in hosts.items() if c in names})
            self._all()[rec.name] = net
        self._fwd[rec.name] = self._forwards_of(net, rec)
        return net

    def _forwards_of(self, net: ServiceNet, rec: ServiceRecord) -> list[Forward]:
        """A component's host ports: 127.0.0.1:p DNATed to its address, port p (as
        user-mode's hostfwd and podman's publishing did), so checks, the node proxy and
        operators reach it as before, and a start-first switch moves them in one rule
        set with its names."""
        return [Forward(p, net.address(c.defn.name), p) for c in rec.components
                if c.defn.name in net.hosts for p in sorted(c.host_ports.values()) if p]

    def release(self, service: str) -> None:
        """Everything of the service's network, its workloads already gone. Never raises:
        the undeploy has happened; what is left the next round's repair removes."""
        if not self.active:
            return
        try:
            self._release(service)
        except (MCPError, OSError, ValueError) as exc:
            self.last_error = f"removing the network of {service}: {exc}"
            log.warning("network: %s", self.last_error)

    def _release(self, service: str) -> None:
        with self._lock:
            net = self._all().pop(service, None)
            if net is None:
                return
            self._fwd.pop(service, None)
            self._sides.pop(service, None)
            self.resolver.stop(service)
            for c in net.hosts:
                hostnet.delete_link(net.tap(c))
            for name in self._runtime_names():
                self.runtime(name).remove_network(service)
            hostnet.delete_link(net.bridge)
            self._apply_rules(self.registry.list_services())
            self.registry.release_network(service)
            log.info("network: removed service=%s bridge=%s", service, net.bridge)

    # -- a start-first replace's second address -----------------------------------------

    def begin_side(self, service: str, key: str, vm: bool) -> NetAttach | None:
        """The attach of a side workload ``key`` (a start-first replace's ``next``): a
        number of its own (and a VM's TAP), as two workloads cannot share an address.
        None in user mode."""
        with self._lock:
            net = self._all().get(service) if self.active else None
            if net is None:
                return None
            self._sides.setdefault(service, set()).add(key)
            _, hosts = self.registry.allocate_network(service, [key],
                                                      subnet_count(self.cfg.cidr))
            net = self._all()[service] = ServiceNet(service, net.index, net.cidr,
                                                    {**net.hosts, key: hosts[key]})
            hostnet.forget_neighbor(net.address(key), net.bridge)
            if vm:   # its TAP, and its lease before it boots
                hostnet.ensure_tap(net.tap(key), net.bridge)
                self._ensure_resolver(net, self._reach(self.registry.list_services()))
            return net.attach(key, vm)

    def promote_side(self, service: str, component: str, nxt: str, old: str) -> None:
        """The switch: the component's number is its ``nxt`` workload's, and its host
        ports' rules and its names (its own resolver's, and the qualified ones of the
        services it lets in) say so; ``old`` keeps the previous number while it drains
        (its open connections go on by conntrack)."""
        with self._lock:
            net = self._all().get(service)
            if net is None or nxt not in net.hosts:
                return
            self.registry.promote_host(service, component, nxt, old)
            hosts = {k: n for k, n in net.hosts.items() if k != nxt}
            hosts.update({component: net.hosts[nxt], old: net.hosts[component]})
            net = self._all()[service] = ServiceNet(service, net.index, net.cidr, hosts)
            sides = self._sides.setdefault(service, set())
            sides.discard(nxt)
            sides.add(old)
            records = self.registry.list_services()
            rec = next((r for r in records if r.name == service), None)
            if rec is not None:
                self._fwd[service] = self._forwards_of(net, rec)
            self._apply_rules(records)
            reach = self._reach(records)
            for name, into in sorted(reach.items()):
                if service in into and name in self._all():
                    self._ensure_resolver(self._all()[name], reach)
            self._ensure_resolver(net, reach)

    def end_side(self, service: str, key: str) -> None:
        """A side workload is gone (removed, or never made): its number goes back."""
        with self._lock:
            sides = self._sides.get(service, set())
            if key not in sides:
                return
            sides.discard(key)
            if not sides:
                self._sides.pop(service, None)
            self.registry.drop_host(service, key)
            net = self._all().get(service)
            if net is not None and key in net.hosts:
                hostnet.delete_link(net.tap(key))   # a VM's (gone already if it had none)
                self._all()[service] = ServiceNet(
                    service, net.index, net.cidr,
                    {k: n for k, n in net.hosts.items() if k != key})

    def _runtime_names(self) -> list[str]:
        return [name for name, kind in self.joins.items() if kind == "network"]

    def _ensure(self, net: ServiceNet, runtimes: dict[str, str],
                reach: Mapping[str, set[str]]) -> None:
        """The service's host side, made where missing (idempotent)."""
        for name in sorted({r for r in runtimes.values() if self.joins[r] == "network"}):
            self.runtime(name).ensure_network(net, lambda: drop_address(net))
        hostnet.ensure_bridge(net.bridge, net.gateway_cidr)
        hostnet.set_route_localnet(net.bridge, True)
        hostnet.set_forwarding(net.bridge, True)
        for c, r in sorted(runtimes.items()):
            if self.joins[r] == "tap" and c in net.hosts:
                hostnet.ensure_tap(net.tap(c), net.bridge)
        self._ensure_resolver(net, reach)

    def pairs(self, records: Sequence[ServiceRecord]) -> list[tuple[str, str]]:
        """(source, destination) services, both with a network here, where the
        destination's ``network.allow_from`` names the source."""
        nets = self._all()
        return [(src, rec.name) for rec in records if rec.name in nets
                for src in rec.network.allow_from if src in nets]

    def _reach(self, records: Sequence[ServiceRecord]) -> dict[str, set[str]]:
        """Source service -> the services that let it in (``pairs``, once per round)."""
        out: dict[str, set[str]] = {}
        for src, dst in self.pairs(records):
            out.setdefault(src, set()).add(dst)
        return out

    def _ensure_resolver(self, net: ServiceNet, reach: Mapping[str, set[str]]) -> None:
        """The service's names, and those of the services that let it in, qualified
        (``<component>.<service>.internal``: a bare name is always its own service's)."""
        nets, names = self._all(), net.names()
        for dst in sorted(reach.get(net.service, ())):
            names.update({a: ns[1:] for a, ns in nets[dst].names().items()})
        self.resolver.ensure(net.service, net.gateway, names,
                             hostnet.Dhcp(net.bridge, net.subnet, net.leases()))

    def _apply_rules(self, records: Sequence[ServiceRecord]) -> None:
        """The node's table rewritten whole when what it should hold changed (or it went)."""
        nets = self._all()
        forwards = sorted({f for fs in self._fwd.values() for f in fs},
                          key=lambda f: f.host_port)
        if not nets and not forwards:
            if self._rules != "none":
                hostnet.remove_rules()
                self._rules = "none"
            return
        text = ruleset_text({n.bridge: n.gateway for n in nets.values()},
                            [(nets[s].bridge, nets[d].bridge) for s, d in self.pairs(records)],
                            forwards)
        if text != self._rules or hostnet.current_rules() is None:
            hostnet.apply_rules(text)
            self._rules = text

    # -- each round ---------------------------------------------------------------------

    def repair(self, records: Sequence[ServiceRecord]) -> None:
        """Make again what is missing; remove what no service owns. Never raises."""
        if not self.active:
            return
        try:
            with self._lock:
                self._repair(records)
            self.last_error = ""
        except (MCPError, OSError, ValueError) as exc:
            self.last_error = f"repair failed: {exc}"
            log.warning("network: %s", self.last_error)

    def _repair(self, records: Sequence[ServiceRecord]) -> None:
        self._nets = None   # numbers as the registry has them now
        by_name = {r.name: r for r in records}
        for service in sorted(set(self._all()) - set(by_name)):
            log.info("network: service=%s is gone; removing its network", service)
            self._release(service)
        present = hostnet.links("mcp")
        networks = {r: self._network_names(r) for r in sorted(
            {c.defn.runtime for rec in records for c in rec.components
             if self.joins[c.defn.runtime] == "network"})}   # one listing per runtime
        # Numbers first (a deploy cut short, or a service from before bridge mode), so
        # who may reach whom is known of every service before any resolver is written.
        allocated = [(rec, self._allocate(rec)) for rec in records]
        reach = self._reach(records)
        for rec, net in allocated:
            runtimes = {c.defn.name: c.defn.runtime for c in rec.components}
            links = [net.bridge] + [net.tap(c) for c, r in runtimes.items()
                                    if self.joins[r] == "tap"]
            gone = [r for r, names in networks.items() if r in runtimes.values()
                    and names is not None and network_name(rec.name) not in names]
            if gone or any(n not in present for n in links):
                log.info("network: service=%s: making what is missing (links%s)", rec.name,
                         "".join(f", the {r} network" for r in gone))
                self._ensure(net, runtimes, reach)
            else:
                self._ensure_resolver(net, reach)
        self._apply_rules(records)
        self._sweep(self._all().values(), present)

    def _network_names(self, runtime: str) -> set[str] | None:
        """``runtime``'s service networks; None when it cannot list them (podman down):
        nothing is remade then, and the links and rules are still repaired."""
        try:
            return self.runtime(runtime).network_names()
        except MCPError as exc:
            log.warning("network: cannot list the %s networks: %s", runtime, exc)
            return None

    def _sweep(self, nets: Iterable[ServiceNet], present: Iterable[str]) -> None:
        """Our links (of ``present``, the round's one listing: what it made since is
        wanted) and resolvers that no allocated network accounts for."""
        wanted = set()
        for net in nets:
            wanted.add(net.bridge)
            wanted.update(net.tap(c) for c in net.hosts)
        for name in sorted(present):
            if name.startswith((BRIDGE_PREFIX, TAP_PREFIX)) and name not in wanted:
                log.info("network: removing leftover link %s", name)
                hostnet.delete_link(name)
        served = {n.service for n in nets}
        for service in sorted(set(self.resolver.running()) - served):
            log.info("network: stopping leftover resolver of service=%s", service)
            self.resolver.stop(service)
