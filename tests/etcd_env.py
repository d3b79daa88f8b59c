"""A real 3-member etcd cluster (Debian's etcd-server) on loopback, for fleet tests.

Each member is a child process recorded by pid, stopped by that pid, on free
ports; ``kill(i)`` SIGKILLs one and ``start(i)`` brings it back on its data dir.
Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import need

__all__ = ["EtcdCluster", "etcd_cluster", "free_ports"]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class EtcdCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        ports = free_ports(2 * size)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.names = [f"e{i + 1}" for i in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}"
                                for n, p in zip(self.names, self.peer_ports, strict=True))

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def start(self, i: int) -> None:
        name, cp, pp = self.names[i], self.client_ports[i], self.peer_ports[i]
        data = self.base / name
        state = "existing" if data.exists() else "new"
        with open(self.base / f"{name}.log", "ab") as logf:
            self.procs[i] = subprocess.Popen(
                ["etcd", "--name", name, "--data-dir", str(data),
                 "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                 "--listen-client-urls", f"http://127.0.0.1:{cp}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                 "--initial-cluster", self.initial, "--initial-cluster-state", state,
                 "--initial-cluster-token", f"mcp-test-{os.getpid()}",
                 "--heartbeat-interval", "50", "--election-timeout", "500",
                 "--logger", "zap", "--log-level", "error"],
                stdout=logf, stderr=logf)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.procs[i] = None

    def stop_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(i)
            self.procs[i] = None

    def healthy(self, i: int) -> bool:
        with contextlib.suppress(requests.RequestException, ValueError):
            r = requests.get(f"{self.endpoints[i]}/health", timeout=1)
            return bool(r.json().get("health") == "true")
        return False

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for i in members if members is not None else range(len(self.names)):
            while not self.healthy(i):
                p = self.procs[i]
                assert p is not None and p.poll() is None, self.log(i)
                assert time.monotonic() < deadline, f"etcd {self.names[i]} not healthy"
                time.sleep(0.1)

    def log(self, i: int) -> str:
        path = self.base / f"{self.names[i]}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    need("etcd")
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.base.mkdir()
    try:
        for i in range(3):
            cluster.start(i)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()
