"""DNS registration of node-route hostnames: RFC 2136 dynamic updates signed with TSIG.

Each hostname gets an A (or AAAA) record for the node's advertised address and
a TXT record naming the node that holds it. The add carries an RFC 2136
prerequisite (the name has no address record, or exactly ours), so two nodes
racing for one name cannot both win and a name held for another address is
refused, naming the holder, without being touched. A delete names the exact
record it removes, so it never takes another node's address with it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from .config import DnsConfig
from .errors import DNSUpdateError, EdgeError, HostnameTaken
from .tailnet import parse_nameserver

log = logging.getLogger(__name__)

TTL = 60
OWNER_PREFIX = "mcp-node="
ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha384": dns.tsig.HMAC_SHA384, "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1, "hmac-md5": dns.tsig.HMAC_MD5,
}


def absolute(hostname: str) -> dns.name.Name:
    """Absolute, so an update never lands at <name>.<zone> (a bare str is zone-relative)."""
    return dns.name.from_text(hostname.rstrip(".") + ".")


def rdtype_for(address: str) -> str:
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


def read_secret(path: str) -> bytes:
    """The TSIG secret (base64) from a file only its owner may read."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text().strip()
    except OSError as exc:
        raise DNSUpdateError(f"cannot read dns.tsig_secret_file {p}: {exc.strerror}") from exc
    if st.st_mode & 0o077:
        raise DNSUpdateError(f"dns.tsig_secret_file {p} is mode "
                             f"{stat.S_IMODE(st.st_mode):04o}; it must be 0600")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DNSUpdateError(f"dns.tsig_secret_file {p} does not hold a base64 secret") from exc


# -- pure message builders (unit-tested) -------------------------------------------

def register_message(zone: str, hostname: str, address: str, holder: str,
                     keyring: dict[dns.name.Name, dns.tsig.Key] | None = None,
                     keyname: dns.name.Name | None = None) -> dns.update.UpdateMessage:
    """Add A/AAAA + TXT, on condition the name has no address of that type, or just ours."""
    rdtype = rdtype_for(address)
    upd = dns.update.UpdateMessage(zone, keyring=keyring, keyname=keyname)
    name = absolute(hostname)
    upd.absent(name, rdtype)
    upd.add(name, TTL, rdtype, address)
    upd.delete(name, "TXT")
    upd.add(name, TTL, "TXT", f'"{OWNER_PREFIX}{holder}"')
    return upd


def reassert_message(zone: str, hostname: str, address: str, holder: str,
                     keyring: dict[dns.name.Name, dns.tsig.Key] | None = None,
                     keyname: dns.name.Name | None = None) -> dns.update.UpdateMessage:
    """The records again, on condition the address RRset is exactly ours."""
    rdtype = rdtype_for(address)
    upd = dns.update.UpdateMessage(zone, keyring=keyring, keyname=keyname)
    name = absolute(hostname)
    upd.present(name, rdtype, address)
    upd.delete(name, "TXT")
    upd.add(name, TTL, "TXT", f'"{OWNER_PREFIX}{holder}"')
    return upd


def unregister_message(zone: str, hostname: str, address: str, holder: str,
                       keyring: dict[dns.name.Name, dns.tsig.Key] | None = None,
                       keyname: dns.name.Name | None = None) -> dns.update.UpdateMessage:
    """Delete exactly our address record and our TXT; nothing of anyone else's."""
    upd = dns.update.UpdateMessage(zone, keyring=keyring, keyname=keyname)
    name = absolute(hostname)
    upd.delete(name, rdtype_for(address), address)
    upd.delete(name, "TXT", f'"{OWNER_PREFIX}{holder}"')
    return upd


