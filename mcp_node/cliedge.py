"""``mcp edge``: public TLS hostnames routed to Tailnet backends (list, setup, remove)."""

from __future__ import annotations

import click

from .cli import emit, json_option, pass_ctx
from .clictx import Ctx
from .cliformat import table


@click.group()
def edge() -> None:
    """Edge routes: public TLS hostnames forwarded to Tailnet backends."""


@edge.command(name="list")
@json_option
@pass_ctx
def edge_list(ctx: Ctx) -> None:
    """List edge routes with certificate serial and expiry."""
    emit(ctx, ctx.backend().call("edge_list"), lambda rows: table(
        ["HOSTNAME", "BACKEND", "ADDRESS", "SERIAL", "EXPIRES"],
        [[r["hostname"], f"{r['backend_hostname']}:{r['backend_port']}",
          r.get("backend_address", ""), r.get("cert_serial", ""), r.get("cert_expires", "")]
         for r in rows]))


def split_backend(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="BACKEND_HOST:PORT")
    return host, int(port)


@edge.command(name="setup")
@click.argument("hostname")
@click.argument("backend")
@click.option("--no-backend-tls", is_flag=True, help="Ask for cleartext (always refused).")
@json_option
@pass_ctx
def edge_setup(ctx: Ctx, hostname: str, backend: str, no_backend_tls: bool) -> None:
    """Route public HOSTNAME to BACKEND_HOST:PORT over TLS, with a certificate."""
    host, port = split_backend(backend)
    body = {"hostname": hostname, "backend_hostname": host, "backend_port": port,
            "backend_tls": not no_backend_tls}
    emit(ctx, ctx.backend().call("edge_setup", body), lambda r: (
        f"edge route {r['hostname']} -> {r['backend_hostname']}:{r['backend_port']} "
        f"({r.get('backend_address', '')}), cert serial {r.get('cert_serial', '')} "
        f"expires {r.get('cert_expires', '')}"))


@edge.command(name="remove")
@click.argument("hostname")
@json_option
@pass_ctx
def edge_remove(ctx: Ctx, hostname: str) -> None:
    """Remove the edge route for HOSTNAME, its certificate and record."""
    emit(ctx, ctx.backend().call("edge_remove", hostname),
         lambda _: f"removed edge route {hostname}")
