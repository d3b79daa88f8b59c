"""What `mcp` loads to start: the root group lists every command from its table
(name and one-line help) and imports a command's module only when that command
runs, so each call imports what it needs and no more."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mcp_node.cli import COMMANDS, cli

MODULES = sorted({target.partition(":")[0] for target, _help in COMMANDS.values()})

# Runs one mcp command in a fresh interpreter and says which project modules it imported.
PROBE = """
import json, sys
from click.testing import CliRunner
from mcp_node.cli import cli
res = CliRunner().invoke(cli, sys.argv[1:])
print(json.dumps({"exit": res.exit_code, "output": res.output,
                  "modules": sorted(m for m in sys.modules
                                    if m.startswith("mcp_node.") or m == "tomllib")}))
"""


def test_table_help_is_each_commands_own() -> None:
    ctx = click.Context(cli)
    for name, (_target, help_text) in COMMANDS.items():
        cmd = cli.get_command(ctx, name)
        assert cmd is not None and cmd.name == name
        listed = click.Command(name, help=help_text)   # what `mcp --help` shows
        for limit in (20, 45, 62, 500):
            assert listed.get_short_help_str(limit) == cmd.get_short_help_str(limit), name


def test_every_command_a_module_defines_is_in_the_table() -> None:
    listed = {target for target, _help in COMMANDS.values()}
    for module in MODULES:
        attrs = vars(importlib.import_module(f"mcp_node.{module}"))
        cmds = {a: v for a, v in attrs.items() if isinstance(v, click.Command)}
        nested = {id(c) for v in cmds.values() if isinstance(v, click.Group)
                  for c in v.commands.values()}
        top = {f"{module}:{a}" for a, v in cmds.items() if id(v) not in nested}
        assert top == {t for t in listed if t.startswith(f"{module}:")}, module


def test_help_lists_every_command() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    listed = out.split("Commands:\n", 1)[1].splitlines()
    assert [ln.split()[0] for ln in listed] == sorted([*COMMANDS, "completion"])


def probe(tmp_path: Path, *args: str) -> dict[str, object]:
    with socket.socket() as s:   # a port nothing listens on: the call is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_")}
    env.update(MCP_AGENT=f"http://127.0.0.1:{port}", XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


COMMAND_MODULES = {f"mcp_node.{m}" for m in MODULES}
PARSER = {"mcp_node.servicedef", "mcp_node.grammar", "tomllib"}


def test_help_imports_no_command_module(tmp_path: Path) -> None:
    r = probe(tmp_path, "--help")
    assert r["exit"] == 0 and "deploy" in str(r["output"])
    loaded = set(r["modules"])  # type: ignore[call-overload]
    assert not loaded & (COMMAND_MODULES | PARSER | {"mcp_node.client"}), loaded


@pytest.mark.parametrize(("args", "module"), [
    (("ps",), "mcp_node.cliread"),
    (("stop", "web"), "mcp_node.cliservice"),
    (("nodes",), "mcp_node.clifleet"),
    (("edge", "list"), "mcp_node.cliedge"),
])
def test_a_command_loads_its_module_and_not_the_parser(tmp_path: Path, args: tuple[str, ...],
                                                        module: str) -> None:
    r = probe(tmp_path, *args)
    assert r["exit"] == 1 and "not reachable" in str(r["output"])
    loaded = set(r["modules"])  # type: ignore[call-overload]
    assert loaded & COMMAND_MODULES == {module}
    assert not loaded & PARSER, loaded


def test_deploy_loads_the_parser_not_the_runtime_interface(tmp_path: Path) -> None:
    path = tmp_path / "web.toml"
    path.write_text('name = "web"\n[[components]]\nname = "web"\nimage = "localhost/x:1"\n')
    r = probe(tmp_path, "--json", "deploy", str(path))
    assert r["exit"] == 1 and "not reachable" in str(r["output"])
    loaded = set(r["modules"])  # type: ignore[call-overload]
    assert loaded & COMMAND_MODULES == {"mcp_node.clideploy"}
    assert loaded >= PARSER and "mcp_node.runtimenames" in loaded
    # One node: no fan-out; --json: no text views; the names only, not the ABCs behind them.
    assert not loaded & {"mcp_node.runtime", "mcp_node.multinode", "mcp_node.cliformat",
                         "mcp_node.agent"}, loaded


def test_validate_loads_the_parser_not_the_agent(tmp_path: Path) -> None:
    """No agent answers the probe: the note, from what deploy's start-up loads, no more."""
    path = tmp_path / "web.toml"
    path.write_text('name = "web"\n[[components]]\nname = "web"\nimage = "localhost/x:1"\n')
    r = probe(tmp_path, "validate", str(path))
    assert r["exit"] == 0 and "checked locally only" in str(r["output"])
    loaded = set(r["modules"])  # type: ignore[call-overload]
    assert loaded & COMMAND_MODULES == {"mcp_node.clideploy"}
    assert not loaded & {"mcp_node.runtime", "mcp_node.multinode", "mcp_node.agent",
                         "mcp_node.preflight"}, loaded