@dataclass
class DnsUpdater:
    """Registers names in ``zone`` at ``server``; ``holder`` names this node in TXT."""

    server: str
    zone: str
    tsig_name: str
    secret_file: str
    algorithm: str
    holder: str
    timeout: float = 3.0
    updates: int = 0   # messages sent (benchmarks)

    def _keyring(self) -> tuple[dict[dns.name.Name, dns.tsig.Key], dns.name.Name]:
        name = dns.name.from_text(self.tsig_name)
        key = dns.tsig.Key(name, read_secret(self.secret_file),
                           ALGORITHMS[self.algorithm.lower()])
        return {name: key}, name

    def _addr(self) -> tuple[str, int]:
        try:
            return parse_nameserver(self.server)
        except EdgeError:
            raise
        except Exception as exc:
            raise DNSUpdateError(f"bad dns.update_server {self.server!r}: {exc}") from exc

    def _send(self, msg: dns.message.Message, what: str) -> dns.rcode.Rcode:
        host, port = self._addr()
        self.updates += 1
        log.debug("dns update %s via %s:%d", what, host, port)
        try:
            resp = dns.query.tcp(msg, host, port=port, timeout=self.timeout)
        except dns.tsig.PeerError as exc:
            raise DNSUpdateError(f"{what}: {self.server} rejected TSIG key "
                                 f"{self.tsig_name!r} ({type(exc).__name__}): check "
                                 "dns.tsig_name/tsig_secret_file/tsig_algorithm") from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSUpdateError(f"{what}: update server {self.server} unreachable: "
                                 f"{exc}") from exc
        rcode = resp.rcode()
        if rcode in (dns.rcode.NOTAUTH, dns.rcode.REFUSED):
            raise DNSUpdateError(f"{what}: {self.server} answered {dns.rcode.to_text(rcode)} "
                                 f"(TSIG key {self.tsig_name!r} not accepted for zone "
                                 f"{self.zone}?)")
        return rcode

    def lookup(self, hostname: str, rdtype: str) -> list[str]:
        """What the update server itself holds for the name (no cache in between)."""
        host, port = self._addr()
        q = dns.message.make_query(absolute(hostname), rdtype)
        try:
            resp = dns.query.tcp(q, host, port=port, timeout=self.timeout)
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSUpdateError(f"query {hostname} {rdtype}: update server {self.server} "
                                 f"unreachable: {exc}") from exc
        out: list[str] = []
        for rrset in resp.answer:
            if rrset.rdtype == dns.rdatatype.from_text(rdtype):
                out.extend(r.to_text().strip('"') for r in rrset)
        return out

    def register(self, hostname: str, address: str) -> None:
        """Publish; HostnameTaken (nothing sent beyond the refused update) if another
        address holds the name."""
        keyring, keyname = self._keyring()
        args = (self.zone, hostname, address, self.holder, keyring, keyname)
        rcode = self._send(register_message(*args), f"register {hostname}")
        if rcode == dns.rcode.YXRRSET:   # an address exists: ours (re-assert) or another's
            rcode = self._send(reassert_message(*args), f"register {hostname}")
            if rcode == dns.rcode.NXRRSET:
                held = self.lookup(hostname, rdtype_for(address))
                owner = [t[len(OWNER_PREFIX):] for t in self.lookup(hostname, "TXT")
                         if t.startswith(OWNER_PREFIX)]
                raise HostnameTaken(
                    f"{hostname} is already registered for {', '.join(held) or '?'}"
                    f"{' by node ' + ', '.join(owner) if owner else ''}; "
                    "not taking it over (pick another route hostname)")
        if rcode != dns.rcode.NOERROR:
            raise DNSUpdateError(f"register {hostname}: {self.server} answered "
                                 f"{dns.rcode.to_text(rcode)}")
        log.info("dns: %s %s %s registered at %s", hostname, rdtype_for(address), address,
                 self.server)

    def unregister(self, hostname: str, address: str) -> None:
        keyring, keyname = self._keyring()
        rcode = self._send(unregister_message(self.zone, hostname, address, self.holder,
                                              keyring, keyname), f"unregister {hostname}")
        if rcode != dns.rcode.NOERROR:
            raise DNSUpdateError(f"unregister {hostname}: {self.server} answered "
                                 f"{dns.rcode.to_text(rcode)}")
        log.info("dns: %s %s removed at %s", hostname, address, self.server)


def from_config(dns_cfg: DnsConfig, zone: str, holder: str) -> DnsUpdater | None:
    """None when ``dns.update_server`` is unset: nothing is ever sent then."""
    if not dns_cfg.update_server:
        return None
    return DnsUpdater(server=dns_cfg.update_server, zone=zone, tsig_name=dns_cfg.tsig_name,
                      secret_file=dns_cfg.tsig_secret_file, algorithm=dns_cfg.tsig_algorithm,
                      holder=holder, timeout=dns_cfg.timeout_s)
