"""Tailnet check: address ranges (property tests) and resolution against real dnsmasq."""

from __future__ import annotations

import ipaddress

import pytest
from edge_env import INTERNAL_ZONE, Dnsmasq
from hypothesis import example, given
from hypothesis import strategies as st

from mcp_node.errors import DNSCheckError
from mcp_node.tailnet import (
    check_tailnet,
    is_tailnet,
    normalize,
    parse_nameserver,
    resolve,
    resolve_tailnet,
)

V4_TOP10 = (100 << 2) | (64 >> 6)          # 100.64.0.0/10: first ten bits 0110010001
V6_TOP48 = 0xFD7A115CA1E0                  # fd7a:115c:a1e0::/48
MAPPED = 0xFFFF << 32                      # ::ffff:0:0/96


def v4_expected(n: int) -> bool:
    return n >> 22 == V4_TOP10


@given(st.integers(min_value=0, max_value=2**32 - 1))
@example(int(ipaddress.IPv4Address("100.63.255.255")))
@example(int(ipaddress.IPv4Address("100.64.0.0")))
@example(int(ipaddress.IPv4Address("100.127.255.255")))
@example(int(ipaddress.IPv4Address("100.128.0.0")))
def test_ipv4_range(n: int) -> None:
    addr = ipaddress.IPv4Address(n)
    assert is_tailnet(addr) == v4_expected(n)
    assert is_tailnet(str(addr)) == v4_expected(n)


@given(st.integers(min_value=0, max_value=2**128 - 1))
@example(int(ipaddress.IPv6Address("fd7a:115c:a1df:ffff:ffff:ffff:ffff:ffff")))
@example(int(ipaddress.IPv6Address("fd7a:115c:a1e0::")))
@example(int(ipaddress.IPv6Address("fd7a:115c:a1e0:ffff:ffff:ffff:ffff:ffff")))
@example(int(ipaddress.IPv6Address("fd7a:115c:a1e1::")))
@example(int(ipaddress.IPv6Address("::100.64.0.1")))  # IPv4-compatible: not a Tailnet address
def test_ipv6_range(n: int) -> None:
    addr = ipaddress.IPv6Address(n)
    mapped = n >> 32 == 0xFFFF
    expected = v4_expected(n & 0xFFFFFFFF) if mapped else n >> 80 == V6_TOP48
    assert is_tailnet(addr) == expected
    assert is_tailnet(str(addr)) == expected


@given(st.integers(min_value=0, max_value=2**32 - 1))
@example(int(ipaddress.IPv4Address("100.64.0.0")))
@example(int(ipaddress.IPv4Address("100.128.0.0")))
def test_ipv4_mapped_judged_as_ipv4(n: int) -> None:
    mapped = ipaddress.IPv6Address(MAPPED | n)
    assert is_tailnet(mapped) == v4_expected(n)
    assert is_tailnet(f"::ffff:{ipaddress.IPv4Address(n)}") == v4_expected(n)
    assert normalize(str(mapped)) == str(ipaddress.IPv4Address(n))


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**22 - 1).map(lambda n: str(ipaddress.IPv4Address((V4_TOP10 << 22) | n))),
    st.integers(0, 2**80 - 1).map(lambda n: str(ipaddress.IPv6Address((V6_TOP48 << 80) | n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)


@given(st.lists(addresses, max_size=6))
def test_check_tailnet_all_or_error_naming_outsiders(addrs: list[str]) -> None:
    outside = [a for a in addrs if not is_tailnet(a)]
    if addrs and not outside:
        assert check_tailnet("b.svc", addrs) == list(dict.fromkeys(normalize(a) for a in addrs))
        return
    with pytest.raises(DNSCheckError) as err:
        check_tailnet("b.svc", addrs)
    assert "b.svc" in str(err.value)
    for a in outside:
        assert a in str(err.value)


def test_garbage_is_not_tailnet() -> None:
    assert not is_tailnet("not-an-address")
    assert not is_tailnet("100.64.0.256")


@pytest.mark.parametrize(("spec", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[fd00::1]", ("fd00::1", 53)),
])
def test_parse_nameserver(spec: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(spec) == expected


@pytest.mark.parametrize("spec", ["dns.example:53", "127.0.0.1:0", "127.0.0.1:99999",
                                  "[::1", "[::1]x", "127.0.0.1:abc"])
def test_parse_nameserver_rejects(spec: str) -> None:
    with pytest.raises(DNSCheckError):
        parse_nameserver(spec)


# -- against real dnsmasq -------------------------------------------------------------

def test_resolve_tailnet_v4(edge_dns: Dnsmasq) -> None:
    assert resolve_tailnet(f"app.{INTERNAL_ZONE}", [edge_dns.nameserver], 2.0) == ["100.64.0.2"]


def test_resolve_tailnet_v6_and_mapped(edge_dns: Dnsmasq) -> None:
    ns = [edge_dns.nameserver]
    assert resolve_tailnet(f"v6.{INTERNAL_ZONE}", ns, 2.0) == ["fd7a:115c:a1e0::2"]
    got = resolve(f"mapped.{INTERNAL_ZONE}", ns, 2.0)
    assert [ipaddress.ip_address(a) for a in got] == [ipaddress.ip_address("::ffff:100.64.0.2")]
    assert resolve_tailnet(f"mapped.{INTERNAL_ZONE}", ns, 2.0) == ["100.64.0.2"]


def test_resolve_outside_rejected(edge_dns: Dnsmasq) -> None:
    with pytest.raises(DNSCheckError, match=r"10\.0\.0\.5"):
        resolve_tailnet(f"lan.{INTERNAL_ZONE}", [edge_dns.nameserver], 2.0)


def test_resolve_mixed_rejected_naming_the_outsider(edge_dns: Dnsmasq) -> None:
    with pytest.raises(DNSCheckError) as err:
        resolve_tailnet(f"mixed.{INTERNAL_ZONE}", [edge_dns.nameserver], 2.0)
    msg = str(err.value)
    assert "resolves to 10.0.0.5," in msg and "100.64.0.2" in msg


def test_resolve_nxdomain(edge_dns: Dnsmasq) -> None:
    with pytest.raises(DNSCheckError, match="NXDOMAIN"):
        resolve_tailnet(f"nope.{INTERNAL_ZONE}", [edge_dns.nameserver], 2.0)


def test_resolve_unreachable_server_times_out() -> None:
    from edge_env import free_port

    port = free_port(udp_too=True)  # nothing listens there
    with pytest.raises(DNSCheckError, match="cannot resolve"):
        resolve(f"app.{INTERNAL_ZONE}", [f"127.0.0.1:{port}"], 0.5)
