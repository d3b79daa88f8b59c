"""mcp-agent's own commands, in-process with CliRunner: tokens (add --output, remove,
rotate) against the real token store, and check-config listing every error."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner, Result

from mcp_node.agent_cli import main
from mcp_node.auth import TokenStore, hash_token
from mcp_node.clictx import read_token_file


def agent(state: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--state-dir", str(state), *args])


def store(state: Path) -> TokenStore:
    return TokenStore(state / "tokens.toml")


def test_token_add_output_remove_rotate(tmp_path: Path) -> None:
    state = tmp_path / "st"
    out = tmp_path / "bot.tok"
    res = agent(state, "token", "add", "bot", "reader", "--output", str(out))
    assert (res.exit_code, res.stdout) == (0, f"added token bot (reader) to {state}/tokens.toml "
                                              f"(state dir {state})\n"
                                              f"token written to {out} (mode 0600)\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = read_token_file(out)                  # the CLI accepts it as it is
    assert store(state).lookup(first) is not None
    res = agent(state, "token", "add", "bot2", "reader", "--output", str(out))
    assert (res.exit_code, res.stderr) == (
        1, f"Error: {out} exists; remove it or choose another --output\n")
    assert [t.name for t in store(state).tokens] == ["bot"]   # nothing half-made

    res = agent(state, "token", "rotate", "bot")
    assert res.exit_code == 0
    second = res.stdout.strip()
    s = store(state)
    assert s.lookup(first) is None and s.lookup(second) is not None
    assert [(t.name, t.role, t.sha256) for t in s.tokens] == [
        ("bot", "reader", hash_token(second))]

    assert agent(state, "token", "remove", "bot").stdout == (
        f"removed token bot from {state}/tokens.toml (state dir {state})\n")
    assert store(state).lookup(second) is None
    res = agent(state, "token", "remove", "bot")
    assert (res.exit_code, res.stderr) == (1, "Error: no token named 'bot' (tokens: none)\n")
    res = agent(state, "token", "rotate", "ghost")
    assert res.exit_code == 1 and "no token named 'ghost'" in res.stderr


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[server]\nlisten = 9444\nmax_body = 0\nbogus = 1\n'
                    '[monitor]\ninterval_s = inf\n[qemu]\naccel = "fast"\n[nope]\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert lines[-1] == f"Error: {conf}: 6 error(s)"
    fields = sorted(ln.split(": ")[1] for ln in lines[:-1])
    assert fields == ["monitor.interval_s", "nope", "qemu.accel", "server.bogus",
                      "server.listen", "server.max_body"]
    conf.write_text('[monitor]\ninterval_s = 2\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert (res.exit_code, res.stdout) == (0, f"{conf}: ok\n")
    res = CliRunner().invoke(main, ["check-config"])
    assert (res.exit_code, res.stdout) == (0, "no config file: the embedded defaults apply\n")


def test_check_config_reports_what_the_start_would_refuse_or_degrade(tmp_path: Path) -> None:
    """Issue 22 row 3: a non-loopback listen without TLS passed check-config and then
    the start refused it; a nanos_dir without the files passed and health said healthy."""
    conf = tmp_path / "agent.toml"
    conf.write_text('[server]\nlisten = "0.0.0.0:9444"\n[qemu]\nnanos_dir = "/nonexistent"\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        f"{conf}: warning: qemu.nanos_dir = '/nonexistent': Nanos files (kernel.img, "
        "boot.img, mkfs missing in /nonexistent)",
        f"{conf}: server.listen: 0.0.0.0:9444 is not a loopback address; listening on it "
        "needs server.tls_cert and server.tls_key (HTTPS)",
        f"Error: {conf}: 1 error(s)"]
    conf.write_text('[qemu]\nnanos_dir = "/nonexistent"\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert (res.exit_code, res.stdout) == (0, f"{conf}: ok (1 warning(s))\n")


def test_health_names_a_configured_builder_that_cannot_work(tmp_path: Path) -> None:
    from mcp_node.config import from_dict
    from mcp_node.qemu import QemuRuntime

    cfg = from_dict({"state": {"dir": str(tmp_path)}, "qemu": {"nanos_dir": "/nonexistent"}})
    rt = QemuRuntime(cfg, tmp_path, "owner1")
    assert rt.health_reasons() == [
        "unikernel: qemu.nanos_dir = '/nonexistent': Nanos files (kernel.img, boot.img, "
        "mkfs missing in /nonexistent)"]
    ok = from_dict({"state": {"dir": str(tmp_path)}})
    assert QemuRuntime(ok, tmp_path, "owner1").health_reasons() == []
