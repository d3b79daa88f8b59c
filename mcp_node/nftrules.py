"""The nftables ruleset of bridged networking (issue 23), built from a desired state.

Pure text, so the whole ruleset is unit-tested; ``hostnet.apply_rules`` loads it. The text
replaces the agent's one table in a single ``nft -f`` transaction: it first declares the
table (so the delete cannot fail when it is absent), deletes it, then declares it whole.
A crash therefore never leaves half a ruleset, and rules of others are never touched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TABLE = "inet mcp_node"
# IFNAMSIZ is 16 with the NUL: 15 characters at most. The only names that reach nft or ip.
LINK_RE = re.compile(r"mcp(br|t)[0-9a-z]{1,11}")
BRIDGE_RE = re.compile(r"mcpbr[0-9a-z]{1,10}")
BRIDGE_GLOB = "mcpbr*"


def check_link(name: str) -> str:
    """``name`` if it is one of our link names, else a ValueError naming it."""
    if not isinstance(name, str) or len(name) > 15 or not LINK_RE.fullmatch(name):
        raise ValueError(f"link name {name!r} is not ours: must match "
                         f"{LINK_RE.pattern} and be at most 15 characters")
    return name


def check_bridge(name: str) -> str:
    if not isinstance(name, str) or not BRIDGE_RE.fullmatch(name):
        raise ValueError(f"bridge name {name!r} is not ours: must match {BRIDGE_RE.pattern}")
    return name


def check_ipv4(address: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except (ipaddress.AddressValueError, ValueError):
        raise ValueError(f"{what} {address!r} is not an IPv4 address") from None


def check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not a port (1-65535)")
    return port


@dataclass(frozen=True)
class Forward:
    """A bridged workload's host port on 127.0.0.1, sent on to its address."""

    host_port: int
    address: str
    port: int

    def __post_init__(self) -> None:
        check_port(self.host_port, "host port")
        check_port(self.port, "port")
        check_ipv4(self.address, "forward address")


def ruleset_text(bridges: Mapping[str, str], allow: Sequence[tuple[str, str]],
                 forwards: Sequence[Forward]) -> str:
    """The ``nft -f`` text that makes the table exactly this state.

    ``bridges`` maps each bridge to its gateway address (the input chain needs the
    addresses: a service may reach its own gateway's DNS, never another's). ``allow``
    holds directed (source bridge, destination bridge) pairs; replies pass by conntrack.
    No bridges and no forwards: the text only removes the table.
    """
    gateways = {check_bridge(b): check_ipv4(gw, f"gateway of {b}") for b, gw in bridges.items()}
    pairs: list[tuple[str, str]] = []
    for src, dst in allow:
        for b in (src, dst):
            if check_bridge(b) not in gateways:
                raise ValueError(f"allowed pair ({src}, {dst}) names {b}, not a bridge")
        if (src, dst) not in pairs:
            pairs.append((src, dst))
    ports: dict[int, Forward] = {}
    for f in forwards:
        if not isinstance(f, Forward):
            raise ValueError(f"forward {f!r} is not a Forward")
        if f.host_port in ports and ports[f.host_port] != f:
            raise ValueError(f"host port {f.host_port} forwarded twice: "
                             f"{ports[f.host_port]} and {f}")
        ports[f.host_port] = f
    text = [f"table {TABLE} {{}}", f"delete table {TABLE}"]
    if not gateways and not ports:
        return "\n".join(text) + "\n"
    names = sorted(gateways)
    text += [f"table {TABLE} {{",
             "\tchain forward {",
             "\t\ttype filter hook forward priority -10; policy accept;",
             "\t\tct state established,related accept"]
    text += [f'\t\tiifname "{s}" oifname "{d}" accept' for s, d in pairs]
    text += [f'\t\tiifname "{b}" oifname "{BRIDGE_GLOB}" oifname != "{b}" drop' for b in names]
    text += ["\t}",
             "\tchain input {",
             "\t\ttype filter hook input priority -10; policy accept;"]
    for b in names:
        others = sorted({gateways[o] for o in names if o != b} - {gateways[b]})
        if others:
            text.append(f'\t\tiifname "{b}" ip daddr {{ {", ".join(others)} }} drop')
    text += ["\t}",
             "\tchain nat_output {",
             "\t\ttype nat hook output priority -100; policy accept;"]
    text += [f"\t\tip daddr 127.0.0.1 tcp dport {f.host_port} dnat ip to {f.address}:{f.port}"
             for _, f in sorted(ports.items())]
    text += ["\t}",
             "\tchain nat_postrouting {",
             "\t\ttype nat hook postrouting priority 100; policy accept;",
             f'\t\tip saddr 127.0.0.0/8 oifname "{BRIDGE_GLOB}" masquerade',
             "\t}",
             "}"]
    return "\n".join(text) + "\n"
