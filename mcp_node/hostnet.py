"""Host-side mechanics of bridged networking (issue 23): links, the nft table, dnsmasq.

Every step is idempotent and reads what is there before changing it, so the agent can
call it again after a crash or from a repair without tearing down what still works.
Commands go through ``run`` only: argv lists, a timeout, each one logged, a failure a
``NetworkSetupError`` naming the command and its stderr. Link names are checked against
our pattern before they reach any command line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NetworkSetupError
from .nftrules import TABLE, Forward, check_ipv4, check_link, ruleset_text

__all__ = ["Forward", "Resolver", "apply_rules", "current_rules", "delete_link",
           "ensure_bridge", "ensure_tap", "links", "remove_rules", "ruleset_text", "run",
           "set_route_localnet", "set_forwarding"]

log = logging.getLogger("mcp_node.hostnet")

TIMEOUT_S = 20.0
DNSMASQ = "/usr/sbin/dnsmasq"
SERVICE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
STOP_WAIT_S = 5.0


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = TIMEOUT_S,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command (never a shell); a NetworkSetupError with its stderr if it fails
    (``check=False``: a probe whose caller reads the exit status itself)."""
    argv = list(argv)
    # Reads (``ip -j``, ``nft list``) run each round: logged at debug, changes at info.
    log.log(logging.DEBUG if argv[1:2] in (["-j"], ["list"]) else logging.INFO, "%s",
            " ".join(argv))
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True,
                           timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkSetupError(f"{' '.join(argv)}: {exc}") from exc
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip() or f"exit status {p.returncode}"
        raise NetworkSetupError(f"{' '.join(argv)} failed: {err}") from \
            subprocess.CalledProcessError(p.returncode, argv, p.stdout, p.stderr)
    return p


# -- links ------------------------------------------------------------------------------

def bridge_argv(name: str) -> list[str]:
    return ["ip", "link", "add", "name", check_link(name), "type", "bridge"]


def tap_argv(name: str) -> list[str]:
    """A persistent TAP (``ip tuntap`` makes it persistent): it outlives the qemu using it."""
    return ["ip", "tuntap", "add", "dev", check_link(name), "mode", "tap"]


def up_argv(name: str, master: str | None = None) -> list[str]:
    argv = ["ip", "link", "set", "dev", check_link(name)]
    if master is not None:
        argv += ["master", check_link(master)]
    return [*argv, "up"]


def addr_argv(name: str, cidr: str) -> list[str]:
    return ["ip", "addr", "add", check_cidr(cidr), "dev", check_link(name)]


def delete_argv(name: str) -> list[str]:
    return ["ip", "link", "delete", "dev", check_link(name)]


def check_cidr(cidr: str) -> str:
    """``cidr`` as ADDR/PREFIX (an IPv4 interface address), else a ValueError naming it."""
    try:
        iface = ipaddress.IPv4Interface(cidr)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        raise ValueError(f"gateway {cidr!r} is not an IPv4 address/prefix") from None
    if "/" not in cidr or iface.ip in (iface.network.network_address,
                                       iface.network.broadcast_address):
        raise ValueError(f"gateway {cidr!r} must be a host address with its prefix")
    return str(iface)


def _link(name: str) -> dict[str, Any] | None:
    """``ip -j -d link show`` of one link; None when there is none of that name."""
    p = run(["ip", "-j", "-d", "link", "show", "dev", check_link(name)], check=False)
    if p.returncode != 0:
        if "does not exist" in p.stderr:
            return None
        raise NetworkSetupError(f"ip -j -d link show dev {name} failed: {p.stderr.strip()}")
    found = json.loads(p.stdout or "[]")
    return found[0] if found else None


def _kind(link: Mapping[str, Any]) -> str:
    return str(link.get("linkinfo", {}).get("info_kind", ""))


def _add(argv: list[str], name: str) -> None:
    """Create a link; one made meanwhile by someone else (a second agent call) is fine."""
    try:
        run(argv)
    except NetworkSetupError:
        if _link(name) is None:
            raise


