"""Issue 22 row 13: one name for a node. ``mcp deploy`` (and rollback, start, restart)
name the node as mcp.toml's [[nodes]] does, the name ``status`` and ``ps`` show, never
the agent's host name. A live agent on real podman, exact output and exit code."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from server_env import LiveServer

from mcp_node.cli import cli

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")
UPTIME = re.compile(r"(?<=  )\d{1,2}s +(?=\d)")   # under a minute: the column keeps its width
PORT = re.compile(r"127\.0\.0\.1:\d+")
DIGEST = re.compile(r"(?<=@)[0-9a-f]{12}|(?<=  )[0-9a-f]{64}(?=  )")


def norm(text: str) -> str:
    """Times, ports, uptimes under a minute and digests: what varies run to run."""
    t = TIME.sub("T", text)
    t = UPTIME.sub(lambda m: "Ns".ljust(len(m.group())), t)
    t = DIGEST.sub(lambda m: "D".ljust(len(m.group())), t)
    return PORT.sub(lambda m: "127.0.0.1:P".ljust(len(m.group())), t)


@pytest.fixture
def named_node(live_server: LiveServer, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    """The live agent as mcp.toml's node ``n2``, a name other than the host's."""
    assert socket.gethostname().split(".")[0] != "n2"
    conf = tmp_path / "mcp.toml"
    conf.write_text(f'[[nodes]]\nname = "n2"\naddress = "{live_server.url}"\n'
                    f'token_path = "{live_server.server.token_file}"\n')
    monkeypatch.setenv("MCP_CLI_CONFIG", str(conf))
    monkeypatch.delenv("MCP_AGENT", raising=False)
    monkeypatch.delenv("MCP_TOKEN_FILE", raising=False)
    return live_server


def mcp(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_deploy_names_the_configured_node(named_node: LiveServer, hello_image: str,
                                          tmp_path: Path) -> None:
    defn = tmp_path / "words.toml"
    defn.write_text(f'name = "words"\n[[components]]\nname = "web"\nimage = "{hello_image}"\n'
                    "check = \"none\"\n[[components.routes]]\nport = 8080\n")
    r = mcp("deploy", str(defn))
    print(r.output)
    assert (r.exit_code, r.stderr) == (0, ""), r.output
    head = norm(r.stdout).splitlines()[:2]
    assert head == ["deployed words", "service words on n2: active"], r.stdout
    r = mcp("status", "words")
    assert r.exit_code == 0, r.output
    assert norm(r.stdout).splitlines()[0] == "service words on n2: active", r.stdout
    r = mcp("ps")
    assert r.exit_code == 0, r.output
    lines = norm(r.stdout).splitlines()
    assert lines[0].split() == ["SERVICE", "COMPONENT", "NODE", "RUNTIME", "STATE", "VERSION",
                                "UPTIME", "PORTS"], r.stdout
    assert lines[1].split()[:3] == ["words", "web", "n2"], r.stdout
    for cmd in (["restart", "words"], ["start", "words"]):
        r = mcp(*cmd)
        assert r.exit_code == 0, r.output
        assert norm(r.stdout).splitlines()[1] == "service words on n2: active", r.stdout
