"""A fleet of real processes for fault tests (issue 18): three etcd members in one
network namespace, three ``mcp-agent`` daemons each in a namespace of its own, joined
to etcd's by a veth pair (Tailnet-range addresses; taking that link down cuts the
node off from etcd), each with a podman of its own (``NodePodman``, reached over its
unix socket from any namespace). Nothing in the host namespace is addressed: the test
talks to agents and etcd from a thread that entered their namespace (``in_netns``).

``Poller`` reads every node's podman over its socket every 100 ms and records each
instant with two running copies of the watched service, the gaps with none, and who
runs it. Every process is recorded by pid and stopped by that pid (the fences the
agents start too, from their ``fence.pid``); namespaces are deleted. Every wait has
a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from egress import no_egress_env
from etcd_env import NodePodman, free_ports
from netns import in_netns

from mcp_node import fence
from mcp_node.client import Client
from mcp_node.errors import MCPError
from mcp_node.podman_service import _UnixHTTPConnection
from mcp_node.runtime import LABEL_SERVICE

T = TypeVar("T")
TTL, GRACE = 2, 0.0




def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Topology:
    """Namespace E (etcd) and N1..N3 (nodes); node i's link: E side 100.64.(40+i).1,
    node side .2 (/30)."""

    def __init__(self, n: int = 3) -> None:
        tag = secrets.token_hex(2)
        self.etcd_ns = f"mcpfe{tag}"
        self.node_ns = [f"mcpfn{i}{tag}" for i in range(1, n + 1)]
        self.links = [(f"fe{i}{tag}", f"fn{i}{tag}") for i in range(1, n + 1)]
        self.made: list[str] = []

    def etcd_addr(self, i: int) -> str:
        return f"100.64.{40 + i + 1}.1"

    def start(self) -> Topology:
        for ns in (self.etcd_ns, *self.node_ns):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for i, (e_if, n_if) in enumerate(self.links):
            ns = self.node_ns[i]
            ip("-n", self.etcd_ns, "link", "add", e_if, "type", "veth", "peer", "name", n_if,
               "netns", ns)
            ip("-n", self.etcd_ns, "addr", "add", f"{self.etcd_addr(i)}/30", "dev", e_if)
            ip("-n", ns, "addr", "add", f"100.64.{40 + i + 1}.2/30", "dev", n_if)
            ip("-n", self.etcd_ns, "link", "set", e_if, "up")
            ip("-n", ns, "link", "set", n_if, "up")
        return self

    def cut(self, i: int, down: bool = True) -> None:
        """Node i's link to etcd down (or up again)."""
        ip("-n", self.etcd_ns, "link", "set", self.links[i][0], "down" if down else "up")

    def stop(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.made.clear()


class NsEtcd:
    """Three etcd members inside namespace E, clients on 0.0.0.0 there (so each node's
    link address reaches them), peers on E's loopback."""

    def __init__(self, base: Path, topo: Topology, size: int = 3) -> None:
        self.base, self.topo = base, topo
        ports = free_ports(2 * size)
        self.client_ports, self.peer_ports = ports[:size], ports[size:]
        self.names = [f"e{i + 1}" for i in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}"
                                for n, p in zip(self.names, self.peer_ports, strict=True))

    def endpoints_for(self, node: int) -> list[str]:
        return [f"http://{self.topo.etcd_addr(node)}:{p}" for p in self.client_ports]

    def start(self, i: int) -> None:
        name, cp, pp = self.names[i], self.client_ports[i], self.peer_ports[i]
        data = self.base / name
        state = "existing" if data.exists() else "new"
        with open(self.base / f"{name}.log", "ab") as logf:
            # ip netns exec execs etcd itself: the pid recorded is etcd's
            self.procs[i] = subprocess.Popen(
                ["ip", "netns", "exec", self.topo.etcd_ns, "etcd", "--name", name,
                 "--data-dir", str(data), "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                 "--listen-client-urls", f"http://0.0.0.0:{cp}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                 "--initial-cluster", self.initial, "--initial-cluster-state", state,
                 "--initial-cluster-token", f"mcp-fault-{os.getpid()}",
                 "--heartbeat-interval", "50", "--election-timeout", "500",
                 "--logger", "zap", "--log-level", "error"], stdout=logf, stderr=logf)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.procs[i] = None

    def kill_leader(self, rng: random.Random, timeout: float = 10) -> int:
        """SIGKILL the current leader, start it again 0.1-0.6 s later (``rng``), and wait
        until every member has a leader; the member killed."""
        deadline = time.monotonic() + timeout
        while (leader := self.leader()) is None:
            assert time.monotonic() < deadline, "etcd has no leader"
            time.sleep(0.05)
        self.kill(leader)
        time.sleep(rng.uniform(0.1, 0.6))
        self.start(leader)
        self.wait_healthy()
        return leader

    def ensure_running(self) -> None:
        """Every member running (one that died after a restart is started again) and a
        leader known to all, so a test begins from a whole cluster."""
        for i, p in enumerate(self.procs):
            if p is None or p.poll() is not None:
                print(f"etcd member {self.names[i]} was not running "
                      f"(exit {None if p is None else p.returncode}): started again")
                self.start(i)
        self.wait_healthy()

    def status(self) -> list[dict[str, Any]]:
        """Each member's /v3/maintenance/status ({} when it does not answer)."""
        import requests

        def ask() -> list[dict[str, Any]]:
            out = []
            for p in self.client_ports:
                try:
                    r = requests.post(f"http://127.0.0.1:{p}/v3/maintenance/status", data="{}",
                                      timeout=1)
                    out.append(r.json())
                except (requests.RequestException, ValueError):
                    out.append({})
            return out

        return in_netns(self.topo.etcd_ns, ask)

    def leader(self) -> int | None:
        sts = self.status()
        for i, st in enumerate(sts):
            if st and st.get("leader") and st.get("leader") == st["header"]["member_id"]:
                return i
        return None

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sts = self.status()
            if all(st.get("leader") for st in sts):
                return
            assert time.monotonic() < deadline, f"etcd not healthy: {sts}"
            time.sleep(0.1)

    def stop_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(i)
            self.procs[i] = None


