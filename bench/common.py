"""Shared set-up for the benchmarks: a podman service, an agent daemon, timing helpers.

Everything started here is stopped by pid, and every container created is
labelled with the benchmark agent's owner id and removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP), str(TOP / "tests")]
os.environ.setdefault("CONTAINERS_CONF", str(TOP / "scripts" / "containers.conf"))
BIN = Path(sys.executable).parent

from daemon_env import Daemon, free_port  # noqa: E402

from mcp_node.client import Client  # noqa: E402
from mcp_node.podman import PodmanService  # noqa: E402

# The least any Python CLI built like ours (click, tomllib, dataclasses) could cost: import
# them, read the same TOML file, send it as one POST, print the answer. No validation,
# no formatting: the floor under `mcp deploy` on this machine, measured in the same run.
MINIMAL_CLI = """
import click, dataclasses, json, pathlib, socket, sys, tomllib
port, token, path = sys.argv[1:4]
body = json.dumps(tomllib.loads(pathlib.Path(path).read_text())).encode()
s = socket.create_connection(("127.0.0.1", int(port)))
s.sendall(b"POST /v1/services HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer %s\\r\\n"
          b"Content-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
          % (pathlib.Path(token).read_text().strip().encode(), len(body), body))
buf = b""
while b"\\r\\n\\r\\n" not in buf:
    buf += s.recv(65536)
head, _, rest = buf.partition(b"\\r\\n\\r\\n")
assert head.startswith(b"HTTP/1.1 200"), head
length = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\\r\\n"))
                  if k.lower() == b"content-length"))
while len(rest) < length:
    rest += s.recv(65536)
sys.stdout.buffer.write(rest)
"""


def first_request_s(argv: list[str], env: dict[str, str], port: int,
                    listener: socket.socket) -> float:
    """Seconds from exec until the process's first request byte reaches ``listener``
    (on ``port``, which ``argv`` and ``env`` point the process at): its start-up alone,
    the agent's work left out. The process is then killed (by its pid), unanswered."""
    listener.settimeout(30)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env={**env, "MCP_AGENT": f"http://127.0.0.1:{port}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1)
            took = time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return took


def start_up(b: Bed, definition: Path, pairs: int) -> tuple[list[float], list[float]]:
    """``first_request_s`` of `mcp --json deploy DEFINITION` and of MINIMAL_CLI sending the
    same file, ``pairs`` times each, taking turns going first."""
    mcp, minimal = [], []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        sides = [
            (mcp, [str(BIN / "mcp"), "--json", "deploy", str(definition)]),
            (minimal, [str(BIN / "python"), "-c", MINIMAL_CLI, str(port),
                       str(b.state / "token"), str(definition)]),
        ]
        for i in range(pairs):
            for times, argv in sides[i % 2:] + sides[:i % 2]:
                times.append(first_request_s(argv, b.env, port, listener))
    return mcp, minimal


def hello_image(tag: str = "v1") -> str:
    out = subprocess.run([str(TOP / "scripts" / "build_test_image.sh"), tag], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Bed:
    """A podman service and an agent daemon in a temporary directory."""

    def __init__(self, monitor_interval: float = 5.0, extra_config: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcp-bench-"))
        self.podman = PodmanService(self.dir / "podman", os.environ["CONTAINERS_CONF"])
        self.podman.ensure()
        self.state = self.dir / "state"
        self.state.mkdir(mode=0o700)
        self.config = self.dir / "agent.toml"
        self.config.write_text(f'[podman]\nsocket = "{self.podman.url}"\n'
                               f'[monitor]\ninterval_s = {monitor_interval}\n' + extra_config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon: Daemon | None = None
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(self.dir / "cfg"),
                    "MCP_AGENT": self.url, "MCP_TOKEN_FILE": str(self.state / "token")}

    def start_agent(self) -> Client:
        self.daemon = Daemon(self.state, self.config, self.port, ("--log-level", "warning"))
        client = self.daemon.start()
        self.proc = self.daemon.proc
        return client

    @property
    def owner(self) -> str:
        return (self.state / "node_id").read_text().strip()

    def mcp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "mcp"), *args], env=self.env, capture_output=True,
                              text=True, check=True)

    def close(self) -> None:
        daemon = Daemon(self.state, self.config, self.port)
        if self.daemon is not None:
            daemon = self.daemon
            daemon.stop()
        daemon.remove_containers()
        self._reap_vms()
        self.podman.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _reap_vms(self) -> None:
        """SIGKILL any qemu this bed's agent left running (by the pid in its VM dir)."""
        vms = self.state / "vms"   # a VM's pidfile: vms/.pids/ (older metas: its dir)
        for pidfile in [*vms.glob("*/qemu.pid"), *vms.glob(".pids/*.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if "qemu" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def bed(monitor_interval: float = 5.0, extra_config: str = "") -> Iterator[Bed]:
    b = Bed(monitor_interval, extra_config)
    try:
        yield b
    finally:
        b.close()


def run_cases(cases: dict[str, Any], run_case: Callable[[str, str, int], Any],
              report: Callable[[Any, int], None]) -> None:
    """``[ROUNDS] [CASE ...]`` from the command line: every case (default all) run, then
    each reported, so the figures of one case are printed together at the end."""
    args = sys.argv[1:]
    rounds = int(args.pop(0)) if args and args[0].isdigit() else 3
    chosen = args or list(cases)
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {', '.join(cases)}")
    image = hello_image()
    for r in [run_case(c, image, rounds) for c in chosen]:
        report(r, rounds)
