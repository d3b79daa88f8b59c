"""Issue 22: what a new operator trips on, each row with its exact output and exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from live_server import fake_live

from mcp_node.agent_cli import main as agent_main
from mcp_node.auth import TokenStore
from mcp_node.cli import cli


def mcp(url: str, token_file: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--agent", url, "--token-file", str(token_file), *args],
                              catch_exceptions=False)


PLAN_DUO = "duo: 2 change(s)\n  create web (new component)\n  create db (new component)\n"


def duo(tmp_path: Path) -> Path:
    svc = tmp_path / "duo.toml"
    svc.write_text('name = "duo"\n[[components]]\nname = "web"\nimage = "img:v1"\n'
                   '[[components]]\nname = "db"\nimage = "img:v1"\n')
    return svc


def test_plan_of_a_service_not_deployed_is_a_create(tmp_path: Path) -> None:
    svc = duo(tmp_path)
    with fake_live(tmp_path) as live:
        tok = tmp_path / "tok"
        tok.write_text(live.token("operator"))
        tok.chmod(0o600)
        r = mcp(live.url, tok, "plan", str(svc))
    assert (r.exit_code, r.output) == (3, PLAN_DUO)


def test_plan_of_a_service_no_node_has_plans_a_create(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fleet of nodes (mcp.toml [[nodes]]), a service no node has yet is a create:
    planned on the first node (deploy picks one with -n), its stdout the plan as ever."""
    svc = duo(tmp_path)
    with fake_live(tmp_path / "a") as a, fake_live(tmp_path / "b") as b:
        conf = tmp_path / "mcp.toml"
        conf.write_text("".join(f'[[nodes]]\nname = "{n}"\naddress = "{x.url}"\n'
                                f'token_path = "{x.server.token_file}"\n'
                                for n, x in (("n1", a), ("n2", b))))
        monkeypatch.setenv("MCP_CLI_CONFIG", str(conf))
        r = CliRunner().invoke(cli, ["plan", str(svc)], catch_exceptions=False)
    assert (r.exit_code, r.stdout) == (3, PLAN_DUO), r.stderr
    assert r.stderr == ("note: 'duo' is on no node yet (n1, n2 answered); planned on n1, "
                        "deploy it with -n NODE\n")


def test_token_add_says_where_it_wrote(tmp_path: Path, _isolated_state: Path) -> None:
    out = tmp_path / "f"
    r = CliRunner().invoke(agent_main, ["token", "add", "ci-bot", "reader", "--output", str(out)])
    assert (r.exit_code, r.stdout) == (0, (
        f"added token ci-bot (reader) to {_isolated_state / 'tokens.toml'} (state dir "
        f"{_isolated_state}, the default: no --config or --state-dir given)\n"
        f"token written to {out} (mode 0600)\n"))
    state = tmp_path / "st"
    r = CliRunner().invoke(agent_main, ["token", "add", "ci2", "reader", "--state-dir",
                                        str(state), "--output", str(tmp_path / "g")])
    assert (r.exit_code, r.stdout) == (0, (
        f"added token ci2 (reader) to {state / 'tokens.toml'} (state dir {state})\n"
        f"token written to {tmp_path / 'g'} (mode 0600)\n"))
    r = CliRunner().invoke(agent_main, ["token", "add", "ci3", "operator", "--state-dir",
                                        str(state)])
    assert r.exit_code == 0 and r.stdout.startswith("mcp_") and r.stdout.count("\n") == 1
    assert r.stderr == (f"added token ci3 (operator) to {state / 'tokens.toml'} "
                        f"(state dir {state})\n")
    assert [t.name for t in TokenStore(state / "tokens.toml").tokens] == ["ci2", "ci3"]


