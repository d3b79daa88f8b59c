"""``mcp`` commands that read a definition or a service's versions: deploy, validate,
plan, history, rollback. Only these import the definition parser, and the text
views only for text output (``mcp --json deploy`` is the call scripts make)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .cli import emit, json_option, pass_ctx, service_backend
from .clicomplete import definitions, files, services
from .clictx import Ctx, services_dir
from .cliwait import wait_ready, with_progress
from .errors import AgentUnreachable, MCPError
from .safetext import for_terminal


def load_definition(ctx: Ctx, arg: str) -> dict[str, Any]:
    """A definition from FILE, ``-`` (stdin: JSON if it starts with ``{``, else TOML), or
    a service name looked up in the services dir; validated here, before any call."""
    from .servicedef import check_name, load_file, loads_text

    if arg == "-":
        text = sys.stdin.read()
        return loads_text(text, "stdin", text.lstrip().startswith("{")).to_dict()
    path = Path(arg)
    if not path.is_file():
        if "/" in arg or arg.endswith((".toml", ".json")):
            raise MCPError(f"no such file: {arg}")
        name = check_name(arg, "service")
        path = services_dir(ctx.cfg) / f"{name}.toml"
        if not path.is_file():
            raise MCPError(f"no such file, and no definition at {path}")
    return load_file(path).to_dict()


def deployed_text(st: dict[str, Any]) -> str:
    from .cliformat import status_text
    from .multinode import placed_text

    return (f"{'unchanged' if st.get('unchanged') else 'deployed'} "
            f"{st['service']}{placed_text(st)}\n{status_text(st)}")


@click.command()
@click.argument("service", shell_complete=definitions)
@click.option("--direct", is_flag=True, help="Dial the node agent directly (the default here).")
@click.option("-n", "--node", "node", metavar="NODE", help="Node name from mcp.toml [[nodes]].")
@click.option("--local", is_flag=True, help="Run in-process against the local registry.")
@click.option("--wait", "wait", is_flag=True,
              help="Return once the rollout ended: every changed component healthy for "
                   "min_healthy_s (exit 1 when it failed or was reverted).")
@click.option("--timeout", type=click.FloatRange(0.1, 86400), default=120.0, show_default=True,
              help="With --wait: seconds to wait before failing.")
@click.option("--pull", "pull", is_flag=True,
              help='Pull every image now, as pull = "always" would: a moved tag is rolled out.')
@json_option
@pass_ctx
def deploy(ctx: Ctx, service: str, direct: bool, node: str | None, local: bool, wait: bool,
           timeout: float, pull: bool) -> None:
    """Deploy SERVICE (a name in the services dir) or a definition FILE.

    With --wait it returns when the rollout succeeded (every changed component
    passed its check and stayed healthy for [update] min_healthy_s), and fails
    (exit 1) naming why when it failed or was reverted, or with the last log
    lines of the components that are not ready when it timed out.
    """
    ctx.node = node or ctx.node
    ctx.local = local or ctx.local
    defn = load_definition(ctx, service)
    backend = service_backend(ctx.backends(), defn["name"])
    st = with_progress(ctx, "deploying", defn["name"],
                       lambda: backend.call("deploy", defn, True if pull else None), backend)
    if wait:
        began = st.get("rollout") if not st.get("unchanged") else None
        st = wait_ready(backend, st["service"], timeout,
                        began["version"] if began else None)
    from .multinode import named

    emit(ctx, named(backend, st), deployed_text)


@click.command()
@click.argument("definition", shell_complete=files)
@json_option
@pass_ctx
def validate(ctx: Ctx, definition: str) -> None:
    """Check a definition FILE (or - for stdin) without deploying it.

    The agent, when one answers, runs the checks its deploy runs before changing
    anything (volume roots, host paths that exist, secrets, routes; capacity as a
    warning, since it may change before the deploy). When none answers, only the
    definition itself is checked, and a note on stderr says so.

    \b
    Example:
      mcp validate examples/hello.toml
    """
    d = load_definition(ctx, definition)
    backends = ctx.backends()
    if len(backends) == 1:
        backend = backends[0]
    else:
        from .multinode import plan_target

        backend = plan_target(backends, d["name"])[0]
    try:
        r = backend.call("validate", d)
    except AgentUnreachable as exc:
        click.echo(for_terminal(
            f"note: no agent answered ({backend.node}: {exc.__cause__ or exc}); checked "
            "locally only (volume roots, host paths and capacity not checked)"), err=True)
        r = {"service": d["name"], "valid": True, "components": len(d["components"]),
             "warnings": [], "checked_by": None}
    for w in r["warnings"]:
        click.echo(for_terminal(f"warning: {w}"), err=True)
    emit(ctx, r, lambda r: f"{r['service']}: valid ({r['components']} component(s))"
         + (f", checked by {r['checked_by']}" if r["checked_by"] else ""))


@click.command(name="plan")
@click.argument("definition", shell_complete=definitions)
@click.option("--pull", "pull", is_flag=True,
              help='Pull every image to resolve it, as pull = "always" would.')
@json_option
@pass_ctx
def plan_cmd(ctx: Ctx, definition: str, pull: bool) -> None:
    """Show what deploying SERVICE|FILE would create, replace, start, stop or remove.

    The node resolves each image as a deploy would, so a tag that now names
    another image shows as an image_digest change (a replace).

    Exit status: 0 when nothing would change, 3 when something would
    (1 and 2 keep their meaning: an error, a usage error).

    \b
    Example:
      mcp plan examples/hello.toml && echo "nothing to do"
    """
    from .multinode import plan_target
    from .plan import plan_text

    defn = load_definition(ctx, definition)
    backends = ctx.backends()
    backend, new = plan_target(backends, defn["name"])
    if new:
        click.echo(for_terminal(
            f"note: {defn['name']!r} is on no node yet ({', '.join(b.node for b in backends)} "
            f"answered); planned on {backend.node}, deploy it with -n NODE"), err=True)
    p = backend.call("plan", defn, True if pull else None)
    emit(ctx, p, plan_text)
    if p["changed"]:
        sys.exit(3)


@click.command()
@click.argument("service", shell_complete=services)
@json_option
@pass_ctx
def history(ctx: Ctx, service: str) -> None:
    """List the deployed versions of SERVICE, oldest first (* marks the current one)."""
    from .cliformat import table

    emit(ctx, service_backend(ctx.backends(), service).call("history", service),
         lambda rows: table(
        ["VERSION", "DEPLOYED", "DIGEST", "IMAGES"],
        [[f"{r['version']}{'*' if r['current'] else ''}", r["time"], r["digest"],
          ",".join(f"{i}@{d.removeprefix('sha256:')[:12]}" if d else i
                   for i, d in zip(r["images"], r["image_digests"], strict=True))]
         for r in rows]))


@click.command()
@click.argument("service", shell_complete=services)
@click.argument("version", required=False, type=click.IntRange(1))
@json_option
@pass_ctx
def rollback(ctx: Ctx, service: str, version: int | None) -> None:
    """Deploy VERSION of SERVICE again (default: the version before the current one).

    \b
    Example:
      mcp history web && mcp rollback web 3
    """
    from .cliformat import status_text
    from .multinode import named

    b = service_backend(ctx.backends(), service)
    st = with_progress(ctx, "rolling back", service,
                       lambda: b.call("rollback", service, version), b)
    emit(ctx, named(b, st), lambda s: f"rolled back {s['service']}\n{status_text(s)}")
