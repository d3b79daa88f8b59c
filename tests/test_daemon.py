"""``mcp-agent`` as a daemon, with the real pieces: a real agent process, real podman,
real SQLite files, a unix datagram socket standing in for systemd's NOTIFY_SOCKET, and
``systemd-analyze verify`` on the shipped unit.

Each test ends in the state the README documents ("Running under systemd" and
"Start-up refusals"); every process is stopped by its pid, every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_env import refused
from egress import no_egress_env
from podman_env import containers_conf, free_port, podman_cli

from mcp_node import sdnotify
from mcp_node.client import Client
from mcp_node.config import from_dict
from mcp_node.daemon import reload_plan
from mcp_node.errors import MCPError
from mcp_node.runtime import LABEL_OWNER

TOP = Path(__file__).resolve().parent.parent
AGENT = str(Path(sys.executable).parent / "mcp-agent")


def wait_until(pred: Callable[[], object], what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not pred():
        assert time.monotonic() < deadline, f"no {what} within {deadline_s:g} s"
        time.sleep(0.1)


class AgentProc:
    """One ``mcp-agent`` child: started with its own env and args, stopped by its pid."""

    def __init__(self, state: Path, config: Path, port: int | None = None,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 listen_flag: bool = True) -> None:
        self.state, self.config, self.args = state, config, args
        self.listen_flag = listen_flag  # False: [server] listen comes from the config file
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = no_egress_env({**os.environ, "CONTAINERS_CONF": containers_conf(),
                                  **(env or {})})
        self.logfile = state.parent / f"agent-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        listen = ["--listen", f"127.0.0.1:{self.port}"] if self.listen_flag else []
        return [AGENT, "--config", str(self.config), "--state-dir", str(self.state),
                *listen, *self.args]

    def run(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run to completion (for starts that must be refused)."""
        return subprocess.run(self.argv(), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> Client:
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(self.argv(), env=self.env, stdout=subprocess.DEVNULL,
                                         stderr=logf)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log()
            token = self.state / "token"
            if token.exists():
                client = Client(self.url, token.read_text().strip())
                with contextlib.suppress(MCPError):
                    client.get("/v1/health")
                    return client
            assert time.monotonic() < deadline, "agent did not come up:\n" + self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


def owned(state: Path) -> list[str]:
    """``name running|other`` of every container with the state dir's owner label."""
    owner = (state / "node_id").read_text().strip()
    flt = ("--filter", f"label={LABEL_OWNER}={owner}")
    running = set(podman_cli("ps", "--format", "{{.Names}}", *flt).stdout.split())
    every = podman_cli("ps", "-a", "--format", "{{.Names}}", *flt).stdout.split()
    return sorted(f"{n} {'running' if n in running else 'other'}" for n in every)


def remove_owned(state: Path) -> None:
    if (state / "node_id").exists():
        owner = (state / "node_id").read_text().strip()
        ids = podman_cli("ps", "-aq", "--filter", f"label={LABEL_OWNER}={owner}").stdout.split()
        if ids:
            podman_cli("rm", "-f", "-t", "0", *ids)


def hello(name: str, image: str, restart: str = "") -> dict[str, object]:
    comp: dict[str, object] = {"name": "web", "image": image, "routes": [{"port": 8080}]}
    if restart:
        comp["restart"] = restart
    return {"name": name, "components": [comp]}


@pytest.fixture
def agents(tmp_path: Path, podman_socket: str) -> Iterator[Callable[..., AgentProc]]:
    """Make agents on ``tmp_path/state`` (or a given state dir); all stopped, and the
    containers of their owner removed, at teardown."""
    made: list[AgentProc] = []

    def make(*, state: Path | None = None, socket_url: str | None = podman_socket,
             interval: float = 0.3, extra: str = "", **kw: object) -> AgentProc:
        conf = tmp_path / f"agent-{len(made)}.toml"
        text = f"[monitor]\ninterval_s = {interval}\n"
        if socket_url:
            text += f'[podman]\nsocket = "{socket_url}"\n'
        conf.write_text(text + extra)
        st = state or tmp_path / "state"
        st.mkdir(mode=0o700, exist_ok=True)
        a = AgentProc(st, conf, **kw)  # type: ignore[arg-type]
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.stop()
        for st in {a.state for a in made}:
            remove_owned(st)


# -- one agent per state dir ------------------------------------------------------------


def test_second_agent_on_the_same_state_dir_exits_naming_the_holder(
        agents: Callable[..., AgentProc]) -> None:
    """The first agent starts its own podman service; the second must touch neither it
    nor the first one's port, and must not bind its own."""
    first = agents(socket_url=None)
    client = first.start()
    assert first.proc is not None
    assert (first.state / "agent.pid").read_text().strip() == str(first.proc.pid)
    pod_pid = int((first.state / "podman" / "service.pid").read_text())
    second = agents(socket_url=None)
    done = second.run()
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"another mcp-agent (pid {first.proc.pid})" in lines[0]
    assert str(first.state) in lines[0]
    assert refused(second.port)                           # it never listened
    os.kill(pod_pid, 0)                                    # the podman service lives on
    assert client.get("/v1/health")["status"] in ("healthy", "degraded")
    assert (first.state / "agent.pid").read_text().strip() == str(first.proc.pid)
    assert first.stop() == 0
    # the lock went with the first agent: a new one starts on the same state dir
    third = agents(socket_url=None, port=first.port)
    third.start()
    assert third.proc is not None
    assert (first.state / "agent.pid").read_text().strip() == str(third.proc.pid)


# -- refused starts: corrupt, missing or empty registries ---------------------------------


def _damage(db: Path, how: str) -> None:
    if how == "garbage":
        db.write_bytes(b"this is not an SQLite database\n" * 200)
        return
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    data[page + 8: 2 * page] = b"\xa5" * (page - 8)      # a b-tree page scribbled over
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["garbage", "damaged page"])
def test_corrupt_registry_is_refused_naming_the_file(agents: Callable[..., AgentProc],
                                                     hello_image: str, how: str) -> None:
    a = agents()
    client = a.start()
    for i in range(3):
        client.post("/v1/services", {"name": f"c{i}", "active": False, "components": [
            {"name": "web", "image": hello_image, "env": [f"PAD={'x' * 1500}"]}]})
    assert a.stop() == 0
    db = a.state / "registry.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    _damage(db, how)
    before = db.read_bytes()
    done = a.run()
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"registry {db} is corrupt" in lines[0]
    assert "restore a backup" in lines[0] and "--adopt" in lines[0]
    assert db.read_bytes() == before                       # refused, not "repaired"
    assert refused(a.port)


