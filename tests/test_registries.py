"""Registry credentials and trust (issue 20, item 1): the pure pieces. Config parsing and
its errors, which login an auth file gives for an image, the X-Registry-Auth header and
the CLI's auth file, podman's refusals told apart, the service's HOME, and check-config
on real files (missing, unparsable, not 0600). The pulls themselves are in
test_registry_pull.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from edge_env import TestCA

from mcp_node.agent_cli import main
from mcp_node.config import RegistryConfig, from_dict, parse
from mcp_node.errors import ImageError
from mcp_node.registries import (
    Credential,
    PullAuth,
    Registries,
    classify,
    credential,
    from_auth_json,
    read_password,
    registry_of,
    repository_of,
)

HOST = "reg.example.test:5000"
KEY = f'registries."{HOST}"'


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_config_tables_and_every_mistake_named() -> None:
    cfg = from_dict({"registries": {HOST: {"username": "u", "password_file": "/p",
                                           "ca_file": "/ca.pem"},
                                    "docker.io": {"auth_file": "/a.json"}}})
    assert cfg.registries.get(HOST) == RegistryConfig(HOST, "", "u", "/p", "/ca.pem")
    assert cfg.registries.get("docker.io") == RegistryConfig("docker.io", "/a.json")
    assert cfg.registries.get("other") is None
    _cfg, errors = parse({"registries": {
        "https://r/x": {"ca_file": "/c"}, "h": {"auth_file": "a", "username": "u"},
        "e": {}, "t": {"ca_file": 3, "zz": ""}, "n": "x"}})
    assert [str(e) for e in errors] == [
        'registries."https://r/x": is not a registry HOST or HOST:PORT (no scheme, no path)',
        'registries."h".auth_file: auth_file and username/password_file are two ways to log '
        "in: set one",
        'registries."h".password_file: username and password_file must be set together',
        "registries.\"h\".auth_file: 'a' is not an absolute path",
        'registries."e": set auth_file, or username and password_file, or ca_file',
        'registries."t".ca_file: wrong type (int)',
        'registries."t".zz: unknown key (known: auth_file, username, password_file, ca_file)',
        'registries."t": set auth_file, or username and password_file, or ca_file',
        'registries."n": must be a table',
    ]
    assert parse({"registries": {"[::1]:5000": {"ca_file": "/c"}}})[1] == []


def test_which_registry_and_repository_a_reference_names() -> None:
    assert registry_of("127.0.0.1:5000/mcp/hello:v1") == "127.0.0.1:5000"
    assert registry_of("localhost/x") == "localhost"
    assert registry_of("quay.io/a/b@sha256:" + "0" * 64) == "quay.io"
    assert registry_of("library/busybox") == registry_of("busybox") == "docker.io"
    assert repository_of("127.0.0.1:5000/mcp/hello:v1") == "127.0.0.1:5000/mcp/hello"
    assert repository_of("127.0.0.1:5000/mcp/hello") == "127.0.0.1:5000/mcp/hello"
    assert repository_of("r.io/a/b@sha256:ab") == "r.io/a/b"


def test_auth_file_most_specific_entry_wins_as_podman_picks_it() -> None:
    auths = {"auths": {f"https://{HOST}/v2/": {"auth": b64("any:1")},
                       f"{HOST}/team": {"auth": b64("team:2")},
                       f"{HOST}/team/app": {"auth": b64("app:3")},
                       "other.test": {"identitytoken": "tok"}}}
    text = json.dumps(auths)
    assert from_auth_json(text, f"{HOST}/team/app:v1", "k").username == "app"
    assert from_auth_json(text, f"{HOST}/team/web:v1", "k").username == "team"
    got = from_auth_json(text, f"{HOST}/solo:v1", "k")
    assert (got.username, got.password) == ("any", "1")
    assert from_auth_json(text, "other.test/x:1", "k").identity_token == "tok"
    for bad, why in [('{"auths": []}', 'k: not a containers-auth.json file (no "auths" table)'),
                     ("{", 'k: not a containers-auth.json file (JSON with "auths")'),
                     ('{"auths": {}}', f"k: no entry for {HOST} (nor for {HOST}/a)"),
                     (json.dumps({"auths": {HOST: {"auth": "!!"}}}),
                      f'k: the entry for {HOST} has no valid "auth" (base64 of user:password)')]:
        with pytest.raises(ImageError) as exc:
            from_auth_json(bad, f"{HOST}/a:1", "k")
        assert str(exc.value) == why


def test_the_secret_never_shows_and_the_encodings_podman_reads() -> None:
    cred = Credential("alice", "s3cret-pw", source=f"{KEY}.password_file")
    assert "s3cret-pw" not in repr(cred) and "s3cret-pw" not in str(cred)
    assert json.loads(base64.urlsafe_b64decode(cred.header())) == {
        "username": "alice", "password": "s3cret-pw"}
    assert json.loads(cred.auth_json(HOST)) == {"auths": {HOST: {"auth": b64("alice:s3cret-pw")}}}
    tok = Credential("", identity_token="t0k")
    assert "t0k" not in repr(tok)
    assert json.loads(base64.urlsafe_b64decode(tok.header())) == {"identitytoken": "t0k"}
    assert read_password("pw\n", "k") == read_password("pw\r\n", "k") == "pw"
    for bad in ("", "\n", "a\nb\n"):
        with pytest.raises(ImageError, match="the password alone, on one line"):
            read_password(bad, "k")


def test_password_and_auth_files_must_be_0600(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    pw.chmod(0o640)
    reg = RegistryConfig(HOST, username="alice", password_file=str(pw))
    with pytest.raises(ImageError) as exc:
        credential(reg, f"{HOST}/a:1")
    assert str(exc.value) == (f"{KEY}.password_file: {pw} has mode 0640; it must be 0600 "
                              "(readable by its owner alone)")
    pw.chmod(0o600)
    got = credential(reg, f"{HOST}/a:1")
    assert got is not None and (got.username, got.password) == ("alice", "hunter2")
    assert credential(RegistryConfig(HOST, ca_file="/c"), f"{HOST}/a:1") is None
    with pytest.raises(ImageError) as exc:
        credential(RegistryConfig(HOST, auth_file=str(tmp_path / "none.json")), f"{HOST}/a")
    assert str(exc.value) == (f"{KEY}.auth_file: cannot read {tmp_path / 'none.json'}: "
                              "No such file or directory")


def test_podmans_refusals_name_the_registry_the_image_and_the_key() -> None:
    image = f"{HOST}/a:1"
    bare = PullAuth(image, HOST, None, None, None)
    ca_only = PullAuth(image, HOST, RegistryConfig(HOST, ca_file="/c"), None, None)
    login = PullAuth(image, HOST, RegistryConfig(HOST, username="bob", password_file="/p"),
                     Credential("bob", "pw", source=f"{KEY}.password_file"), None)
    x509 = (f'initializing source docker://{image}: pinging container registry {HOST}: Get '
            f'"https://{HOST}/v2/": x509: certificate signed by unknown authority')
    unauthorized = f"reading manifest 1 in {HOST}/a: unauthorized: authentication required"
    unknown = f"reading manifest 1 in {HOST}/a: manifest unknown: manifest unknown"
    assert str(classify(bare, x509, "web")) == (
        f"cannot pull image {image}: the TLS certificate of registry {HOST} is signed by an "
        f"unknown authority; set {KEY}.ca_file to the CA bundle that signed it. Nothing was "
        "changed")
    assert str(classify(ca_only, x509, "web", "unix:///run/podman/podman.sock")).endswith(
        f"Nothing was changed ({KEY}.ca_file is set, but the podman service at "
        "unix:///run/podman/podman.sock was not started by the agent and cannot be given it: "
        f"put the CA in /etc/containers/certs.d/{HOST}/ca.crt, or leave podman.socket empty)")
    assert str(classify(ca_only, unauthorized, "web")) == (
        f"cannot pull image {image}: registry {HOST} asks for a login; set {KEY}.auth_file "
        f"(or {KEY}.username and password_file). Nothing was changed")
    assert str(classify(login, unauthorized, "web")) == (
        f"cannot pull image {image}: registry {HOST} refused the login of bob from "
        f"{KEY}.password_file; set it to a login the registry accepts. Nothing was changed")
    assert str(classify(login, unknown, "web")) == (
        f"cannot pull image {image}: registry {HOST} has no such image (manifest unknown); "
        "set the image of component web to one it has. Nothing was changed")
    assert str(classify(bare, "connection refused", "web")) == (
        f"cannot pull image {image}: connection refused")


def test_the_service_home_keeps_the_real_homes_entries_and_adds_the_cas(tmp_path: Path) -> None:
    real = tmp_path / "root"
    (real / ".config/containers/certs.d/other:1").mkdir(parents=True)
    (real / ".config/containers/certs.d" / HOST).mkdir()
    (real / ".config/containers/registries.conf").write_text("# the user's\n")
    (real / ".docker").mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(TestCA("unit").pem)
    cfg = from_dict({"registries": {HOST: {"ca_file": str(ca)}}})
    regs = Registries(cfg.registries, tmp_path / "state", real_home=real)
    home = regs.prepare_home()
    conf = home / ".config/containers"
    assert (home / ".docker").resolve() == (real / ".docker").resolve()
    assert (conf / "registries.conf").read_text() == "# the user's\n"
    assert (conf / "certs.d/other:1").is_symlink()
    assert not (conf / "certs.d" / HOST).is_symlink()   # the configured CA wins
    assert (conf / "certs.d" / HOST / "ca.crt").read_bytes() == ca.read_bytes()
    assert list((real / ".config/containers/certs.d" / HOST).iterdir()) == []
    # a changed CA file is in place at the next pull; a CA no longer configured goes
    ca.write_bytes(TestCA("unit 2").pem)
    auth = regs.for_image(f"{HOST}/a:1")
    assert auth.cert_dir == conf / "certs.d" / HOST
    assert (auth.cert_dir / "ca.crt").read_bytes() == ca.read_bytes()
    assert auth.cred is None and regs.for_image("quay.io/x:1").reg is None
    Registries(from_dict({}).registries, tmp_path / "state", real_home=real).prepare_home()
    assert (conf / "certs.d" / HOST).is_symlink()   # the real home's again


def test_check_config_checks_the_registries_files(tmp_path: Path) -> None:
    pw, auth, ca = tmp_path / "pw", tmp_path / "auth.json", tmp_path / "ca.pem"
    pw.write_text("secret-value\n")
    pw.chmod(0o644)
    auth.write_text("{not json")
    auth.chmod(0o600)
    ca.write_text("not a certificate\n")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[registries."a.test"]\nusername = "u"\npassword_file = "{pw}"\n'
                    f'ca_file = "{ca}"\n[registries."b.test"]\nauth_file = "{auth}"\n'
                    f'[registries."c.test"]\nca_file = "{tmp_path / "gone.pem"}"\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        f'{conf}: registries."a.test".password_file: {pw} has mode 0644; it must be 0600 '
        "(readable by its owner alone)",
        f'{conf}: registries."a.test".ca_file: {ca} holds no PEM certificate',
        f'{conf}: registries."b.test".auth_file: not a containers-auth.json file (JSON with '
        '"auths")',
        f'{conf}: registries."c.test".ca_file: cannot read {tmp_path / "gone.pem"}: No such '
        "file or directory",
        f"Error: {conf}: 4 error(s)"]
    assert "secret-value" not in res.output
    pw.chmod(0o600)
    auth.write_text(json.dumps({"auths": {"b.test": {"auth": b64("u:p")}}}))
    ca.write_bytes(TestCA("ok").pem)
    (tmp_path / "gone.pem").write_bytes(TestCA("ok").pem)
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert (res.exit_code, res.stdout) == (0, f"{conf}: ok\n"), res.output


def test_a_changed_registries_table_needs_a_restart_and_says_so() -> None:
    from mcp_node.daemon import reload_plan

    old = from_dict({})
    new = from_dict({"registries": {HOST: {"ca_file": "/c.pem"}}})
    running, live, restart = reload_plan(old, new)
    assert (live, restart) == ([], ["registries.hosts"])
    assert running.registries == old.registries