class AgentProc:
    """``mcp-agent`` as a daemon process inside its node's namespace."""

    def __init__(self, base: Path, index: int, ns: str, etcd: list[str], pod: NodePodman,
                 ttl: int = TTL) -> None:
        self.base, self.index, self.ns, self.pod = base, index, ns, pod
        self.name = f"n{index + 1}"
        self.state = base / "state"
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.port = free_ports(1)[0]
        self.config = base / "agent.toml"
        self.config.write_text(
            f'[podman]\nsocket = "unix://{pod.sock}"\n'
            f'containers_conf = "{pod.base / "containers.conf"}"\n'
            '[monitor]\ninterval_s = 0.3\n'
            f'[cluster]\netcd = {json.dumps(etcd)}\nnode = "{self.name}"\n'
            f'lease_ttl_s = {ttl}\ngrace_s = {GRACE}\ntimeout_s = 0.5\nmemory_mb = 2048\n'
            'deploy_wait_s = 60\n')
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    def start(self) -> None:
        tok = self.base / "master.token"
        if not tok.exists():       # fleet writes need the master role
            subprocess.run([str(Path(sys.executable).parent / "mcp-agent"), "--config",
                            str(self.config), "--state-dir", str(self.state), "token", "add",
                            "fault-master", "master", "--output", str(tok)],
                           env=no_egress_env(), check=True, capture_output=True, timeout=60)
        with open(self.base / "agent.log", "ab") as logf:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, str(Path(sys.executable).parent / "mcp-agent"),
                 "--config", str(self.config), "--state-dir", str(self.state),
                 "--listen", f"127.0.0.1:{self.port}"],
                env=no_egress_env(), stdout=subprocess.DEVNULL, stderr=logf)
        self.stopped = False

    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}",
                      (self.base / "master.token").read_text().strip())

    def call(self, fn: Callable[[Client], T], timeout: float = 90) -> T:
        return in_netns(self.ns, lambda: fn(self.client()), timeout)

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            with contextlib.suppress(MCPError, OSError):
                self.call(lambda c: c.get("/v1/health"), 5)
                return
            assert time.monotonic() < deadline, f"{self.name} did not come up"
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)
        self.stopped = sig == signal.SIGSTOP

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        path = self.base / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.stopped:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.stop_fence()

    def stop_fence(self) -> None:
        pid = fence.fence_pid(self.state)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def running_copies(pod: NodePodman, service: str) -> list[str]:
    """Ids of ``service``'s running containers in this node's podman."""
    flt = quote(json.dumps({"label": [f"{LABEL_SERVICE}={service}"]}))
    conn = _UnixHTTPConnection(str(pod.sock), timeout=2.0)
    try:
        conn.request("GET", f"/v4.0.0/libpod/containers/json?filters={flt}")
        rows = json.loads(conn.getresponse().read() or b"[]")
    finally:
        conn.close()
    return [r["Id"] for r in rows if r.get("State") == "running"]


class Poller:
    """Every 100 ms, ``service``'s running copies on each node: instants with two or
    more (each a failure), the spans with none, the node that runs it."""

    def __init__(self, pods: list[NodePodman], service: str, every: float = 0.1) -> None:
        self.pods, self.service, self.every = pods, service, every
        self.doubles: list[tuple[float, list[int]]] = []
        self.holder: int | None = None
        self.holder_id = ""
        self.changed_at = time.monotonic()
        self.gap_since: float | None = None
        self.gaps: list[float] = []
        self.polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Poller:
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            copies: list[int] = []
            ids = []
            now = time.monotonic()
            for i, pod in enumerate(self.pods):
                try:
                    got = running_copies(pod, self.service)
                except (OSError, ValueError):
                    self.errors += 1
                    continue
                copies.extend([i] * len(got))
                ids.extend(got)
            with self._lock:
                self.polls += 1
                if len(copies) >= 2:
                    self.doubles.append((now, copies))
                if not copies and self.gap_since is None:
                    self.gap_since = now
                elif copies and self.gap_since is not None:
                    self.gaps.append(now - self.gap_since)
                    self.gap_since = None
                holder = copies[0] if len(copies) == 1 else None
                if holder != self.holder or (ids and ids[0] != self.holder_id):
                    self.holder, self.changed_at = holder, now
                    self.holder_id = ids[0] if len(ids) == 1 else ""

    def wait_holder(self, not_on: int | None = None, timeout: float = 30,
                    stable: float = 0.3) -> int:
        """The one node running it, other than ``not_on``, held for ``stable`` s."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                h, since = self.holder, self.changed_at
                assert not self.doubles, (
                    f"two copies of {self.service} (nodes by index) at "
                    f"{[(round(t, 2), c) for t, c in self.doubles[:5]]}")
            if h is not None and h != not_on and time.monotonic() - since >= stable:
                return h
            assert time.monotonic() < deadline, (
                f"{self.service} not running on one node other than {not_on} "
                f"(holder {h})")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)