@pytest.mark.parametrize("lost", ["missing", "empty"])
def test_new_registry_beside_owned_workloads_needs_adopt(agents: Callable[..., AgentProc],
                                                         hello_image: str, lost: str) -> None:
    svc = f"a{uuid.uuid4().hex[:8]}"
    a = agents()
    client = a.start()
    client.post("/v1/services", hello(svc, hello_image))
    # SIGTERM stops the agent and keeps its workloads running
    assert a.stop() == 0
    assert owned(a.state) == [f"mcp-{svc}-web running"]
    db = a.state / "registry.db"
    if lost == "missing":
        for p in a.state.glob("registry.db*"):
            p.unlink()
    else:
        con = sqlite3.connect(db)
        con.execute("DELETE FROM services")
        con.commit()
        con.close()
    done = a.run()
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert f"registry {db} is {lost}" in err
    assert f"container:{svc}-web" in err and "--adopt" in err
    assert owned(a.state) == [f"mcp-{svc}-web running"]   # refused: nothing removed
    assert refused(a.port)
    # --adopt: the workloads become orphans, and reconcile removes them
    b = agents(args=("--adopt",), port=a.port)
    client = b.start()
    wait_until(lambda: owned(a.state) == [], "orphan removed")
    assert f"adopt workload=container:{svc}-web" in b.log()
    assert client.get("/v1/services") == []


# -- systemd ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(0.2)
    try:
        yield s
    finally:
        s.close()


def messages(sock: socket.socket, until: Callable[[list[str]], bool], what: str,
             deadline_s: float = 60.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + deadline_s
    while not until(got):
        assert time.monotonic() < deadline, f"no {what} within {deadline_s:g} s: {got}"
        with contextlib.suppress(TimeoutError):
            got.append(sock.recv(4096).decode())
    return got


def test_ready_watchdog_reload_and_stop_are_notified(agents: Callable[..., AgentProc],
                                                     notify_socket: socket.socket,
                                                     tmp_path: Path) -> None:
    """WatchdogSec=2 -> a ping at least every second: the 5 s interval is lowered to 1."""
    a = agents(interval=5, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                "WATCHDOG_USEC": "2000000"})
    a.start()
    got = messages(notify_socket, lambda g: any(m.startswith("READY=1") for m in g), "READY")
    ready = next(m for m in got if m.startswith("READY=1"))
    assert f"MAINPID={a.proc.pid}" in ready and f"127.0.0.1:{a.port}" in ready  # type: ignore[union-attr]
    assert "WATCHDOG=1" in got[: got.index(ready)]          # the first round came before READY
    assert not refused(a.port)
    messages(notify_socket, lambda g: g.count("WATCHDOG=1") >= 3, "3 watchdog pings")
    assert "monitor.interval_s=5 lowered to 1" in a.log()
    a.signal(signal.SIGHUP)
    got = messages(notify_socket, lambda g: "READY=1" in g, "READY after reload")
    assert "RELOADING=1" in got[: got.index("READY=1")]
    assert a.stop() == 0
    messages(notify_socket, lambda g: "STOPPING=1" in g, "STOPPING")


