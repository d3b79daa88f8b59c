"""L4 (TCP pass-through) node routes on HAProxy, with hitless reloads.

Why HAProxy: Debian's Caddy (2.6) has no layer-4 module and a Caddy build
with one does not install from the registries here; HAProxy is in Debian,
passes TCP through unchanged (a TLS-serving component keeps its own
certificate) and reloads without dropping connections: in master-worker mode
a ``reload`` on the master CLI starts a new worker with the new config and
the old one keeps serving the connections it holds until they close (bounded
by ``hard-stop-after``). HAProxy 2.6 cannot add a frontend at run time, so
a route change is one config write and one reload, never a restart.

The agent runs its own HAProxy (``<state>/l4/``): started on the first l4
route, adopted by its pid file after an agent restart (the pid's command line
must name our config), stopped when the last l4 route goes. Its master CLI is
a unix socket of mode 0600; nothing listens beyond the route ports.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ProxyError

log = logging.getLogger(__name__)

HARD_STOP_AFTER = "1h"   # an old worker keeps its open connections this long after a reload
_PROC_RE = re.compile(r"^\d+\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", re.M)


@dataclass(frozen=True, order=True)
class L4Route:
    port: int          # on the advertised address
    address: str       # the advertised address
    host_port: int     # the component's 127.0.0.1 port
    label: str = ""    # service/component/route, for the config's comments


def bind_spec(address: str, port: int) -> str:
    family = "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"
    return f"{family}@{address}:{port}"


def render(routes: Sequence[L4Route]) -> str:
    """The whole HAProxy config for these routes (pure; ports sorted, so stable)."""
    lines = [
        "# written by mcp-agent (mcp_node.l4proxy); edits are overwritten",
        "global",
        f"    hard-stop-after {HARD_STOP_AFTER}",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
    ]
    for r in sorted(routes):
        lines += [
            f"# {r.label}" if r.label else "#",
            f"listen mcp_l4_{r.port}",
            f"    bind {bind_spec(r.address, r.port)}",
            f"    server c{r.host_port} 127.0.0.1:{r.host_port}",
        ]
    return "\n".join(lines) + "\n"


class HAProxy:
    """One HAProxy master (and its workers) serving every l4 route of this node."""

    def __init__(self, binary: str, workdir: Path, timeout: float = 10.0) -> None:
        self.binary = binary
        self.workdir = workdir
        self.cfg = workdir / "haproxy.cfg"
        self.master_sock = workdir / "master.sock"
        self.pidfile = workdir / "haproxy.pid"
        self.timeout = timeout
        self.reloads = 0   # reloads and starts made (benchmarks, tests)

    # -- process ---------------------------------------------------------------

    def pid(self) -> int | None:
        """The master's pid if it runs and is ours (its command line names our config)."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.cfg).encode() in cmdline and state != "Z" else None

    def running(self) -> bool:
        return self.pid() is not None

    def _cli(self, command: str) -> str:
        """One command on the master CLI (the master closes after answering)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(str(self.master_sock))
                s.sendall(command.encode() + b"\n")
                s.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise ProxyError(f"HAProxy master CLI {self.master_sock}: {exc}") from exc
        return b"".join(chunks).decode(errors="replace")

    def _reload_counts(self) -> tuple[int, int]:
        m = _PROC_RE.search(self._cli("show proc"))
        if m is None:
            raise ProxyError("HAProxy master CLI: unexpected 'show proc' answer")
        return int(m.group(1)), int(m.group(2))

    def _check(self, path: Path) -> None:
        try:
            res = subprocess.run([self.binary, "-c", "-q", "-f", str(path)],
                                 capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProxyError(f"cannot run {self.binary}: {exc}") from exc
        if res.returncode != 0:
            raise ProxyError(f"HAProxy refused the config: {(res.stderr or res.stdout)[-400:]}")

    def _start(self) -> None:
        argv = [self.binary, "-W", "-S", f"{self.master_sock},mode,600", "-D",
                "-p", str(self.pidfile), "-f", str(self.cfg)]
        with contextlib.suppress(FileNotFoundError):
            self.master_sock.unlink()
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProxyError(f"cannot start {self.binary}: {exc}") from exc
        if res.returncode != 0:
            raise ProxyError(f"HAProxy did not start: {res.stderr.strip()[-400:]}")
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(ProxyError):
                if self.running():
                    self._reload_counts()
                    break
            if time.monotonic() > deadline:
                raise ProxyError(f"HAProxy master did not come up within {self.timeout:.0f}s")
            time.sleep(0.02)
        self.reloads += 1
        log.info("l4 proxy: HAProxy started (pid %s)", self.pid())

    def _reload(self) -> None:
        before, failed = self._reload_counts()
        self._cli("reload")
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(ProxyError):
                now, now_failed = self._reload_counts()
                if now_failed > failed:
                    raise ProxyError("HAProxy reload failed (a port taken?); the previous "
                                     "routes keep serving")
                if now > before:
                    break
            if time.monotonic() > deadline:
                raise ProxyError(f"HAProxy reload not done within {self.timeout:.0f}s")
            time.sleep(0.02)
        self.reloads += 1

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.timeout
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("l4 proxy: HAProxy stopped (pid %d)", pid)

    # -- routes ----------------------------------------------------------------

    def current(self) -> str:
        try:
            return self.cfg.read_text()
        except OSError:
            return ""

    def apply(self, routes: Sequence[L4Route]) -> bool:
        """Serve exactly ``routes``: one config write and one reload (or start) when they
        differ from what runs; nothing otherwise. On failure the running routes and the
        config file are left as they were. Returns whether anything changed."""
        text = render(routes)
        running = self.running()
        if not routes:
            if running:
                self.stop()
            self.cfg.unlink(missing_ok=True)
            return running
        old = self.current()
        if text == old and running:
            return False
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = self.cfg.with_suffix(".new")
        new.write_text(text)
        try:
            self._check(new)
            os.replace(new, self.cfg)
        finally:
            new.unlink(missing_ok=True)
        try:
            if running:
                self._reload()
            else:
                self._start()
        except ProxyError:
            if old:
                self.cfg.write_text(old)
            else:
                self.cfg.unlink(missing_ok=True)
            if not running:
                self.stop()
            raise
        log.info("l4 proxy: %d routes (%s)", len(routes),
                 ", ".join(f"{r.port}->{r.host_port}" for r in sorted(routes)))
        return True
