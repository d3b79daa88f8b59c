"""Untrusted text in and out (issue 16): definitions and bodies nested too deep or with
a key twice are one clear error naming where they came from, and control characters
reach neither a log line of the agent nor a terminal through ``mcp`` unescaped."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.agent_cli import KeyValueFormatter, setup_logging
from mcp_node.cli import cli
from mcp_node.clictx import Ctx, LocalBackend
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import ValidationError, WorkloadError
from mcp_node.httpapi import parse_json
from mcp_node.records import Event
from mcp_node.safetext import MAX_DEPTH, escape_controls, for_terminal
from mcp_node.servicedef import from_dict
from mcp_node.states import RUNNING

DEEP = f"nested deeper than {MAX_DEPTH} levels (the limit)"
DEF = 'name = "shop"\n[[components]]\nname = "web"\nimage = "img:v1"\n'


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def local_cli(world: FakeWorld, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    """``mcp`` against an in-process agent on the fake runtime."""
    agent = Agent(config_from_dict({"state": {"dir": str(tmp_path / "state")}}),
                  runtimes=world.runtimes())
    monkeypatch.setattr(Ctx, "backends", lambda self: [LocalBackend(agent)])
    try:
        yield agent
    finally:
        agent.close()


def mcp(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)

# -- nesting depth and duplicate keys ---------------------------------------------------


def deep_toml(levels: int) -> str:
    return DEF + "cmd = " + "[" * levels + "]" * levels + "\n"


def deep_json(levels: int) -> str:
    return json.dumps({"name": "shop", "components": []})[:-1] + ', "x": ' + \
        "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 3000])
def test_a_deep_toml_definition_is_one_error_naming_the_file_and_limit(
        tmp_path: Path, levels: int) -> None:
    f = tmp_path / "deep.toml"
    f.write_text(deep_toml(levels))
    res = mcp("validate", str(f))
    assert (res.exit_code, res.stderr) == (1, f"Error: {f}: {DEEP}\n")
    res = mcp("validate", "-", input=deep_toml(levels))
    assert (res.exit_code, res.stderr) == (1, f"Error: stdin: {DEEP}\n")


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 3000])
def test_a_deep_json_definition_is_one_error_naming_the_file_and_limit(
        tmp_path: Path, levels: int) -> None:
    f = tmp_path / "deep.json"
    f.write_text(deep_json(levels))
    res = mcp("validate", str(f))
    assert (res.exit_code, res.stderr) == (1, f"Error: {f}: {DEEP}\n")
    res = mcp("validate", "-", input=deep_json(levels))
    assert (res.exit_code, res.stderr) == (1, f"Error: stdin: {DEEP}\n")


def test_a_deep_request_body_is_a_400_naming_the_body() -> None:
    for levels in (MAX_DEPTH + 1, 5000):
        with pytest.raises(ValidationError, match=f"^body: {re.escape(DEEP)}$"):
            parse_json(("[" * levels + "]" * levels).encode())
    assert parse_json(("[" * MAX_DEPTH + "]" * MAX_DEPTH).encode()) is not None


def test_the_cli_refuses_duplicate_json_keys_as_the_api_does(tmp_path: Path) -> None:
    text = '{"name": "shop", "name": "other", "components": []}'
    f = tmp_path / "dup.json"
    f.write_text(text)
    res = mcp("validate", str(f))
    assert (res.exit_code, res.stderr) == (1, f"Error: {f}: duplicate key 'name' in a "
                                              "JSON object\n")
    res = mcp("validate", "-", input=text)
    assert (res.exit_code, res.stderr) == (1, "Error: stdin: duplicate key 'name' in a "
                                              "JSON object\n")
    with pytest.raises(ValidationError, match="^body: duplicate key 'name' in a JSON"):
        parse_json(text.encode())


# -- control characters -----------------------------------------------------------------

NASTY = "/srv/\x1b]0;pwned\x07\x1b[2J\x9b\u202e\r\nts=forged level=info"
SHOWN = "/srv/\\x1b]0;pwned\\x07\\x1b[2J\\x9b\\u202e\\x0d\\x0ats=forged level=info"
SHOWN_LINES = "/srv/\\x1b]0;pwned\\x07\\x1b[2J\\x9b\\u202e\\x0d\nts=forged level=info"


def test_escape_functions() -> None:
    assert escape_controls(NASTY) == SHOWN
    assert escape_controls("plain é ✓") == "plain é ✓"
    assert for_terminal("a\tb\nc\x1b[0m\x7f") == "a\tb\nc\\x1b[0m\\x7f"
    assert for_terminal(NASTY) == SHOWN_LINES


def test_every_agent_log_line_has_its_control_characters_escaped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("info")
        assert isinstance(root.handlers[0].formatter, KeyValueFormatter)
        log = logging.getLogger("mcp_node.test")
        log.info("volume %s refused", NASTY)
        try:
            raise WorkloadError(f"mount {NASTY}")
        except WorkloadError:
            log.exception("deploy failed")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    out = err.getvalue()
    lines = out.splitlines()
    assert lines[0].endswith(f"logger=mcp_node.test volume {SHOWN} refused")
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert not any(ln.startswith("ts=forged") for ln in lines)
    # a traceback keeps its line breaks, indented under its record
    assert f"WorkloadError: mount {SHOWN_LINES.replace(chr(10), chr(10) + '  ')}\n" in out


def nasty_event(agent: Agent) -> None:
    agent.deploy(from_dict({"name": "shop", "components": [{"name": "web", "image": "i:1"}]}))
    agent.registry.record_observed([Event("shop", "web", 1e9, RUNNING, RUNNING,
                                          f"mount {NASTY} failed")])


def test_mcp_events_escapes_control_characters_json_stays_json(local_cli: Agent) -> None:
    nasty_event(local_cli)
    res = mcp("events", "shop")
    assert res.exit_code == 0
    line = res.output.splitlines()[-1]
    assert line.endswith(f"shop/web: running -> running (mount {SHOWN} failed)")
    assert "\x1b" not in res.output
    res = mcp("events", "shop", "--json")
    assert json.loads(res.output)[-1]["detail"] == f"mount {NASTY} failed"
    assert "\x1b" not in res.output


def test_mcp_status_and_errors_escape_control_characters(local_cli: Agent,
                                                         world: FakeWorld) -> None:
    nasty_event(local_cli)
    res = mcp("status", "shop")
    assert res.exit_code == 0 and f"mount {SHOWN} failed" in res.output
    assert "\x1b" not in res.output
    world.fail("stop", "web", WorkloadError(f"podman: {NASTY}"))
    res = mcp("stop", "shop")
    assert res.exit_code == 1
    assert res.stderr == f"Error: podman: {SHOWN_LINES}\n"   # an error may span lines


def test_deep_config_files_are_one_error_naming_the_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp_node.agent_cli import main
    from mcp_node.auth import TokenStore
    from mcp_node.errors import TokenStoreError

    deep = "x = " + "[" * 3000 + "]" * 3000 + "\n"
    cli_conf = tmp_path / "mcp.toml"
    cli_conf.write_text(deep)
    monkeypatch.setenv("MCP_CLI_CONFIG", str(cli_conf))
    res = mcp("ps")
    assert (res.exit_code, res.stderr) == (1, f"Error: cannot read {cli_conf}: {DEEP}\n")
    agent_conf = tmp_path / "agent.toml"
    agent_conf.write_text(deep)
    res = CliRunner().invoke(main, ["--config", str(agent_conf), "check-config"])
    assert res.exit_code == 1 and res.stderr.endswith(
        f"cannot load config {agent_conf}: {DEEP}\n")
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(deep)
    tokens.chmod(0o600)
    with pytest.raises(TokenStoreError, match=f"^{re.escape(f'{tokens}: {DEEP}')}$"):
        TokenStore(tokens)