def test_sighup_applies_the_interval_and_names_a_listen_change(
        agents: Callable[..., AgentProc], notify_socket: socket.socket,
        tmp_path: Path) -> None:
    """A one-hour interval makes no second round; after SIGHUP with 0.2 s, rounds (and
    their watchdog pings) come. A changed listen address is logged as needing a restart
    and not applied: the agent keeps answering where it was."""
    port = free_port()
    a = agents(interval=3600, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                   "WATCHDOG_USEC": str(7200 * 10**6)},
               port=port, listen_flag=False, extra=f'[server]\nlisten = "127.0.0.1:{port}"\n')
    client = a.start()
    messages(notify_socket, lambda g: any(m.startswith("READY=1") for m in g), "READY")
    assert "lowered" not in a.log()
    other = free_port()
    a.config.write_text(a.config.read_text().replace("interval_s = 3600", "interval_s = 0.2")
                        .replace(f"127.0.0.1:{port}", f"127.0.0.1:{other}")
                        + "max_body = 2048\n")
    a.signal(signal.SIGHUP)
    messages(notify_socket, lambda g: g.count("WATCHDOG=1") >= 5, "rounds at the new interval")
    log = a.log()
    assert "config reload key=monitor.interval_s applied=live" in log
    assert "config reload key=server.max_body applied=live" in log
    assert "config reload key=server.listen applied=no restart_needed=true" in log
    assert "config reloaded applied=server.max_body,monitor.interval_s " \
           "restart_needed=server.listen" in log
    assert client.get("/v1/health")["status"] in ("healthy", "degraded")
    assert refused(other)
    with pytest.raises(MCPError, match="exceeds the limit of 2048"):  # max_body applied
        client.post("/v1/services", {"name": "big", "components": [
            {"name": "web", "image": "x", "env": ["PAD=" + "x" * 4096]}]})
    # a broken config on reload: logged, the running config kept, the agent up
    a.config.write_text("[monitor]\nbogus = 1\n")
    a.signal(signal.SIGHUP)
    wait_until(lambda: "config reload failed" in a.log(), "reload failure logged")
    assert "monitor.bogus" in a.log()
    assert client.get("/v1/health")["status"] in ("healthy", "degraded")


def test_systemd_analyze_accepts_the_unit_as_installed(tmp_path: Path,
                                                       podman_binary: None) -> None:
    """The README's install command (sed @TOP@), then ``systemd-analyze verify``: no
    error and no warning. A unit naming a missing binary fails it (the check works)."""
    from conftest import need
    need("systemd-analyze")
    text = (TOP / "scripts" / "mcp-agent.service").read_text().replace("@TOP@", str(TOP))
    assert "@TOP@" not in text
    unit = tmp_path / "mcp-agent.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    for key in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                "KillMode=process", f"ExecStart={TOP}/.venv/bin/mcp-agent"):
        assert key in text
    bad = tmp_path / "bad" / "mcp-agent.service"
    bad.parent.mkdir()
    bad.write_text(text.replace(".venv/bin/mcp-agent", ".venv/bin/no-such-agent"))
    done = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "no-such-agent" in done.stderr


# -- logic (no processes) -----------------------------------------------------------------


def test_reload_plan_applies_live_keys_only() -> None:
    old = from_dict({"monitor": {"interval_s": 5}, "server": {"listen": "127.0.0.1:1"}})
    new = from_dict({"monitor": {"interval_s": 0.5, "flap_changes": 9},
                     "server": {"listen": "127.0.0.1:2", "max_body": 10},
                     "qemu": {"accel": "tcg"}})
    run, applied, restart = reload_plan(old, new)
    assert applied == ["server.max_body", "monitor.interval_s", "monitor.flap_changes"]
    assert restart == ["server.listen", "qemu.accel"]
    assert run.monitor == new.monitor and run.server.max_body == 10
    assert run.server.listen == "127.0.0.1:1" and run.qemu.accel == "auto"
    assert reload_plan(old, old) == (old, [], [])


def test_sd_notify_on_a_real_datagram_socket(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1\nSTATUS=x")
        assert s.recv(100) == b"READY=1\nSTATUS=x"
    path.unlink()
    assert not sdnotify.notify("WATCHDOG=1")                 # gone: logged, not raised
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")                    # not under systemd: no-op
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert sdnotify.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None              # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval() is None
