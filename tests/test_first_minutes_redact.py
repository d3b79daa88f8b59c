"""Issue 22 row 17: a reader token sees no env values, in any answer that carries a
definition, consistent with the registries issue's redaction (``redact``); an operator
sees them. Exact output and exit codes through the CLI against a live agent."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result
from live_server import fake_live

from mcp_node.cli import cli

ENV = ["DB_PASSWORD=hunter2", "MODE=prod"]
SHOWN = ["DB_PASSWORD=<redacted>", "MODE=<redacted>"]


def test_a_reader_sees_env_keys_never_values(tmp_path: Path) -> None:
    svc = tmp_path / "app.toml"
    svc.write_text('name = "app"\n[[components]]\nname = "web"\nimage = "img:v1"\n'
                   f"env = {json.dumps(ENV)}\n")
    with fake_live(tmp_path) as live:
        def mcp(role: str, *args: str) -> Result:
            tok = tmp_path / role
            tok.write_text(live.token(role))
            tok.chmod(0o600)
            return CliRunner().invoke(cli, ["--agent", live.url, "--token-file", str(tok),
                                            *args], catch_exceptions=False)

        assert (mcp("operator", "deploy", str(svc)).exit_code) == 0
        for role, env in (("reader", SHOWN), ("operator", ENV)):
            r = mcp(role, "--json", "status", "app")
            assert r.exit_code == 0, r.output
            assert json.loads(r.stdout)["definition"]["components"][0]["env"] == env
        for args in (("status", "app"), ("history", "app"), ("ps",), ("events", "app"),
                     ("--json", "ps"), ("--json", "events", "app"), ("--json", "history", "app")):
            r = mcp("reader", *args)
            assert r.exit_code == 0 and "hunter2" not in r.output \
                and "prod" not in r.output, (args, r.output)
        r = mcp("reader", "plan", str(svc))     # a plan's changes carry env: operator only
        assert (r.exit_code, r.stdout) == (1, "")
        assert r.stderr.startswith("Error: ") and "operator" in r.stderr, r.stderr
