"""A network namespace joined to the host by a veth pair, with a Tailnet address on each
side: the one way tests make a reachable 100.64.0.0/10 address (testbed.md).

Each pair is recorded under ``OWNERS`` with the pid of the test process that made it. A
run that was killed (SIGKILL, a CI timeout, a lost machine) leaves its namespace, its
link and whatever it started inside; the next run on the machine finds the address it
needs held, and ``start`` reaps what a dead owner left instead of failing every test
that needs the address. What a live run holds is never touched: that is an error that
names the run's pid. An address held by an interface that is not one of ours is an
error that names the interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

OWNERS = Path(os.environ.get("MCP_TEST_NETNS_OWNERS", "/run/mcp-tests/netns"))
# Host-side link names the test fixtures make: "mc", a kind letter, a 6-character tag, "h".
OUR_LINK = re.compile(r"^mc[a-z][0-9a-z]{6}h$")


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True,
                          timeout=20)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holders(addr: str) -> list[str]:
    """Host interfaces with ``addr`` on them."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    return [line.split()[1] for line in out.splitlines()
            if f" inet {addr}/" in line]


def _read_owner(path: Path) -> tuple[int, str, str] | None:
    try:
        pid, name, link = path.read_text().split()
        return int(pid), name, link
    except (OSError, ValueError):
        return None


def _remove(name: str, link: str) -> None:
    """Kill what runs in namespace ``name``, delete it and the host end of its pair."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                          timeout=10).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20)


def reap_stale() -> list[str]:
    """Remove every pair whose recorded owner is gone; the namespaces removed."""
    reaped: list[str] = []
    if not OWNERS.is_dir():
        return reaped
    for path in sorted(OWNERS.iterdir()):
        owner = _read_owner(path)
        if owner is None or alive(owner[0]):
            continue
        _remove(owner[1], owner[2])
        path.unlink(missing_ok=True)
        reaped.append(owner[1])
    return reaped


def free_address(addr: str) -> None:
    """Make ``addr`` free on the host or say exactly who holds it."""
    reap_stale()
    owned = {o[2]: o for p in (OWNERS.iterdir() if OWNERS.is_dir() else [])
             if (o := _read_owner(p)) is not None}
    for dev in holders(addr):
        if dev in owned:
            raise RuntimeError(f"{addr} is held by {dev}, made by the live test run "
                               f"pid {owned[dev][0]} (namespace {owned[dev][1]})")
        if not OUR_LINK.match(dev):
            raise RuntimeError(f"{addr} is held by {dev}, which no test fixture made; "
                               "these tests need it free")
        # Ours, from a run before owners were recorded (or whose record is gone).
        subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=20)
    deadline = time.monotonic() + 10
    while holders(addr):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{addr} still held by {holders(addr)} after reaping")
        time.sleep(0.05)


@dataclass
class VethNetns:
    """Namespace ``name`` with ``peer`` inside and ``addr`` on the host end (both /30)."""

    name: str
    link: str
    addr: str
    peer: str
    created: bool = False
    _record: Path | None = field(default=None, repr=False)

    def start(self) -> VethNetns:
        free_address(self.addr)
        OWNERS.mkdir(parents=True, exist_ok=True)
        self._record = OWNERS / self.name
        self._record.write_text(f"{os.getpid()} {self.name} {self.link}\n")
        ns_if = self.link[:-1] + "n"
        ip("netns", "add", self.name)
        self.created = True
        ip("link", "add", self.link, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", self.name)
        ip("addr", "add", f"{self.addr}/30", "dev", self.link)
        ip("link", "set", self.link, "up")
        ip("-n", self.name, "addr", "add", f"{self.peer}/30", "dev", ns_if)
        ip("-n", self.name, "link", "set", ns_if, "up")
        ip("-n", self.name, "link", "set", "lo", "up")
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket() as s:
                    s.bind((self.addr, 0))
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.addr} not usable on {self.link}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.created:
            _remove(self.name, self.link)
            self.created = False
        if self._record is not None:
            self._record.unlink(missing_ok=True)
            self._record = None


T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 30) -> T:
    """``fn()`` on a thread inside network namespace ``ns`` (setns moves only the
    calling thread), so the test reaches addresses that exist only there."""
    out: dict[str, Any] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                out["err"] = OSError(ctypes.get_errno(), "setns")
                return
        finally:
            os.close(fd)
        try:
            out["ok"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["err"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in netns {ns} did not return in {timeout} s")
    if "err" in out:
        raise out["err"]
    return out["ok"]  # type: ignore[no-any-return]