def ensure_bridge(name: str, gateway_cidr: str) -> None:
    """The bridge exists, is up and holds the gateway address; other addresses stay."""
    cidr = check_cidr(gateway_cidr)
    link = _link(name)
    if link is None:
        _add(bridge_argv(name), name)
    elif _kind(link) != "bridge":
        raise NetworkSetupError(f"{name} exists but is a {_kind(link) or 'plain'} link, "
                                "not a bridge")
    if link is None or "UP" not in link.get("flags", []):
        run(up_argv(name))
    have = json.loads(run(["ip", "-j", "-4", "addr", "show", "dev", name]).stdout or "[]")
    addrs = {f"{a['local']}/{a['prefixlen']}" for d in have for a in d.get("addr_info", [])}
    if cidr not in addrs:
        run(addr_argv(name, cidr))


def ensure_tap(name: str, bridge: str) -> None:
    """A persistent TAP on ``bridge``, up; one already there is re-attached if need be."""
    check_link(bridge)
    link = _link(name)
    if link is None:
        _add(tap_argv(name), name)
    elif _kind(link) != "tun" or link["linkinfo"].get("info_data", {}).get("type") != "tap":
        raise NetworkSetupError(f"{name} exists but is a {_kind(link) or 'plain'} link, "
                                "not a TAP")
    if link is None or link.get("master") != bridge or "UP" not in link.get("flags", []):
        run(up_argv(name, bridge))


def delete_link(name: str) -> None:
    """Gone afterwards, whether or not it was there."""
    if _link(name) is None:
        return
    try:
        run(delete_argv(name))
    except NetworkSetupError:
        if _link(name) is not None:
            raise


def links(prefix: str = "mcp") -> dict[str, str]:
    """Our links now present, name -> kind ("bridge", "tun", "veth", "" for none)."""
    found = json.loads(run(["ip", "-j", "-d", "link", "show"]).stdout or "[]")
    return {str(d["ifname"]): _kind(d) for d in found
            if str(d.get("ifname", "")).startswith(prefix)}


def forget_neighbor(address: str, bridge: str) -> None:
    """The host's ARP entry for ``address`` on ``bridge`` gone, before a new workload
    takes an address another just gave back: the entry would still name the old one's
    MAC (reachable for up to ~45 s), and the host's connects to it go nowhere until it
    expires (a guest need not announce itself)."""
    run(["ip", "neigh", "flush", "to", check_ipv4(address, "address"), "dev",
         check_link(bridge)])


def set_route_localnet(bridge: str, on: bool) -> None:
    """127.0.0.1 traffic DNATed to a VM may only leave through the bridge with this on."""
    _set_conf(bridge, "route_localnet", on)


def set_forwarding(bridge: str, on: bool) -> None:
    """Routed from the bridge on (to another service's bridge a definition allows): on
    the bridge alone, not the host's ``ip_forward``; the table drops what is not allowed."""
    _set_conf(bridge, "forwarding", on)


def _set_conf(bridge: str, key: str, on: bool) -> None:
    path = Path("/proc/sys/net/ipv4/conf") / check_link(bridge) / key
    log.info("echo %d > %s", int(on), path)
    try:
        path.write_text("1\n" if on else "0\n")
    except OSError as exc:
        raise NetworkSetupError(f"cannot set {path}: {exc}") from exc


# -- rules ------------------------------------------------------------------------------

def apply_rules(text: str) -> None:
    """Load ruleset_text's output: one nft transaction, all of it or nothing."""
    run(["nft", "-f", "-"], input=text)


def remove_rules() -> None:
    """The table gone, whether or not it was there."""
    run(["nft", "-f", "-"], input=ruleset_text({}, (), ()))


def current_rules() -> str | None:
    """``nft list table`` of ours, None when it is absent."""
    argv = ["nft", "list", "table", *TABLE.split()]
    p = run(argv, check=False)
    if p.returncode == 0:
        return p.stdout
    if "No such file or directory" in p.stderr:
        return None
    raise NetworkSetupError(f"{' '.join(argv)} failed: {p.stderr.strip()}")


