"""Tests stay on the machine (issue 16).

``no_egress_env()`` is the environment of every podman service, podman CLI and agent a
test starts: HTTP(S)_PROXY (both spellings) at a closed loopback port, NO_PROXY for
loopback, and a registries.conf with no unqualified-search registries. A pull of a
made-up name (``a.b/c:1``) then fails at once on 127.0.0.1: podman hands the registry
name to the proxy and makes no DNS lookup of its own (checked under strace in
test_egress.py), while a registry on 127.0.0.1 is still reached directly.

``Traced(argv, trace)`` runs a command and its whole process tree under strace, and
``outside_connections(trace)`` reads an ``strace -f -e trace=connect,sendto,sendmsg``
log and lists every AF_INET/AF_INET6 address outside loopback (and outside ``allowed``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
REGISTRIES_CONF = TOP / "scripts" / "registries.conf"
NO_PROXY = "127.0.0.1,localhost,::1"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
# strace: what a process can address a datagram or connection to.
TRACE_ARGV = ("strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect,sendto,sendmsg")

_held: list[socket.socket] = []


def closed_port() -> int:
    """A 127.0.0.1 port that refuses connections: bound here and never listening, held for
    the whole session so nothing else can take it (no SO_REUSEADDR)."""
    if not _held:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        _held.append(s)
    return int(_held[0].getsockname()[1])


def no_egress_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with no way out for anything that pulls."""
    env = dict(os.environ if base is None else base)
    proxy = f"http://127.0.0.1:{closed_port()}"
    for key in PROXY_VARS:
        env[key] = proxy
    env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    for key in ("ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    env["CONTAINERS_REGISTRIES_CONF"] = str(REGISTRIES_CONF)
    env.setdefault("CONTAINERS_CONF", str(TOP / "scripts" / "containers.conf"))
    return env


def no_egress(mp: pytest.MonkeyPatch) -> None:
    """The same for this process while ``mp`` lasts, for what an in-process agent starts
    (the unikernel runtime's podman CLI copies os.environ when it is first used).

    The test's own urllib is pinned to no proxy first: its global opener reads the proxy
    variables once, at first use, and would otherwise keep the closed port for the rest
    of the session (loopback through NO_PROXY only while the variables are set)."""
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
    for key, value in no_egress_env({}).items():
        if key == "CONTAINERS_CONF" and key in os.environ:
            continue   # the one scripts/env.sh chose
        mp.setenv(key, value)
    for key in ("ALL_PROXY", "all_proxy"):
        mp.delenv(key, raising=False)


_FAMILY = re.compile(r"sa_family=AF_INET6?\b")
_INET = re.compile(r'sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
_INET6 = re.compile(r'sa_family=AF_INET6, sin6_port=htons\((\d+)\),.*?'
                    r'inet_pton\(AF_INET6, "([^"]+)"')


def addresses(line: str) -> list[tuple[str, int]]:
    """The (address, port) pairs an strace line names (none for AF_UNIX, AF_NETLINK...)."""
    return ([(a, int(p)) for p, a in _INET.findall(line)]
            + [(a, int(p)) for p, a in _INET6.findall(line)])


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def outside_connections(trace: Path, allowed: Iterable[str] = ()) -> list[str]:
    """Every traced line addressing something other than loopback or ``allowed``."""
    ok = {str(ipaddress.ip_address(a)) for a in allowed}
    bad = []
    for line in trace.read_text(errors="replace").splitlines():
        if len(_FAMILY.findall(line)) > len(addresses(line)):
            bad.append(line)   # an address this reader cannot parse counts as outside
        for address, _ in addresses(line):
            if not is_loopback(address) and str(ipaddress.ip_address(address)) not in ok:
                bad.append(line)
    return bad


def loopback_connections(trace: Path) -> list[tuple[str, int]]:
    """The loopback addresses traced: proof the recorder saw connections at all."""
    return [(a, p) for line in trace.read_text(errors="replace").splitlines()
            for a, p in addresses(line) if is_loopback(a)]


class Traced:
    """``argv`` under ``strace -f`` (children included: an agent's podman service), its
    connect/sendto/sendmsg calls written to ``trace``. Stopped by the traced command's own
    pid (strace's child), whose exit ends strace."""

    def __init__(self, argv: list[str], trace: Path, log: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv, self.trace, self.log = argv, trace, log
        self.env = dict(no_egress_env() if env is None else env)
        self.strace: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 10.0) -> Traced:
        with open(self.log, "ab") as out:
            self.strace = subprocess.Popen([*TRACE_ARGV, "-o", str(self.trace), *self.argv],
                                           env=self.env, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT)
        children = Path(f"/proc/{self.strace.pid}/task/{self.strace.pid}/children")
        deadline = time.monotonic() + timeout
        while not self.pid:
            assert self.strace.poll() is None, self.log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "strace did not start its command"
            found = children.read_text().split()
            if found:
                self.pid = int(found[0])
            else:
                time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the command (SIGKILL past ``timeout``); once it is gone, SIGTERM strace,
        which detaches from what outlives the command (conmon and its containers,
        re-parented when podman started them) and exits."""
        if self.strace is None or self.strace.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + timeout
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(self.pid):
                break
        self.strace.terminate()
        try:
            self.strace.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.strace.kill()
            self.strace.wait(timeout=10)


def _alive(pid: int) -> bool:
    """Running (a zombie is gone: its parent, strace, reaps it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"
