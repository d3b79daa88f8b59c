"""The operator CLI, ``mcp`` (design §7).

Every command runs against a ``Backend`` (clictx): the agent over HTTP
(default), or the modules in-process with ``--local``. Domain errors come up
from either and become ``click.ClickException`` in one place,
``ErrorGroup.invoke`` (exit 1, message on stderr); usage errors stay click's
(exit 2). Heavy modules are imported on first use so ``mcp --version`` starts
fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .clictx import DEFAULT_AGENT, Backend, Ctx, config_home
from .cliformat import health_text, ps_table, services_summary, status_text, table
from .cliwait import wait_ready, with_progress
from .errors import MCPError
from .multinode import (
    PARTIAL_EXIT,
    Answers,
    ask_all,
    drained_text,
    locate,
    named,
    nodes_table,
    placed_text,
)
from .safetext import escape_controls, for_terminal

DEGRADED_EXIT = 3   # node health: some node is degraded

F = TypeVar("F", bound=Callable[..., Any])


class ErrorGroup(click.Group):
    """A root command group that reports project errors as one ``Error: ...`` line.

    Subcommands (nested groups too) run inside the root's ``invoke``, so this
    is the one place an ``MCPError`` becomes a ``ClickException``: exit 1 with
    the message on stderr. Click's own usage errors pass through (exit 2).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MCPError as exc:
            raise click.ClickException(for_terminal(str(exc))) from exc


def emit(ctx: Ctx, data: Any, text: Callable[[Any], str]) -> None:
    if ctx.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text(data)
        if out:
            click.echo(for_terminal(out))   # what the agent relays must not drive the terminal


# -- commands ------------------------------------------------------------------------


def pass_ctx(fn: F) -> F:
    return click.pass_obj(fn)  # type: ignore[return-value]


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Ctx).json = True  # type: ignore[union-attr]


def json_option(fn: F) -> F:
    """``--json`` after the command too (``mcp ps --json``), same as before it."""
    return click.option("--json", is_flag=True, expose_value=False, callback=_set_json,
                        help="Print JSON.")(fn)