# -- names ------------------------------------------------------------------------------

def nameservers(resolv_conf: str) -> list[str]:
    """The IPv4/IPv6 ``nameserver`` lines of a resolv.conf, in order, once each."""
    found: list[str] = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                addr = str(ipaddress.ip_address(words[1].split("%")[0]))
            except ValueError:
                continue
            if addr not in found:
                found.append(addr)
    return found


def hosts_text(hosts: Mapping[str, Sequence[str]]) -> str:
    """``ADDR name1 name2`` lines; a ValueError naming a bad address or name."""
    lines = []
    for addr, names in sorted(hosts.items()):
        check_ipv4(addr, "host address")
        if isinstance(names, str) or not names:
            raise ValueError(f"names of {addr} must be a non-empty list, not {names!r}")
        for n in names:
            if not isinstance(n, str) or not HOSTNAME_RE.fullmatch(n):
                raise ValueError(f"host name {n!r} (for {addr}) is not a DNS name")
        lines.append(" ".join([addr, *names]))
    return "".join(f"{line}\n" for line in lines)


MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class Dhcp:
    """A service's VMs take their addresses from its dnsmasq, by MAC (static leases, no
    pool), so an image holds no address of its own: a start-first pair, at two
    addresses, boots one image (an ``image_sha256`` pin holds for both)."""

    bridge: str
    subnet: str                  # "10.89.3.0/24"
    leases: Mapping[str, str]    # MAC -> address


def leases_text(leases: Mapping[str, str]) -> str:
    """``MAC,ADDR`` lines (dnsmasq ``--dhcp-hostsfile``); a ValueError naming a bad one."""
    for mac, addr in leases.items():
        if not isinstance(mac, str) or not MAC_RE.fullmatch(mac):
            raise ValueError(f"MAC {mac!r} (for {addr}) is not a lower-case MAC address")
        check_ipv4(addr, "lease address")
    return "".join(f"{mac},{addr}\n" for mac, addr in sorted(leases.items()))


def check_service(service: str) -> str:
    if not isinstance(service, str) or not SERVICE_RE.fullmatch(service):
        raise ValueError(f"service name {service!r} must match {SERVICE_RE.pattern}")
    return service


