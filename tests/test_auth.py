"""Token store: hashing, roles, file mode, first-start token, ``mcp-agent token add``."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from mcp_node.agent_cli import main
from mcp_node.auth import (
    Token,
    TokenStore,
    hash_token,
    parse_tokens,
    render_tokens,
    tokens_path,
)
from mcp_node.clictx import read_token_file
from mcp_node.config import from_dict
from mcp_node.errors import AuthError, ForbiddenError, TokenStoreError, ValidationError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_stores_only_the_hash(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.toml")
    token = store.add("ci", "reader")
    text = (tmp_path / "tokens.toml").read_text()
    assert token not in text and hash_token(token) in text
    assert mode(tmp_path / "tokens.toml") == 0o600
    assert store.lookup(token) == Token("ci", "reader", hash_token(token))
    assert store.lookup(token + "x") is None
    # a second store instance (another process) sees the same tokens
    assert TokenStore(tmp_path / "tokens.toml").lookup(token) is not None


def test_roles_are_ordered(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.toml")
    tokens = {role: store.add(f"t-{role}", role) for role in ("reader", "operator", "master")}
    assert store.authorize(f"Bearer {tokens['reader']}", "reader").name == "t-reader"
    with pytest.raises(ForbiddenError, match="needs operator"):
        store.authorize(f"Bearer {tokens['reader']}", "operator")
    assert store.authorize(f"Bearer {tokens['operator']}", "operator").role == "operator"
    with pytest.raises(ForbiddenError):
        store.authorize(f"Bearer {tokens['operator']}", "master")
    for least in ("reader", "operator", "master"):
        assert store.authorize(f"bearer {tokens['master']}", least).role == "master"
    for header in (None, "", "Bearer", "Bearer ", "Basic abc", "Bearer wrong"):
        with pytest.raises(AuthError) as exc:
            store.authorize(header, "reader")
        assert exc.value.status == 401


def test_bad_names_roles_and_duplicates(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.toml")
    store.add("one", "operator")
    with pytest.raises(ValidationError, match="already exists"):
        store.add("one", "reader")
    with pytest.raises(ValidationError, match="role"):
        store.add("two", "admin")
    for bad in ("../x", "a,b", "UPPER", "", 'q"uote'):
        with pytest.raises(ValidationError, match="name"):
            store.add(bad, "reader")
    assert [t.name for t in TokenStore(tmp_path / "tokens.toml").tokens] == ["one"]


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_tokens_file_must_be_private(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "tokens.toml"
    TokenStore(path).add("one", "reader")
    os.chmod(path, bad_mode)
    with pytest.raises(TokenStoreError, match=r"must be 0600.*chmod 600"):
        TokenStore(path)
    os.chmod(path, 0o600)
    store = TokenStore(path)
    os.chmod(path, bad_mode)
    with pytest.raises(TokenStoreError, match="must be 0600"):
        store.add("two", "reader")


def test_running_store_fails_closed_when_file_turns_public(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    store = TokenStore(path)
    token = store.add("one", "reader")
    assert store.authorize(f"Bearer {token}", "reader")
    os.chmod(path, 0o644)
    store.reload(force=True)
    with pytest.raises(TokenStoreError, match="unusable"):
        store.authorize(f"Bearer {token}", "reader")
    os.chmod(path, 0o600)
    store.reload(force=True)
    assert store.authorize(f"Bearer {token}", "reader").name == "one"


def test_tokens_file_parse_errors() -> None:
    digest = "a" * 64
    good = f'[[tokens]]\nname = "a"\nrole = "reader"\nsha256 = "{digest}"\n'
    assert parse_tokens(good, "f") == [Token("a", "reader", digest)]
    for text, msg in (
        ("[[tokens]\n", "not valid TOML"),
        ('other = 1\n', "unknown key 'other'"),
        (good.replace("reader", "root"), "role"),
        (good.replace('"a"', '"../a"'), "name"),
        (good.replace(digest, "xyz"), "sha256"),
        (good + 'extra = 1\n', "unknown key 'extra'"),
        (good + good, "duplicate"),
        ("tokens = 5\n", "array of tables"),
    ):
        with pytest.raises(TokenStoreError, match=msg):
            parse_tokens(text, "f")
    tokens = [Token("a", "reader", digest), Token("b-2", "master", "b" * 64)]
    assert parse_tokens(render_tokens(tokens), "f") == tokens


def test_first_start_token(tmp_path: Path) -> None:
    cfg = from_dict({"state": {"dir": str(tmp_path / "state")}})
    store = TokenStore.for_config(cfg)
    token_file = cfg.state_dir / "token"
    assert store.ensure_initial(token_file) == token_file
    assert mode(token_file) == 0o600 and mode(tokens_path(cfg)) == 0o600
    token = read_token_file(token_file)
    assert store.authorize(f"Bearer {token}", "operator").name == "initial"
    with pytest.raises(ForbiddenError):
        store.authorize(f"Bearer {token}", "master")
    assert token not in tokens_path(cfg).read_text()
    # second start: nothing regenerated
    before = token_file.read_text()
    assert TokenStore.for_config(cfg).ensure_initial(token_file) is None
    assert token_file.read_text() == before
    leftovers = [p.name for p in cfg.state_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_configured_tokens_file(tmp_path: Path) -> None:
    custom = tmp_path / "etc" / "agent-tokens.toml"
    cfg = from_dict({"state": {"dir": str(tmp_path / "state")},
                     "server": {"tokens_file": str(custom)}})
    assert tokens_path(cfg) == custom
    TokenStore.for_config(cfg).add("ops", "operator")
    assert [t.name for t in TokenStore(custom).tokens] == ["ops"]
    assert not (tmp_path / "state" / "tokens.toml").exists()


def test_read_token_file_refuses_public_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("abc\n")
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match="0600"):
        read_token_file(path)
    os.chmod(path, 0o600)
    assert read_token_file(path) == "abc"


# -- mcp-agent token add ---------------------------------------------------------------


def test_cli_token_add(tmp_path: Path) -> None:
    runner = CliRunner()
    state = tmp_path / "state"
    res = runner.invoke(main, ["--state-dir", str(state), "token", "add", "deployer", "operator"])
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()   # what changed where goes to stderr
    assert token.startswith("mcp_") and len(token) > 40
    data = tomllib.loads((state / "tokens.toml").read_text())
    assert data["tokens"] == [{"name": "deployer", "role": "operator",
                               "sha256": hash_token(token)}]
    assert mode(state / "tokens.toml") == 0o600

    dup = runner.invoke(main, ["--state-dir", str(state), "token", "add", "deployer", "reader"])
    assert dup.exit_code == 1 and "already exists" in dup.output
    bad_role = runner.invoke(main, ["--state-dir", str(state), "token", "add", "x", "root"])
    assert bad_role.exit_code == 2 and "root" in bad_role.output
    bad_name = runner.invoke(main, ["--state-dir", str(state), "token", "add", "../x", "reader"])
    assert bad_name.exit_code == 1 and "not a valid name" in bad_name.output
    listed = runner.invoke(main, ["--state-dir", str(state), "token", "list"])
    assert listed.exit_code == 0 and listed.output == "deployer\toperator\n"

    os.chmod(state / "tokens.toml", 0o644)
    refused = runner.invoke(main, ["--state-dir", str(state), "token", "add", "y", "reader"])
    assert refused.exit_code == 1 and "must be 0600" in refused.output


def test_cli_token_add_uses_default_state_dir(_isolated_state: Path) -> None:
    res = CliRunner().invoke(main, ["token", "add", "ci", "reader"])
    assert res.exit_code == 0, res.output
    assert (_isolated_state / "tokens.toml").exists()
