"""``mcp-agent`` as a real child process, for tests that SIGKILL and restart it.

Not a fixture module: tests build a ``Daemon`` with their own config and stop
it in their fixture's teardown. The agent (and so any podman service it starts)
runs with ``egress.no_egress_env``: no way out of the machine. The process is
recorded by pid and stopped by that pid; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner, Result
from egress import no_egress_env

from mcp_node.cli import cli
from mcp_node.client import Client
from mcp_node.errors import MCPError
from mcp_node.runtime import LABEL_OWNER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


class Daemon:
    def __init__(self, state: Path, config: Path, port: int | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.state, self.config, self.args = state, config, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Client:
        """Start it and wait (bounded) until it answers /v1/health with its token."""
        with open(self.state.parent / "agent.log", "ab") as logf:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mcp-agent"), "--config", str(self.config),
                 "--state-dir", str(self.state), "--listen", f"127.0.0.1:{self.port}",
                 *self.args],
                env=no_egress_env(), stdout=subprocess.DEVNULL, stderr=logf)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            token = self.state / "token"
            if token.exists():
                client = Client(self.url, token.read_text().strip())
                with contextlib.suppress(MCPError):
                    client.get("/v1/health")
                    return client
            assert time.monotonic() < deadline, "agent did not come up"
            time.sleep(0.1)

    @property
    def owner(self) -> str:
        return (self.state / "node_id").read_text().strip()

    def log(self) -> str:
        return (self.state.parent / "agent.log").read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove_containers(self) -> None:
        """Force-remove the containers labelled with this agent's owner id (only those)."""
        if not (self.state / "node_id").exists():
            return
        env = no_egress_env()
        ids = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={LABEL_OWNER}="
                              f"{self.owner}"], capture_output=True, text=True, env=env
                             ).stdout.split()
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True,
                           env=env)

    def mcp(self, *args: str) -> Result:
        return CliRunner().invoke(
            cli, ["--agent", self.url, "--token-file", str(self.state / "token"), *args],
            catch_exceptions=False)


@contextlib.contextmanager
def podman_daemon(tmp_path: Path, podman_socket: str, monitor: str = "") -> Iterator[Daemon]:
    """A Daemon on the shared test podman with a quick monitor; stopped and its containers
    removed afterwards. ``monitor``: extra ``[monitor]`` lines."""
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\nsocket = "{podman_socket}"\n[monitor]\ninterval_s = 0.3\n'
                    + monitor)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with daemon_on(state, conf) as d:
        yield d


@contextlib.contextmanager
def daemon_on(state: Path, conf: Path) -> Iterator[Daemon]:
    """A Daemon of ``state`` and ``conf`` (not started); stopped and its containers
    removed afterwards."""
    d = Daemon(state, conf)
    try:
        yield d
    finally:
        d.stop()
        d.remove_containers()
