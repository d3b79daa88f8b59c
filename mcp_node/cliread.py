"""``mcp`` commands that read what runs, from every configured node at once where
they can: ps, status, events, logs and node health."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from .cli import emit, json_option, partial, pass_ctx, service_backend
from .clicomplete import components, services
from .clictx import Ctx
from .cliformat import change_text, health_text, ps_table, services_summary, status_text
from .errors import MCPError
from .multinode import PARTIAL_EXIT, ask_all, named
from .safetext import escape_controls

DEGRADED_EXIT = 3   # node health: some node is degraded


@click.command()
@json_option
@pass_ctx
def ps(ctx: Ctx) -> None:
    """List every component on the node(s)."""
    answers = ask_all(ctx.backends(), lambda b: b.call("ps"))
    emit(ctx, [named(b, r) for b, rows in answers.ok for r in rows], ps_table)
    partial(answers)


@click.command()
@click.argument("service", required=False, shell_complete=services)
@json_option
@pass_ctx
def status(ctx: Ctx, service: str | None) -> None:
    """Status of SERVICE with drift and events, or a summary of all services."""
    if service:
        b = service_backend(ctx.backends(), service)
        emit(ctx, named(b, b.call("status", service)), status_text)
    else:
        answers = ask_all(ctx.backends(), lambda b: b.call("ps"))
        emit(ctx, [named(b, r) for b, rows in answers.ok for r in rows], services_summary)
        partial(answers)


@click.command()
@click.argument("service", required=False, shell_complete=services)
@click.option("-t", "-n", "--tail", "tail", type=click.IntRange(0, 10000), default=None,
              help="The last N events first (default 100; 10 with -f).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing events as they happen.")
@json_option
@pass_ctx
def events(ctx: Ctx, service: str | None, tail: int | None, follow: bool) -> None:
    """State changes of every service, or of SERVICE: what changed, when and why.

    \b
    Examples:
      mcp events web --tail 20
      mcp events -f              # until Ctrl-C; --json prints one JSON object a line
    """
    backends = ctx.backends()
    if follow:
        if service:
            b = service_backend(backends, service)
        elif len(backends) > 1:
            raise MCPError("following events of several nodes: name one with -n NODE")
        else:
            b = backends[0]
        with contextlib.suppress(KeyboardInterrupt):
            for line in b.follow_events(service, 10 if tail is None else tail):
                if line.strip():
                    e = json.loads(line)
                    click.echo(json.dumps(named(b, e)) if ctx.json else event_line(named(b, e)))
        return
    n = 100 if tail is None else tail
    if service:
        b = service_backend(backends, service)
        rows = [named(b, e) for e in b.call("events", service, n)]
        emit(ctx, rows, lambda rs: "\n".join(event_line(e) for e in rs))
        return
    answers = ask_all(backends, lambda b: b.call("events", None, n))
    rows = sorted((named(b, e) for b, es in answers.ok for e in es), key=lambda e: e["time"])
    emit(ctx, rows[-n:] if n else [], lambda rs: "\n".join(event_line(e) for e in rs))
    partial(answers)


def event_line(e: dict[str, Any]) -> str:
    detail = f" ({e['detail']})" if e.get("detail") else ""
    node = f" [{e['node']}]" if e.get("node") else ""
    who = f"{e['service']}/{e['component']}" if e["component"] else e["service"]
    return escape_controls(  # one event, one line: a detail's line breaks are escaped too
        f"{e['time']} {who}: {change_text(e)}{detail}{node}")


@click.command()
@click.argument("service", shell_complete=services)
@click.argument("component", required=False, shell_complete=components)
@click.option("-t", "-n", "--tail", "tail", type=click.IntRange(min=0), help="Last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--since", metavar="WHEN",
              help="Only output from then on: a duration back (10m, 1h30m) or an RFC 3339 "
                   "time.")
@click.option("--timestamps", is_flag=True, help="Start each line with its time (UTC).")
@pass_ctx
def logs(ctx: Ctx, service: str, component: str | None, tail: int | None,
         follow: bool, since: str | None, timestamps: bool) -> None:
    """Print the output of a component, or of all, as recorded.

    With no COMPONENT (of several): every component's lines in time order, each led
    by its name and `|` (as compose logs); -f follows each into its next run.

    \b
    Examples:
      mcp logs web --since 10m --timestamps
      mcp logs web db -f --tail 0
    """
    out = sys.stdout.buffer
    with contextlib.suppress(KeyboardInterrupt):
        for chunk in service_backend(ctx.backends(), service).logs(
                service, component, tail, follow, since, timestamps):
            out.write(chunk)
            out.flush()


@click.group()
def node() -> None:
    """Node-level commands."""


@node.command()
@json_option
@pass_ctx
def health(ctx: Ctx) -> None:
    """Agent health: runtimes, running workloads, and why it is degraded."""
    answers = ask_all(ctx.backends(), lambda b: b.call("health"))
    rows = [named(b, h) for b, h in answers.ok] + [
        {"node": b.node, "status": "unreachable", "reasons": [str(err)]}
        for b, err in answers.failed]
    emit(ctx, rows, lambda d: "\n\n".join(health_text(h) for h in d))
    if answers.failed:
        sys.exit(PARTIAL_EXIT)
    if any(h["status"] != "healthy" for h in rows):
        sys.exit(DEGRADED_EXIT)
