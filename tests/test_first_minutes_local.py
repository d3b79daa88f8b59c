"""Issue 22 row 4: ``mcp --local`` opens the agent's state dir (``--state-dir``, else
``$MCP_STATE_DIR``, else the agent config's ``[state] dir``), not the default one, and
leaves no ``podman system service`` behind when the command ends."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result
from daemon_env import daemon_on
from egress import no_egress_env
from live_server import wait_until
from podman_env import PodmanCleanup, containers_conf
from server_env import LiveServer

from mcp_node.cli import cli
from mcp_node.podman_service import PodmanService

WAIT_S = 60.0
UPTIME = re.compile(r"(?<=  )\d{1,2}s +(?=-)")   # under a minute, padded as it was
MCP = str(Path(sys.executable).parent / "mcp")


def agent_config(path: Path, state_dir: Path, socket: str = "") -> Path:
    """An agent config whose ``[state] dir`` is ``state_dir`` (podman on ``socket``, or
    with none the agent's own service)."""
    lines = ["[podman]", f'containers_conf = "{containers_conf()}"']
    if socket:
        lines.append(f'socket = "{socket}"')
    lines += ["[state]", f'dir = "{state_dir}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def local(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner(env=env).invoke(cli, ["--local", *args], catch_exceptions=False)


def test_local_reads_the_state_dir_given(live_server: LiveServer, hello_image: str,
                                         tmp_path: Path, podman_socket: str,
                                         podman_cleanup: PodmanCleanup) -> None:
    live = live_server
    live.client().post("/v1/services", {
        "name": "shop", "components": [{"name": "web", "image": hello_image}]})
    wait_until(lambda: live.client().get("/v1/services/shop")["components"][0]["state"]
               == "running", "shop/web running", WAIT_S)
    state = str(live.agent.state_dir)
    # the config names another (empty) state dir: the option and the variable win over it
    conf = agent_config(tmp_path / "agent.toml", tmp_path / "other", podman_socket)
    env = {"MCP_AGENT_CONFIG": str(conf), "MCP_STATE_DIR": None}
    host = socket.gethostname()
    w = max(4, len(host))
    expected = (f"SERVICE  COMPONENT  {'NODE'.ljust(w)}  RUNTIME    STATE    VERSION  UPTIME  "
                f"PORTS\nshop     web        {host.ljust(w)}  container  running  v1       "
                "Ns      -\n")
    for args, extra in ((["--state-dir", state, "ps"], {}),
                        (["ps"], {"MCP_STATE_DIR": state})):
        res = local(args, {**env, **extra})
        assert (res.exit_code, res.stderr) == (0, "")
        assert UPTIME.sub(lambda m: "Ns".ljust(len(m.group())), res.stdout) == expected
    # the config's own state dir, when neither is given: nothing deployed there
    res = local(["ps"], env)
    assert (res.exit_code, res.stdout.count("shop")) == (0, 0)


def services_of(argv: list[str]) -> list[int]:
    """The pids whose command line is ``argv``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] == argv:
            pids.append(int(proc.name))
    return pids


def test_local_leaves_no_podman_service(tmp_path: Path, hello_image: str) -> None:
    state = tmp_path / "state"
    conf = agent_config(tmp_path / "agent.toml", state)   # no socket: its own service
    env = no_egress_env({**os.environ, "MCP_AGENT_CONFIG": str(conf)})
    env.pop("MCP_STATE_DIR", None)
    argv = PodmanService(state / "podman").argv
    for _ in range(2):
        done = subprocess.run([MCP, "--local", "ps"], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.startswith("SERVICE")
        assert (state / "podman" / "service.log").exists()   # it did start one
        assert services_of(argv) == []


def test_local_beside_a_running_daemon_leaves_the_daemons_podman_service(
        tmp_path: Path) -> None:
    """The in-process agent adopts the daemon's service (its pid file): closing it would
    stop the service under the daemon. While the daemon holds the state dir, it stays."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    conf = agent_config(tmp_path / "agent.toml", state)   # no socket: the daemon's own
    argv = PodmanService(state / "podman").argv
    env = no_egress_env({**os.environ, "MCP_AGENT_CONFIG": str(conf)})
    env.pop("MCP_STATE_DIR", None)
    with daemon_on(state, conf) as d:
        client = d.start()
        client.get("/v1/services")            # its podman service is up once it answered
        wait_until(lambda: len(services_of(argv)) == 1, "the daemon's podman service")
        [pid] = services_of(argv)
        for _ in range(2):
            done = subprocess.run([MCP, "--local", "ps"], env=env, capture_output=True,
                                  text=True, timeout=120, check=False)
            assert (done.returncode, done.stderr) == (0, "")
            assert services_of(argv) == [pid]
        assert client.get("/v1/services") == []
