"""``mcp`` commands that change what runs of a deployed service: stop, start, restart
and undeploy."""

from __future__ import annotations

import click

from .cli import emit, json_option, pass_ctx, service_backend
from .clicomplete import components, services
from .clictx import Ctx
from .cliformat import status_text
from .cliwait import with_progress
from .multinode import named


def _lifecycle(op: str, past: str, verb: str) -> click.Command:
    timeout_opt = click.option(
        "--timeout", type=click.FloatRange(0, 3600), default=None,
        help="Seconds a workload may take to end itself before it is killed (default 10).")

    @click.argument("service", shell_complete=services)
    @click.argument("component", required=False, shell_complete=components)
    @json_option
    @pass_ctx
    def command(ctx: Ctx, service: str, component: str | None,
                timeout: float | None = None) -> None:
        b = service_backend(ctx.backends(), service)
        what = f"{service}/{component}" if component else service
        st = with_progress(ctx, verb, what, lambda: b.call(op, service, component, timeout), b)
        show = op in ("start", "restart")
        emit(ctx, named(b, st) if isinstance(st, dict) else st, lambda s: f"{past} {what}" + (
            f"\n{status_text(s)}" if show and isinstance(s, dict) else ""))

    if op != "start":
        command = timeout_opt(command)
    return click.command(name=op, help=f"{op.capitalize()} every component of SERVICE, or "
                         "only COMPONENT.\n\n\b\nExample:\n  mcp " + op + " web api")(command)


stop = _lifecycle("stop", "stopped", "stopping")
start = _lifecycle("start", "started", "starting")
restart = _lifecycle("restart", "restarted", "restarting")


@click.command()
@click.argument("service", shell_complete=services)
@json_option
@pass_ctx
def undeploy(ctx: Ctx, service: str) -> None:
    """Remove every component of SERVICE and its record.

    \b
    Example:
      mcp undeploy web
    """
    b = service_backend(ctx.backends(), service)
    st = with_progress(ctx, "undeploying", service, lambda: b.call("undeploy", service), b)
    emit(ctx, st, lambda _: f"undeployed {service}")
