"""Service networks in bridge mode (issue 23), as pure functions: the /24 each service
is given from ``[network] cidr``, the names of its bridge, TAPs and podman network, the
address a workload gets, and the name-service files its guests read. Nothing here runs a
command; ``hostnet`` does, ``servicenet`` decides when.

A service's network index N (persisted by the registry, ``registry_net``) picks the
N-th /24 of the range; its gateway (host side, and the service's name server) is .1;
workloads get .2-.254 by a host number the registry also keeps, so an address follows
a component across replaces, restarts and agent restarts."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .slots import split_key

SUBNET_PREFIX = 24
FIRST_HOST = 2
LAST_HOST = 254
BRIDGE_PREFIX = "mcpbr"
TAP_PREFIX = "mcpt"
NETWORK_PREFIX = "mcp-"
DOMAIN = "internal"


RESOLVER_ROOT = Path("/run/mcp-net")


def resolver_dir(state_dir: Path) -> Path:
    """Where an agent's resolvers keep their hosts, pid and log files: outside its 0700
    state dir (dnsmasq reads them as nobody), one directory per state dir so two agents
    on one host never share one; on a tmpfs, which is right: a reboot ends the resolvers
    too, and the first round writes the files again."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return RESOLVER_ROOT / digest


def cidr_problem(cidr: str) -> str:
    """Why ``cidr`` cannot be carved into service subnets ("" when it can)."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        return f"{cidr[:60]!r} is not an IPv4 network ({exc})"
    if not isinstance(net, ipaddress.IPv4Network):
        return f"{cidr[:60]!r} is not an IPv4 network"
    if not 8 <= net.prefixlen <= SUBNET_PREFIX - 1:
        return f"{cidr} must be /8 to /23: each service takes a /24 of it"
    if not net.is_private:
        return f"{cidr} is not a private range: service networks must not shadow others"
    return ""


def subnet_count(cidr: str) -> int:
    return int(2 ** (SUBNET_PREFIX - ipaddress.ip_network(cidr).prefixlen))


def subnet(cidr: str, index: int) -> ipaddress.IPv4Network:
    """The ``index``-th /24 of ``cidr``."""
    net = ipaddress.IPv4Network(cidr)
    if not 0 <= index < subnet_count(cidr):
        raise ValueError(f"network index {index} outside {cidr}")
    return ipaddress.IPv4Network(
        (int(net.network_address) + (index << (32 - SUBNET_PREFIX)), SUBNET_PREFIX))


def host_address(cidr: str, index: int, host: int) -> str:
    if not FIRST_HOST - 1 <= host <= LAST_HOST:
        raise ValueError(f"host number {host} outside {FIRST_HOST - 1}-{LAST_HOST}")
    return str(subnet(cidr, index).network_address + host)


def bridge_name(index: int) -> str:
    return f"{BRIDGE_PREFIX}{index}"


def tap_name(index: int, host: int) -> str:
    """``mcpt<N>x<H>``: at most 4 + 5 + 1 + 3 = 13 characters (IFNAMSIZ is 16)."""
    return f"{TAP_PREFIX}{index}x{host}"


def network_name(service: str) -> str:
    return f"{NETWORK_PREFIX}{service}"


@dataclass(frozen=True)
class NetAttach:
    """How one workload joins its service's network; part of its spec (and digest)."""

    network: str        # the podman network (containers)
    bridge: str
    address: str
    gateway: str        # also the service's name server
    prefix: int = SUBNET_PREFIX
    tap: str = ""       # VMs: the TAP device qemu opens
    search: str = ""    # <service>.internal

    @property
    def mac(self) -> str:
        """A VM's NIC on the bridge, from its address (locally administered, 52:54:...):
        a start-first pair shares the bridge, so the MAC must follow the address, not
        the component."""
        return mac_of(self.address)

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    @property
    def cidr(self) -> str:
        """The address with its prefix, as ``ip addr`` and a kernel command line take it."""
        return f"{self.address}/{self.prefix}"


@dataclass(frozen=True)
class ServiceNet:
    """One service's network as allocated: enough to build every attach and file."""

    service: str
    index: int
    cidr: str
    # component -> host number; also a start-first replace's side workloads, by their
    # slot key (``web.next``, ``web.old``: ``slots.side_key``)
    hosts: Mapping[str, int]

    @property
    def bridge(self) -> str:
        return bridge_name(self.index)

    @property
    def gateway(self) -> str:
        return host_address(self.cidr, self.index, 1)

    @property
    def gateway_cidr(self) -> str:
        return f"{self.gateway}/{SUBNET_PREFIX}"

    @property
    def subnet(self) -> str:
        return str(subnet(self.cidr, self.index))

    def address(self, component: str) -> str:
        return host_address(self.cidr, self.index, self.hosts[component])

    def tap(self, component: str) -> str:
        return tap_name(self.index, self.hosts[component])

    def attach(self, component: str, vm: bool) -> NetAttach:
        return NetAttach(network=network_name(self.service), bridge=self.bridge,
                         address=self.address(component), gateway=self.gateway,
                         tap=self.tap(component) if vm else "",
                         search=f"{self.service}.{DOMAIN}")

    def leases(self) -> dict[str, str]:
        """MAC -> address of every workload's number (sides too): a VM's DHCP lease."""
        return {mac_of(self.address(k)): self.address(k) for k in sorted(self.hosts)}

    def names(self) -> dict[str, list[str]]:
        """address -> the names the service's resolver answers for it: components only
        (a start-first replace's side workload, ``web.next``, is named once it switches)."""
        return {self.address(c): [c, f"{c}.{self.service}.{DOMAIN}"]
                for c in sorted(self.hosts) if not split_key(c)[1]}


def mac_of(address: str) -> str:
    """The MAC of a VM at ``address``: its lease (``ServiceNet.leases``) names it."""
    a, b, c, d = ipaddress.IPv4Address(address).packed
    return f"52:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}"


def free_number(used: Sequence[int], low: int, high: int) -> int | None:
    """The smallest number in [low, high] not in ``used``."""
    taken = set(used)
    return next((n for n in range(low, high + 1) if n not in taken), None)


def hosts_text(names: Mapping[str, Sequence[str]]) -> str:
    """An /etc/hosts-format file (dnsmasq ``--addn-hosts``)."""
    return "".join(f"{addr} {' '.join(ns)}\n" for addr, ns in sorted(names.items()))


def resolv_conf(att: NetAttach) -> str:
    """A guest's /etc/resolv.conf: the service's name server, its domain searched."""
    return f"nameserver {att.gateway}\nsearch {att.search}\noptions timeout:2 attempts:2\n"


def kernel_args(att: NetAttach) -> str:
    """The initramfs guest's network, on its kernel command line (its init reads it)."""
    return f"mcp.ip={att.cidr} mcp.gw={att.gateway}"