@click.group(cls=ErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mcp")
@click.option("--agent", metavar="URL", help="Agent URL (default: mcp.toml nodes, $MCP_AGENT, "
              f"or {DEFAULT_AGENT}).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-n", "--node", metavar="NODE", help="Node name from mcp.toml [[nodes]].")
@click.option("--local", is_flag=True, help="Run in-process against the local registry.")
@click.pass_context
def cli(ctx: click.Context, agent: str | None, token_file: str | None, as_json: bool,
        node: str | None, local: bool) -> None:
    """Operate mcp_node agents: deploy and manage services, edge routes, node health."""
    ctx.obj = Ctx(agent, token_file, as_json, node, local)


def service_backend(ctx: Ctx, backends: list[Backend], service: str,
                    new_ok: bool = False) -> Backend:
    """The node a per-service command goes to: the one -n names, else the one that
    has the service; ``new_ok``: a service no node has yet needs -n on a fleet."""
    from .errors import NotFoundError

    try:
        return locate(backends, service)
    except NotFoundError:
        if not new_ok or len(backends) > 1:
            raise
        return backends[0]


def partial(answers: Answers) -> None:
    """After a fleet read's output: say which nodes did not answer, exit 4."""
    if answers.failed:
        for line in answers.failures_text():
            click.echo(for_terminal(f"warning: {line}"), err=True)
        sys.exit(PARTIAL_EXIT)


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
        base = Path(ctx.cfg.services_dir).expanduser() if ctx.cfg.services_dir \
            else config_home() / "services"
        path = base / f"{name}.toml"
        if not path.is_file():
            raise MCPError(f"no such file, and no definition at {path}")
    return load_file(path).to_dict()


@cli.command()
@click.argument("service")
@click.option("--direct", is_flag=True, help="Dial the node agent directly (the default here).")
@click.option("-n", "--node", "node", metavar="NODE", help="Node name from mcp.toml [[nodes]].")
@click.option("--local", is_flag=True, help="Run in-process against the local registry.")
@click.option("--wait", "wait", is_flag=True,
              help="Return once every component is ready (its check passes).")
@click.option("--timeout", type=click.FloatRange(0.1, 86400), default=120.0, show_default=True,
              help="With --wait: seconds to wait before failing.")
@json_option
@pass_ctx
def deploy(ctx: Ctx, service: str, direct: bool, node: str | None, local: bool, wait: bool,
           timeout: float) -> None:
    """Deploy SERVICE (a name in the services dir) or a definition FILE.

    With --wait it returns when every component that should run is ready, and
    fails (exit 1) with the last log lines of those that are not.
    """
    ctx.node = node or ctx.node
    ctx.local = local or ctx.local
    defn = load_definition(ctx, service)
    backend = service_backend(ctx, ctx.backends(), defn["name"], new_ok=True)
    st = with_progress(ctx, "deploying", defn["name"], lambda: backend.call("deploy", defn),
                       backend)
    if wait:
        st = wait_ready(backend, st["service"], timeout)
    emit(ctx, st, lambda s: f"{'unchanged' if s.get('unchanged') else 'deployed'} "
                            f"{s['service']}{placed_text(s)}\n{status_text(s)}")


@cli.command()
@click.argument("definition")
@json_option
@pass_ctx
def validate(ctx: Ctx, definition: str) -> None:
    """Check a definition FILE (or - for stdin) without deploying it.

    \b
    Example:
      mcp validate examples/hello.toml
    """
    d = load_definition(ctx, definition)
    emit(ctx, {"service": d["name"], "valid": True, "components": len(d["components"])},
         lambda r: f"{r['service']}: valid ({r['components']} component(s))")


@cli.command(name="plan")
@click.argument("definition")
@json_option
@pass_ctx
def plan_cmd(ctx: Ctx, definition: str) -> None:
    """Show what deploying SERVICE|FILE would create, replace, start, stop or remove.

    Exit status: 0 when nothing would change, 3 when something would
    (1 and 2 keep their meaning: an error, a usage error).

    \b
    Example:
      mcp plan examples/hello.toml && echo "nothing to do"
    """
    from .errors import NotFoundError
    from .plan import plan, plan_text
    from .servicedef import from_dict

    new = from_dict(load_definition(ctx, definition))
    try:
        st = service_backend(ctx, ctx.backends(), new.name, new_ok=True).call(
            "status", new.name)
    except NotFoundError:
        st = None
    deployed = from_dict(st["definition"]) if st else None
    states = {c["component"]: c["state"] for c in st["components"]} if st else {}
    p = plan(deployed, new, states)
    emit(ctx, {"service": p.service, "changed": p.changed,
               "changes": [c.to_dict() for c in p.changes]}, lambda _: plan_text(p))
    if p.changed:
        sys.exit(3)


@cli.command()
@click.argument("service")
@json_option
@pass_ctx
def history(ctx: Ctx, service: str) -> None:
    """List the deployed versions of SERVICE, oldest first (* marks the current one)."""
    emit(ctx, service_backend(ctx, ctx.backends(), service).call("history", service),
         lambda rows: table(
        ["VERSION", "DEPLOYED", "DIGEST", "IMAGES"],
        [[f"{r['version']}{'*' if r['current'] else ''}", r["time"], r["digest"],
          ",".join(r["images"])] for r in rows]))


@cli.command()
@click.argument("service")
@click.argument("version", required=False, type=click.IntRange(1))
@json_option
@pass_ctx
def rollback(ctx: Ctx, service: str, version: int | None) -> None:
    """Deploy VERSION of SERVICE again (default: the version before the current one).

    \b
    Example:
      mcp history web && mcp rollback web 3
    """
    b = service_backend(ctx, ctx.backends(), service)
    st = with_progress(ctx, "rolling back", service,
                       lambda: b.call("rollback", service, version), b)
    emit(ctx, st, lambda s: f"rolled back {s['service']}\n{status_text(s)}")


def _lifecycle(op: str, past: str, verb: str) -> None:
    timeout_opt = click.option(
        "--timeout", type=click.FloatRange(0, 3600), default=None,
        help="Seconds a workload may take to end itself before it is killed (default 10).")

    @click.argument("service")
    @click.argument("component", required=False)
    @json_option
    @pass_ctx
    def command(ctx: Ctx, service: str, component: str | None,
                timeout: float | None = None) -> None:
        b = service_backend(ctx, ctx.backends(), service)
        what = f"{service}/{component}" if component else service
        st = with_progress(ctx, verb, what, lambda: b.call(op, service, component, timeout), b)
        show = op in ("start", "restart")
        emit(ctx, st, lambda s: f"{past} {what}" + (
            f"\n{status_text(s)}" if show and isinstance(s, dict) else ""))

    if op != "start":
        command = timeout_opt(command)
    cli.command(name=op, help=f"{op.capitalize()} every component of SERVICE, or only "
                "COMPONENT.\n\n\b\nExample:\n  mcp " + op + " web api")(command)


_lifecycle("stop", "stopped", "stopping")
_lifecycle("start", "started", "starting")
_lifecycle("restart", "restarted", "restarting")


@cli.command()
@click.argument("service")
@json_option
@pass_ctx
def undeploy(ctx: Ctx, service: str) -> None:
    """Remove every component of SERVICE and its record.

    \b
    Example:
      mcp undeploy web
    """
    b = service_backend(ctx, ctx.backends(), service)
    st = with_progress(ctx, "undeploying", service, lambda: b.call("undeploy", service), b)
    emit(ctx, st, lambda _: f"undeployed {service}")


@cli.command()
@json_option
@pass_ctx
def ps(ctx: Ctx) -> None:
    """List every component on the node(s)."""
    answers = ask_all(ctx.backends(), lambda b: b.call("ps"))
    emit(ctx, [named(b, r) for b, rows in answers.ok for r in rows], ps_table)
    partial(answers)


@cli.command()
@click.argument("service", required=False)
@json_option
@pass_ctx
def status(ctx: Ctx, service: str | None) -> None:
    """Status of SERVICE with drift and events, or a summary of all services."""
    if service:
        b = service_backend(ctx, ctx.backends(), service)
        emit(ctx, named(b, b.call("status", service)), status_text)
    else:
        answers = ask_all(ctx.backends(), lambda b: b.call("ps"))
        emit(ctx, [named(b, r) for b, rows in answers.ok for r in rows], services_summary)
        partial(answers)


@cli.command()
@click.argument("service", required=False)
@click.option("-t", "--tail", "tail", type=click.IntRange(0, 10000), default=None,
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
            b = service_backend(ctx, backends, service)
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
        b = service_backend(ctx, backends, service)
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
    return escape_controls(  # one event, one line: a detail's line breaks are escaped too
        f"{e['time']} {e['service']}/{e['component']}: {e['from']} -> {e['to']}{detail}{node}")


@cli.command()
@click.argument("service")
@click.argument("component", required=False)
@click.option("-t", "--tail", "tail", type=click.IntRange(min=0), help="Last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@pass_ctx
def logs(ctx: Ctx, service: str, component: str | None, tail: int | None,
         follow: bool) -> None:
    """Print the output of a component, as its runtime records it."""
    out = sys.stdout.buffer
    with contextlib.suppress(KeyboardInterrupt):
        for chunk in service_backend(ctx, ctx.backends(), service).logs(
                service, component, tail, follow):
            out.write(chunk)
            out.flush()


@cli.command()
@json_option
@pass_ctx
def nodes(ctx: Ctx) -> None:
    """Every node of the fleet (fleet mode), from etcd, as any agent sees it."""
    emit(ctx, ctx.backend().call("nodes"), nodes_table)


@cli.command()
@click.argument("node")
@json_option
@pass_ctx
def drain(ctx: Ctx, node: str) -> None:
    """Cordon NODE and move its unpinned services to other nodes (fleet mode)."""
    emit(ctx, ctx.backend().call("drain", node), drained_text)


@cli.command()
@click.argument("node")
@json_option
@pass_ctx
def uncordon(ctx: Ctx, node: str) -> None:
    """Let placements use NODE again after a drain (fleet mode)."""
    emit(ctx, ctx.backend().call("uncordon", node), lambda d: f"uncordoned {d['node']}")


@cli.group()
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


@cli.group()
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


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    Examples:
      eval "$(mcp completion bash)"                 # in ~/.bashrc
      mcp completion fish > ~/.config/fish/completions/mcp.fish
    """
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)
    assert comp is not None  # every choice is one click ships
    click.echo(comp(cli, {}, "mcp", "_MCP_COMPLETE").source())


def main() -> None:
    cli(prog_name="mcp")
