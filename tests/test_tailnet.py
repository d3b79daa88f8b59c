"""Tailnet check: address ranges (property tests) and resolution against real dnsmasq."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

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


# -- a server that answers A but NXDOMAIN for AAAA (real DNS wire protocol) ----------------

class SplitDNS:
    """A tiny UDP DNS server on loopback, in a thread: per (name, type) an address list or
    NXDOMAIN, as some servers answer (RFC 8020 says they must not; they do)."""

    def __init__(self, answers: dict[tuple[str, str], list[str] | None]) -> None:
        import socket
        import threading

        self.answers = answers
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            q = dns.message.from_wire(data)
            resp = dns.message.make_response(q)
            question = q.question[0]
            key = (question.name.to_text().rstrip("."), dns.rdatatype.to_text(question.rdtype))
            addrs = self.answers.get(key, [])
            if addrs is None:
                resp.set_rcode(dns.rcode.NXDOMAIN)
            elif addrs:
                resp.answer.append(dns.rrset.from_text(question.name, 60, "IN", key[1], *addrs))
            self.sock.sendto(resp.to_wire(), peer)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def split_dns() -> Iterator[SplitDNS]:
    srv = SplitDNS({
        ("a-only.svc.example.test", "A"): ["100.64.0.2"],
        ("a-only.svc.example.test", "AAAA"): None,
        ("v6-only.svc.example.test", "A"): None,
        ("v6-only.svc.example.test", "AAAA"): ["fd7a:115c:a1e0::2"],
        ("lan-a.svc.example.test", "A"): ["10.0.0.5"],
        ("lan-a.svc.example.test", "AAAA"): None,
        ("gone.svc.example.test", "A"): None,
        ("gone.svc.example.test", "AAAA"): None,
    })
    try:
        yield srv
    finally:
        srv.close()


def test_a_answer_with_aaaa_nxdomain_is_judged_on_the_answer(
        split_dns: SplitDNS, caplog: pytest.LogCaptureFixture) -> None:
    """The defect: an A answer beside an AAAA NXDOMAIN failed as 'does not exist'."""
    ns = [f"127.0.0.1:{split_dns.port}"]
    assert resolve_tailnet("a-only.svc.example.test", ns, 2.0) == ["100.64.0.2"]
    assert "NXDOMAIN for AAAA" in caplog.text
    assert resolve_tailnet("v6-only.svc.example.test", ns, 2.0) == ["fd7a:115c:a1e0::2"]


def test_split_answer_outside_the_tailnet_is_still_refused(split_dns: SplitDNS) -> None:
    with pytest.raises(DNSCheckError, match=r"10\.0\.0\.5"):
        resolve_tailnet("lan-a.svc.example.test", [f"127.0.0.1:{split_dns.port}"], 2.0)


def test_nxdomain_on_both_types_still_fails(split_dns: SplitDNS) -> None:
    with pytest.raises(DNSCheckError, match="does not exist"):
        resolve_tailnet("gone.svc.example.test", [f"127.0.0.1:{split_dns.port}"], 2.0)
