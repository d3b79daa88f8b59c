"""Tailnet check for edge backends: resolve a name, insist every address is on the Tailnet.

An edge route forwards public traffic to a backend; if the backend name
resolved anywhere outside the Tailnet (a LAN address, a public address) the
node would become an open relay into that network. So *every* address must
be a Tailnet address, and a name with none is rejected too.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

import dns.exception
import dns.resolver

from .errors import DNSCheckError

log = logging.getLogger(__name__)

TAILNET_V4 = ipaddress.IPv4Network("100.64.0.0/10")
TAILNET_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_tailnet(address: str | IPAddress) -> bool:
    """True for 100.64.0.0/10 and fd7a:115c:a1e0::/48 (IPv4-mapped IPv6 judged as IPv4)."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped in TAILNET_V4
        return addr in TAILNET_V6
    return addr in TAILNET_V4


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``v6addr`` or ``[v6addr]:port`` -> (address, port)."""
    spec = spec.strip()
    host, port = spec, 53
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise DNSCheckError(f"bad nameserver {spec!r}")
        host, rest = spec[1:end], spec[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise DNSCheckError(f"bad nameserver {spec!r}")
            port = _port(rest[1:], spec)
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = _port(p, spec)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise DNSCheckError(f"bad nameserver {spec!r}: not an IP address") from exc
    return host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise DNSCheckError(f"bad nameserver {spec!r}: bad port")
    return int(text)


def make_resolver(nameservers: Sequence[str], timeout: float) -> dns.resolver.Resolver:
    """A resolver on the configured servers (all must share a port: dnspython has one)."""
    if not nameservers:
        res = dns.resolver.Resolver(configure=True)
    else:
        parsed = [parse_nameserver(s) for s in nameservers]
        ports = {p for _, p in parsed}
        if len(ports) > 1:
            raise DNSCheckError("configured nameservers must all use the same port")
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [h for h, _ in parsed]
        res.port = ports.pop()
    res.timeout = timeout
    res.lifetime = timeout
    return res


def resolve(hostname: str, nameservers: Sequence[str] = (), timeout: float = 3.0) -> list[str]:
    """A and AAAA addresses of ``hostname`` (A first), each type asked on its own.

    Some servers answer A but NXDOMAIN for AAAA (a contradiction RFC 8020 forbids, yet
    common): an NXDOMAIN on one type beside an answer on the other is logged and the
    answers are what the Tailnet check judges. No answer on either type is an error;
    so is a failure (timeout, SERVFAIL) on either, since it could hide an address.
    """
    res = make_resolver(nameservers, timeout)
    out: list[str] = []
    nxdomain: list[str] = []
    for rdtype in ("A", "AAAA"):
        log.debug("resolve %s %s via %s:%s", hostname, rdtype, res.nameservers, res.port)
        try:
            answer = res.resolve(hostname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            nxdomain.append(rdtype)
            continue
        except dns.resolver.NoAnswer:
            continue
        except dns.exception.DNSException as exc:
            raise DNSCheckError(f"cannot resolve {hostname} ({rdtype}): {exc}") from exc
        out.extend(str(ipaddress.ip_address(r.to_text())) for r in answer)
    if nxdomain and not out:
        raise DNSCheckError(f"{hostname} does not exist (NXDOMAIN)")
    if nxdomain:
        log.warning("dns: %s answered %s but NXDOMAIN for %s; judging the answers received",
                    hostname, ", ".join(out), "/".join(nxdomain))
    return out


def normalize(address: str) -> str:
    """IPv4-mapped IPv6 as plain IPv4 (what the proxy should dial); others unchanged."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def check_tailnet(hostname: str, addresses: Iterable[str]) -> list[str]:
    """The (normalized) addresses if every one is on the Tailnet; else DNSCheckError
    naming the others."""
    addrs = list(dict.fromkeys(addresses))
    if not addrs:
        raise DNSCheckError(f"{hostname} has no A or AAAA records")
    outside = [a for a in addrs if not is_tailnet(a)]
    if outside:
        raise DNSCheckError(
            f"{hostname} resolves to {', '.join(outside)}, not on the Tailnet "
            f"({TAILNET_V4}, {TAILNET_V6}); all addresses: {', '.join(addrs)}"
        )
    return list(dict.fromkeys(normalize(a) for a in addrs))


def resolve_tailnet(hostname: str, nameservers: Sequence[str] = (),
                    timeout: float = 3.0) -> list[str]:
    return check_tailnet(hostname, resolve(hostname, nameservers, timeout))
