"""``mcp secret``: the node's secrets (set, list, rm). A value goes in from stdin or a
file and is never printed, listed or sent back."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import click

from .cli import emit, json_option, pass_ctx
from .clictx import Ctx
from .cliformat import table
from .errors import ValidationError

MAX_READ = 64 * 1024 + 1   # one byte past the store's cap, so the agent names it


@click.group()
def secret() -> None:
    """Secrets: values given to components as files or env, never shown again.

    \b
    A component names what it uses:
      secrets = ["db-password"]                  # /run/secrets/db-password (0400)
      env = ["DB_PASSWORD=secret:db-password"]   # the value, put in at create time
    """


def _read(from_file: Path | None) -> bytes:
    if from_file is not None:
        try:
            with from_file.open("rb") as f:
                return f.read(MAX_READ)
        except OSError as exc:
            raise ValidationError(f"cannot read {from_file}: {exc.strerror}",
                                  "--from-file") from exc
    if sys.stdin.isatty():
        click.echo("Reading the secret from stdin (end with Ctrl-D):", err=True)
    value = sys.stdin.buffer.read(MAX_READ)
    # `echo pw | mcp secret set` and a typed line end in a newline nobody meant
    return value[:-1] if value.endswith(b"\n") and value.count(b"\n") == 1 else value


@secret.command(name="set")
@click.argument("name")
@click.option("--from-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read the value from FILE (its bytes as they are) instead of stdin.")
@json_option
@pass_ctx
def secret_set(ctx: Ctx, name: str, from_file: Path | None) -> None:
    """Store a new version of secret NAME, read from stdin or --from-file.

    What runs keeps the version it was deployed with: `mcp plan` shows the change and
    `mcp deploy` rolls it out.
    """
    value = _read(from_file)
    body = {"value": base64.b64encode(value).decode()}
    emit(ctx, ctx.backend().call("secret_set", name, body), lambda r: (
        f"secret {r['name']} version {r['version']} stored"
        + (f"; used by {', '.join(r['used_by'])}: deploy to roll it out"
           if r.get("used_by") else "")))


@secret.command(name="list")
@json_option
@pass_ctx
def secret_list(ctx: Ctx) -> None:
    """Names, versions, times and users of the stored secrets (never their values)."""
    emit(ctx, ctx.backend().call("secret_list"), lambda rows: table(
        ["NAME", "VERSION", "UPDATED", "CREATED", "USED BY"],
        [[r["name"], str(r["version"]), r["updated"], r["created"],
          ",".join(r["used_by"]) or "-"] for r in rows]) if rows else "no secrets")


@secret.command(name="rm")
@click.argument("name")
@json_option
@pass_ctx
def secret_rm(ctx: Ctx, name: str) -> None:
    """Remove secret NAME and every version of it; refused while a deployed service
    uses it."""
    emit(ctx, ctx.backend().call("secret_remove", name), lambda _: f"removed secret {name}")
