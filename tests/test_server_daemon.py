"""``mcp-agent`` as a real process with no configuration, and HTTPS with a real certificate."""

from __future__ import annotations

import signal
import ssl
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from egress import no_egress_env
from live_server import self_signed
from podman_env import free_port

from mcp_node.client import Client
from mcp_node.config import AgentConfig
from mcp_node.errors import AgentUnreachable, RemoteError
from mcp_node.server import serve

TOP = Path(__file__).resolve().parent.parent


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mcp_node.agent_cli import main; main()", *args]


def wait_for(pred: object, proc: subprocess.Popen[str], what: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while not pred():  # type: ignore[operator]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"mcp-agent exited {proc.returncode} before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {deadline_s}s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_runs_with_no_config(_isolated_state: Path, tmp_path: Path, sig: int,
                                    podman_binary: None) -> None:
    """No --config, no --state-dir: state goes to $XDG_STATE_HOME/mcp (isolated by conftest).
    Only the port is chosen (never the fixed default port in a test)."""
    port = free_port()
    env = no_egress_env()
    proc = subprocess.Popen(agent_argv("--listen", f"127.0.0.1:{port}"), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        token_file = _isolated_state / "token"
        wait_for(token_file.exists, proc, "token file")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((_isolated_state / "tokens.toml").stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        client = Client(f"http://127.0.0.1:{port}", token)

        def answers() -> bool:
            try:
                return client.get("/v1/health")["status"] in ("healthy", "degraded")
            except AgentUnreachable:
                return False

        wait_for(answers, proc, "health answer")
        with pytest.raises(RemoteError) as exc:
            Client(f"http://127.0.0.1:{port}", None).get("/v1/health")
        assert exc.value.status == 401
        assert token not in (_isolated_state / "tokens.toml").read_text()
        client.get("/v1/services")
    finally:
        code, out, err = stop(proc, sig)
    assert code == 0, err
    assert f"listening on http://127.0.0.1:{port}" in out
    assert f"token file: {_isolated_state / 'token'}" in out
    assert "level=info logger=mcp_node.server listening" in err
    # Successful health polls are debug lines (they come every few seconds); the rest info.
    assert "logger=mcp_node.server http method=GET path=/v1/services status=200" in err
    assert "path=/v1/health status=200" not in err
    assert "status=401" in err and token not in err
    assert "stopped" in err.splitlines()[-1]


def test_daemon_refuses_non_loopback_without_tls(tmp_path: Path) -> None:
    proc = subprocess.run(agent_argv("--state-dir", str(tmp_path / "s"),
                                     "--listen", "0.0.0.0:9444"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not a loopback address" in proc.stderr and "tls_cert" in proc.stderr
    assert not (tmp_path / "s" / "token").exists()


def test_daemon_rejects_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:1"\nbogus = 1\n')
    proc = subprocess.run(agent_argv("--config", str(cfg)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "server.bogus" in proc.stderr


def test_https_listener(podman_config: AgentConfig, tmp_path: Path) -> None:
    from mcp_node.agent import Agent

    cert, key = self_signed(tmp_path)
    cfg = replace(podman_config, server=replace(podman_config.server, listen="127.0.0.1:0",
                                                tls_cert=cert, tls_key=key))
    agent = Agent(cfg)
    srv = serve(agent, cfg)
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        assert srv.token_file is not None
        token = srv.token_file.read_text().strip()
        client = Client(srv.url, token, ca_file=cert)
        assert client.get("/v1/services") == []
        assert client.get("/v1/services") == []  # same TLS connection, kept alive
        with pytest.raises(AgentUnreachable, match="not reachable"):
            Client(srv.url, token).get("/v1/health")  # certificate not trusted
        plain = Client(srv.url.replace("https://", "http://"), token, timeout=5)
        with pytest.raises((AgentUnreachable, RemoteError)):
            plain.get("/v1/health")
        assert ssl.get_server_certificate(srv.server_address[:2], timeout=10)
    finally:
        srv.shutdown()
        agent.close()