def dnsmasq_argv(service: str, listen: str, run_dir: Path,
                 servers: Sequence[str], dhcp: Dhcp | None = None) -> list[str]:
    """One service's dnsmasq: daemonised so it outlives the agent, answering only on the
    gateway address, from our hosts file alone, forwarding other names to ``servers``.
    It drops to nobody once its socket is bound: it answers packets from workloads, so
    ``run_dir`` (and the hosts file it reads again on each SIGHUP) is world-readable, and
    lives outside the agent's 0700 state dir."""
    base = run_dir / check_service(service)
    listen = check_ipv4(listen, "listen address")
    argv = [DNSMASQ, f"--pid-file={base}.pid", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--addn-hosts={base}.hosts", f"--listen-address={listen}",
            "--bind-interfaces", "--except-interface=lo", "--port=53", "--domain-needed",
            "--local-ttl=1", "--local=/internal/", f"--log-facility={base}.log",
            "--user=nobody", "--group=nogroup"]
    argv += [f"--server={s}" for s in servers if s != listen]
    if dhcp is not None:   # bound to its bridge alone, so one per service can serve DHCP
        net = ipaddress.IPv4Network(dhcp.subnet)
        argv += [f"--interface={check_link(dhcp.bridge)}",
                 f"--dhcp-range={net.network_address},static,{net.netmask},infinite",
                 f"--dhcp-hostsfile={base}.dhcp", "--dhcp-authoritative", "--no-ping",
                 "--leasefile-ro", f"--dhcp-option=option:router,{listen}",
                 f"--dhcp-option=option:dns-server,{listen}"]
    return argv


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` has ended (no command line left) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while _cmdline(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return []
    if state in ("Z", "X"):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


class Resolver:
    """One dnsmasq per service on its gateway address, answering its component names.

    The dnsmasqs are daemons with pid files under ``run_dir``: an agent that crashed
    finds them on start and adopts them (never restarts them), so names stay up."""

    def __init__(self, run_dir: Path, resolv_conf: Path = Path("/etc/resolv.conf")) -> None:
        self.run_dir = Path(run_dir)
        self.resolv_conf = resolv_conf

    def _path(self, service: str, ext: str) -> Path:
        return self.run_dir / f"{check_service(service)}.{ext}"

    def _servers(self) -> list[str]:
        try:
            return nameservers(self.resolv_conf.read_text())
        except OSError:
            return []

    def _pid(self, service: str) -> int | None:
        """The live dnsmasq of ours serving ``service``, by its pid file and argv."""
        try:
            pid = int(self._path(service, "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        argv = _cmdline(pid)
        if (argv and Path(argv[0]).name == "dnsmasq"
                and f"--addn-hosts={self._path(service, 'hosts')}" in argv):
            return pid
        return None

    def ensure(self, service: str, listen: str, hosts: Mapping[str, Sequence[str]],
               dhcp: Dhcp | None = None) -> None:
        """The service's names answered on ``listen`` (and its VMs' leases, ``dhcp``); a
        running one is told by SIGHUP, one started otherwise (an older agent's, another
        address) is started again."""
        argv = dnsmasq_argv(service, listen, self.run_dir, self._servers(), dhcp)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)  # noqa: S103 - dnsmasq, as nobody, reads hosts here
        changed = self._write(service, "hosts", hosts_text(hosts))
        if dhcp is not None:
            changed = self._write(service, "dhcp", leases_text(dhcp.leases)) or changed
        pid = self._pid(service)
        if pid is not None and _cmdline(pid) != argv:
            log.info("dnsmasq of %s (pid %d) runs with other options: restarted", service, pid)
            self._kill(pid)
            pid = None
        if pid is None:
            run(argv)
            if self._pid(service) is None:
                raise NetworkSetupError(f"dnsmasq for {service} started but is not running "
                                        f"(see {self._path(service, 'log')})")
        elif changed or self._unread(service):
            log.info("dnsmasq of %s (pid %d): hosts changed, SIGHUP", service, pid)
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                run(argv)
                return
            os.utime(self._path(service, "pid"))

    def _write(self, service: str, ext: str, text: str) -> bool:
        """The file in place (whole, world-readable); whether it changed."""
        path = self._path(service, ext)
        try:
            if path.read_text() == text:
                return False
        except OSError:
            pass
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return True

    def _unread(self, service: str) -> bool:
        """A hosts or leases file newer than the last start or SIGHUP (the pid file's
        mtime): an agent that died between writing it and signalling leaves this."""
        try:
            signalled = self._path(service, "pid").stat().st_mtime_ns
        except OSError:
            return False
        for ext in ("hosts", "dhcp"):
            with contextlib.suppress(OSError):
                if self._path(service, ext).stat().st_mtime_ns > signalled:
                    return True
        return False

    def _kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if _gone_within(pid, STOP_WAIT_S):
            return
        log.info("dnsmasq pid %d did not stop on SIGTERM: SIGKILL", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _gone_within(pid, STOP_WAIT_S)

    def stop(self, service: str) -> None:
        """Its dnsmasq stopped and its files gone, whether or not it ran."""
        pid = self._pid(service)
        if pid is not None:
            log.info("dnsmasq of %s (pid %d): stopped", service, pid)
            self._kill(pid)
            if _cmdline(pid):
                raise NetworkSetupError(f"dnsmasq of {service} (pid {pid}) survived SIGKILL")
        for ext in ("hosts", "dhcp", "pid", "log"):
            self._path(service, ext).unlink(missing_ok=True)

    def running(self) -> dict[str, int]:
        """service -> pid of each live dnsmasq of ours (for the sweep of leftovers)."""
        found: dict[str, int] = {}
        if not self.run_dir.is_dir():
            return found
        for p in sorted(self.run_dir.glob("*.pid")):
            if SERVICE_RE.fullmatch(p.stem) and (pid := self._pid(p.stem)) is not None:
                found[p.stem] = pid
        return found