def test_a_token_works_right_after_token_add(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent re-reads its tokens file on a miss when the file changed (one stat per
    miss at most): the new token is accepted at once, an attacker's invalid tokens read
    nothing while the file stays as it is."""
    with fake_live(tmp_path) as live:
        state = tmp_path / "state"
        tok = tmp_path / "ci-bot.tok"
        op = tmp_path / "op.tok"
        op.write_text(live.token("operator"))
        op.chmod(0o600)
        assert mcp(live.url, op, "ps").exit_code == 0      # the store was just checked
        r = CliRunner().invoke(agent_main, ["token", "add", "ci-bot", "reader",
                                            "--state-dir", str(state), "--output", str(tok)])
        assert r.exit_code == 0, r.output
        for _ in range(3):
            r = mcp(live.url, tok, "ps")
            assert (r.exit_code, r.stderr) == (0, ""), r.output
        store = live.server.tokens
        reads = []
        real = store._read
        monkeypatch.setattr(store, "_read", lambda: reads.append(1) or real())
        bad = tmp_path / "bad.tok"
        bad.write_text("mcp_not-a-token")
        bad.chmod(0o600)
        for _ in range(5):
            assert mcp(live.url, bad, "ps").exit_code == 1
        assert reads == []


def test_token_rotate_force_and_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rotate --output onto an existing file needs --force; --grace-s keeps the old token
    working at the live agent until the stored end, then it is refused."""
    from mcp_node import auth

    now = 1_800_000_000.0
    monkeypatch.setattr(auth, "wall_clock", lambda: now)
    with fake_live(tmp_path) as live:
        state = tmp_path / "state"
        tok, tokens = tmp_path / "ci-bot.tok", state / "tokens.toml"

        def agent(*args: str) -> Result:
            return CliRunner().invoke(agent_main, ["token", *args, "--state-dir", str(state)])

        assert agent("add", "ci-bot", "reader", "--output", str(tok)).exit_code == 0
        old = tmp_path / "old.tok"
        old.write_text(tok.read_text())
        old.chmod(0o600)
        r = agent("rotate", "ci-bot", "--output", str(tok))
        assert (r.exit_code, r.stderr) == (
            1, f"Error: {tok} exists; remove it or choose another --output\n")
        r = agent("rotate", "ci-bot", "--output", str(tok), "--force", "--grace-s", "600")
        assert (r.exit_code, r.stdout) == (0, (
            f"rotated token ci-bot (reader) in {tokens} (state dir {state}); the old one "
            "works until 2027-01-15T08:10:00Z (--grace-s 600)\n"
            f"token written to {tok} (mode 0600)\n"))
        assert tok.read_text() != old.read_text()
        assert 'previous_until = "2027-01-15T08:10:00Z"\n' in tokens.read_text()
        assert agent("list").stdout == (
            "initial\toperator\nci-bot\treader\told token until 2027-01-15T08:10:00Z\n")
        assert mcp(live.url, tok, "ps").exit_code == 0
        assert mcp(live.url, old, "ps").exit_code == 0     # in its grace
        now += 600
        r = mcp(live.url, old, "ps")
        assert r.exit_code == 1 and r.stderr.startswith("Error: invalid token (node ")
        assert mcp(live.url, tok, "ps").exit_code == 0
        assert agent("list").stdout == "initial\toperator\nci-bot\treader\n"
        r = agent("rotate", "ci-bot", "--output", str(tok), "--force")
        assert (r.exit_code, r.stdout) == (0, (
            f"rotated token ci-bot (reader) in {tokens} (state dir {state}); the old one "
            "no longer works\n"
            f"token written to {tok} (mode 0600)\n"))
        assert "previous" not in tokens.read_text()   # an ended grace is dropped at a write


def test_a_grace_period_in_the_tokens_file_is_checked() -> None:
    from mcp_node.auth import Token, parse_tokens, render_tokens
    from mcp_node.errors import TokenStoreError

    t = Token("a", "reader", "a" * 64, "b" * 64, 1_800_000_600.0)
    assert parse_tokens(render_tokens([t]), "f") == [t]
    bad = render_tokens([t]).replace("2027-01-15T08:10:00Z", "tomorrow")
    with pytest.raises(TokenStoreError, match=r"^f: tokens\[0\]\.previous_until: must be a "
                                              r"UTC time like 2026-01-02T03:04:05Z$"):
        parse_tokens(bad, "f")
    with pytest.raises(TokenStoreError, match=r"previous_sha256: must be 64 hex digits"):
        parse_tokens(render_tokens([t]).replace("b" * 64, "xyz"), "f")


def test_no_token_file_says_it_is_missing_and_where_the_agents_is(
        tmp_path: Path, _isolated_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp_node import clictx

    unit = tmp_path / "var-lib-mcp"
    monkeypatch.setattr(clictx, "UNIT_STATE_DIR", unit)
    with fake_live(tmp_path) as live:
        monkeypatch.setenv("MCP_AGENT", live.url)
        r = CliRunner().invoke(cli, ["ps"])
        assert (r.exit_code, r.stdout, r.stderr) == (1, "", (
            f"Error: token file {_isolated_state / 'token'} does not exist, so no token was "
            f"sent (node {live.url}); the agent writes its own operator token to "
            "<state dir>/token on first start, the state dir it runs with (mcp-agent "
            f"--state-dir, [state] dir; the systemd unit's is {unit}): pass that file with "
            "--token-file FILE or $MCP_TOKEN_FILE\n"))
        unit.mkdir()
        (unit / "token").write_text("x")
        r = CliRunner().invoke(cli, ["ps"])
        assert (r.exit_code, r.stderr) == (1, (
            f"Error: token file {_isolated_state / 'token'} does not exist, so no token was "
            f"sent (node {live.url}); the agent writes its own operator token to "
            "<state dir>/token on first start, and this machine has one: "
            f"{unit / 'token'} (the systemd unit's): pass it with --token-file "
            f"{unit / 'token'} or $MCP_TOKEN_FILE\n"))


def test_every_error_of_mcp_toml_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "mcp.toml"
    conf.write_text('token_pth = "/t"\nservics_dir = "/s"\n[[nodes]]\nname = "a"\n'
                    'address = "h:1"\nca_file = "x"\n[[nodes]]\nname = 5\naddress = "h:2"\n')
    monkeypatch.setenv("MCP_CLI_CONFIG", str(conf))
    r = CliRunner().invoke(cli, ["ps"])
    assert (r.exit_code, r.stderr) == (1, (
        "Error: 4 errors:\n"
        f"  {conf}: token_pth: unknown key 'token_pth' (did you mean 'token_path'?)\n"
        f"  {conf}: servics_dir: unknown key 'servics_dir' (did you mean 'services_dir'?)\n"
        f"  {conf}: nodes[0].ca_file: unknown key 'ca_file' (known: name, address, "
        "token_path, ca)\n"
        f"  {conf}: nodes[1].name: must be a string\n"))


def test_every_error_of_a_definition_at_once(tmp_path: Path) -> None:
    svc = tmp_path / "duo.toml"
    svc.write_text('name = "duo"\nactiv = false\n[[components]]\nname = "web"\nimgae = "i"\n'
                   'memory_mb = "lots"\n[[components]]\nname = "db"\nimage = "i"\n'
                   'volume = ["/a:/b"]\n[components.routes]\nport = 0\n[update]\norder = "x"\n')
    r = CliRunner().invoke(cli, ["validate", str(svc)])
    assert (r.exit_code, r.stderr) == (1, (
        "Error: 7 errors:\n"
        "  activ: unknown key 'activ' (did you mean 'active'?)\n"
        "  components[0].imgae: unknown key 'imgae' (did you mean 'image'?)\n"
        "  components[0].image: must be a string\n"
        "  components[0].memory_mb: must be an integer\n"
        "  components[1].volume: unknown key 'volume' (did you mean 'volumes'?)\n"
        "  components[1].routes: must be a list of tables\n"
        "  update.order: 'x' is not stop-first or start-first\n"))


def test_every_error_of_a_deploy_body_in_one_400(tmp_path: Path) -> None:
    body = b'{"name": "duo", "components": [{"name": "web", "imgae": "i"}], "nod": ""}'
    with fake_live(tmp_path) as live:
        r = live.request("POST", "/v1/services", body)
    assert (r.status, r.json()) == (400, {"error": {"code": "invalid", "message": (
        "3 errors:\n  nod: unknown key 'nod' (did you mean 'node'?)\n"
        "  components[0].imgae: unknown key 'imgae' (did you mean 'image'?)\n"
        "  components[0].image: must be a string")}})


def test_tokens_at_a_real_agent_work_at_once_and_in_their_grace(tmp_path: Path,
                                                               podman_socket: str) -> None:
    """Rows 6 and 7 against mcp-agent as its own process: a token from `token add` (another
    process) is accepted by the very next request; `rotate --grace-s` keeps the old one
    working, a rotate without it ends it at once."""
    import subprocess
    import sys

    from daemon_env import podman_daemon

    def agent_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(Path(sys.executable).parent / "mcp-agent"), "token", *args,
                               "--state-dir", str(d.state)], capture_output=True, text=True,
                              timeout=60)

    with podman_daemon(tmp_path, podman_socket) as d:
        d.start()
        assert d.mcp("ps").exit_code == 0          # the agent just looked at its tokens
        tok, old = tmp_path / "ci-bot.tok", tmp_path / "old.tok"
        r = agent_cmd("add", "ci-bot", "reader", "--output", str(tok))
        assert (r.returncode, r.stdout) == (0, (
            f"added token ci-bot (reader) to {d.state / 'tokens.toml'} (state dir "
            f"{d.state})\ntoken written to {tok} (mode 0600)\n"))
        for _ in range(3):
            r2 = mcp(d.url, tok, "ps")
            assert (r2.exit_code, r2.stderr) == (0, "")
        old.write_text(tok.read_text())
        old.chmod(0o600)
        r = agent_cmd("rotate", "ci-bot", "--output", str(tok), "--force", "--grace-s", "600")
        assert r.returncode == 0 and r.stdout.startswith(
            f"rotated token ci-bot (reader) in {d.state / 'tokens.toml'} (state dir "
            f"{d.state}); the old one works until "), r.stderr
        assert mcp(d.url, tok, "ps").exit_code == 0
        assert mcp(d.url, old, "ps").exit_code == 0
        r = agent_cmd("rotate", "ci-bot", "--output", str(tok), "--force")
        assert r.returncode == 0 and r.stdout.endswith(
            "; the old one no longer works\n" f"token written to {tok} (mode 0600)\n")
        assert mcp(d.url, tok, "ps").exit_code == 0
        r2 = mcp(d.url, old, "ps")
        assert r2.exit_code == 1 and r2.stderr.startswith("Error: invalid token (node ")
