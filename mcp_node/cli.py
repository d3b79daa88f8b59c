"""The operator CLI, ``mcp`` (design §7).

Every command runs against a ``Backend``: the agent over HTTP (default), or
the modules in-process with ``--local``. Domain errors come up from either
and become ``click.ClickException`` in one place, ``ErrorGroup.invoke`` (exit
1, message on stderr); usage errors stay click's (exit 2). Heavy modules are
imported on first use so ``mcp --version`` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click

from . import __version__
from .errors import MCPError, ValidationError
from .states import RUNNING, UNKNOWN

if TYPE_CHECKING:
    from .agent import Agent

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_AGENT = "http://127.0.0.1:9444"


# -- CLI configuration ---------------------------------------------------------


@dataclass
class CLIConfig:
    nodes: dict[str, str] = field(default_factory=dict)  # name -> address
    token_path: str = ""
    services_dir: str = ""


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mcp"


def load_cli_config() -> CLIConfig:
    path = Path(os.environ.get("MCP_CLI_CONFIG") or config_home() / "mcp.toml")
    if not path.exists():
        return CLIConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MCPError(f"cannot read {path}: {exc}") from exc
    nodes = {}
    for i, n in enumerate(data.get("nodes", [])):
        if not isinstance(n, dict) or not isinstance(n.get("name"), str) \
                or not isinstance(n.get("address"), str):
            raise ValidationError("needs string name and address", f"{path}: nodes[{i}]")
        nodes[n["name"]] = n["address"]
    return CLIConfig(nodes=nodes, token_path=str(data.get("token_path", "")),
                     services_dir=str(data.get("services_dir", "")))


def agent_url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


# -- backends ------------------------------------------------------------------


class Backend(Protocol):
    node: str

    def call(self, op: str, *args: Any) -> Any: ...
    def logs(self, service: str, component: str | None, tail: int | None,
             follow: bool) -> Iterator[bytes]: ...


class RemoteBackend:
    """The agent's HTTP API; ``op`` names map to the routes of design §6."""

    def __init__(self, url: str, token: str | None, node: str = "") -> None:
        from .client import Client

        self.node = node or url
        self.client = Client(url, token)

    def call(self, op: str, *args: Any) -> Any:
        from urllib.parse import quote

        c = self.client
        q = [quote(str(a), safe="") for a in args]
        if op == "deploy":
            return c.post("/v1/services", args[0])
        if op in ("stop", "start", "restart"):
            return c.post(f"/v1/services/{q[0]}/{op}", {})
        if op == "undeploy":
            return c.delete(f"/v1/services/{q[0]}")
        if op == "ps":
            return c.get("/v1/services")
        if op == "status":
            return c.get(f"/v1/services/{q[0]}")
        if op == "health":
            return c.get("/v1/health")
        if op == "edge_list":
            return c.get("/v1/edge-routes")
        if op == "edge_setup":
            return c.post("/v1/edge-routes", args[0])
        if op == "edge_remove":
            return c.delete(f"/v1/edge-routes/{q[0]}")
        raise AssertionError(op)

    def logs(self, service: str, component: str | None, tail: int | None,
             follow: bool) -> Iterator[bytes]:
        from urllib.parse import quote, urlencode

        params = {"component": component or "", "tail": "" if tail is None else tail,
                  "follow": "1" if follow else ""}
        query = urlencode({k: v for k, v in params.items() if v != ""})
        return self.client.stream(f"/v1/services/{quote(service, safe='')}/logs?{query}")


class LocalBackend:
    """The same operations in-process, against this node's registry."""

    def __init__(self, agent: Agent | None = None) -> None:
        if agent is None:
            from .agent import Agent
            from .config import load

            agent = Agent(load(None))
        self.agent = agent
        self.node = agent.node

    def call(self, op: str, *args: Any) -> Any:
        from .servicedef import from_dict

        a = self.agent
        if op == "deploy":
            return a.deploy(from_dict(args[0]))
        if op == "undeploy":
            a.undeploy(args[0])
            return {"service": args[0], "undeployed": True}
        if op in ("stop", "start", "restart", "status"):
            return getattr(a, op)(args[0])
        if op in ("ps", "health"):
            return getattr(a, op)()
        if op == "edge_list":
            return a.edge.list()
        if op == "edge_setup":
            return a.edge.setup(**args[0])
        if op == "edge_remove":
            a.edge.remove(args[0])
            return {"hostname": args[0], "removed": True}
        raise AssertionError(op)

    def logs(self, service: str, component: str | None, tail: int | None,
             follow: bool) -> Iterator[bytes]:
        it: Iterator[bytes] = self.agent.logs(service, component, tail, follow)
        return it


@dataclass
class Ctx:
    agent: str | None
    token_file: str | None
    json: bool
    node: str | None
    local: bool
    _cfg: CLIConfig | None = None

    @property
    def cfg(self) -> CLIConfig:
        if self._cfg is None:
            self._cfg = load_cli_config()
        return self._cfg

    def token(self) -> str | None:
        path = self.token_file or os.environ.get("MCP_TOKEN_FILE") or self.cfg.token_path
        if not path:
            from .config import default_state_dir

            path = str(default_state_dir() / "token")
        from .auth import read_token_file

        file = Path(path).expanduser()
        if not file.exists():
            if self.token_file or os.environ.get("MCP_TOKEN_FILE"):
                raise MCPError(f"token file {path} not found")
            return None  # the agent will answer 401, which says more than a guess here
        return read_token_file(file)  # refuses a token file others can read

    def targets(self) -> list[tuple[str, str]]:
        """(node name, URL) of the agents a command talks to."""
        if self.agent or os.environ.get("MCP_AGENT"):
            url = agent_url(self.agent or os.environ["MCP_AGENT"])
            return [(self.node or "", url)]
        nodes = self.cfg.nodes
        if self.node:
            if self.node not in nodes:
                known = ", ".join(sorted(nodes)) or "none configured"
                raise MCPError(f"unknown node {self.node!r} (known: {known})")
            return [(self.node, agent_url(nodes[self.node]))]
        if nodes:
            return [(n, agent_url(a)) for n, a in nodes.items()]
        return [("", DEFAULT_AGENT)]

    def backends(self) -> list[Backend]:
        if self.local:
            return [LocalBackend()]
        token = self.token()
        return [RemoteBackend(url, token, name) for name, url in self.targets()]

    def backend(self) -> Backend:
        """The single agent a mutating command goes to (first node unless -n)."""
        return self.backends()[0]


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
            raise click.ClickException(str(exc)) from exc


def emit(ctx: Ctx, data: Any, text: Callable[[Any], str]) -> None:
    if ctx.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text(data)
        if out:
            click.echo(out)


# -- formatting ------------------------------------------------------------------


def fmt_uptime(seconds: int | None, state: str) -> str:
    if state != RUNNING or seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def ps_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["SERVICE", "COMPONENT", "NODE", "RUNTIME", "STATE", "VERSION", "UPTIME"],
        [[r["service"], r["component"], r["node"], r["runtime"], r["state"], r["version"],
          fmt_uptime(r.get("uptime_s"), r["state"])] for r in rows],
    )


def ports_text(routes: list[dict[str, Any]]) -> str:
    return ",".join(f"{r['name'] + '=' if r['name'] else ''}127.0.0.1:{r['host_port']}"
                    for r in routes) or "-"


# Keys every component's status has; a runtime's own keys (status_extra) are the rest.
COMMON_STATUS_KEYS = frozenset({
    "service", "component", "node", "runtime", "state", "desired_state", "version",
    "uptime_s", "routes", "image", "drift", "flapping", "ready", "restarts", "exit_code",
    "next_attempt", "spec_drift",
})


def status_value(value: Any) -> str:
    """One value of a runtime's status keys on a single line; ``-`` when empty."""
    if value is None or value == "" or (isinstance(value, list | tuple | dict) and not value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def status_text(st: dict[str, Any]) -> str:
    lines = [f"service {st['service']} on {st['node']}: "
             f"{'active' if st['active'] else 'inactive'}"
             f"{', DRIFT' if st['drift'] else ''}{', FLAPPING' if st['flapping'] else ''}"]
    lines.append(table(
        ["COMPONENT", "RUNTIME", "STATE", "DESIRED", "VERSION", "UPTIME", "RESTARTS", "PORTS",
         "DRIFT"],
        [[c["component"], c["runtime"], c["state"], c["desired_state"], c["version"],
          fmt_uptime(c.get("uptime_s"), c["state"]), str(c.get("restarts", 0)),
          ports_text(c["routes"]),
          "spec" if c.get("spec_drift") else "yes" if c["drift"] else "no"]
         for c in st["components"]],
    ))
    for c in st["components"]:
        if c.get("exit_code") is not None or c.get("next_attempt"):
            lines.append(f"  {c['component']}: last exit code {status_value(c.get('exit_code'))}"
                         f", next attempt {status_value(c.get('next_attempt'))}")
        extra = sorted(set(c) - COMMON_STATUS_KEYS)
        if extra:
            lines.append(f"  {c['component']}: "
                         + " ".join(f"{k}={status_value(c[k])}" for k in extra))
    if st["events"]:
        lines.append("events:")
        for e in st["events"][-10:]:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["time"]))
            detail = f" ({e['detail']})" if e["detail"] else ""
            lines.append(f"  {when} {e['component']}: {e['from']} -> {e['to']}{detail}")
    return "\n".join(lines)


def services_summary(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["service"], []).append(r)
    out = []
    for name, comps in by.items():
        running = sum(c["state"] == RUNNING for c in comps)
        drift = any((c["desired_state"] == RUNNING) != (c["state"] == RUNNING)
                    for c in comps if c["state"] != UNKNOWN)
        out.append([name, comps[0]["node"], f"{running}/{len(comps)}", "yes" if drift else "no"])
    return table(["SERVICE", "NODE", "RUNNING", "DRIFT"], out)


def health_text(h: dict[str, Any]) -> str:
    lines = [f"status: {h['status']}", f"node: {h.get('node', '')}",
             f"containers: {h.get('containers', 0)}"]
    for name, info in sorted(h.get("runtimes", {}).items()):
        extra = " ".join(f"{k}={v}" for k, v in sorted(info.items())
                         if k not in ("available", "reason") and not isinstance(v, dict | list))
        state = "available" if info.get("available") else "unavailable"
        lines.append(f"runtime {name}: {state}{' ' + extra if extra else ''}")
    for reason in h.get("reasons", []):
        lines.append(f"reason: {reason}")
    return "\n".join(lines)


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


def load_definition(ctx: Ctx, arg: str) -> dict[str, Any]:
    from .servicedef import check_name, load_file

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
    backend = ctx.backend()
    st = backend.call("deploy", load_definition(ctx, service))
    if wait:
        st = wait_ready(backend, st["service"], timeout)
    emit(ctx, st, lambda s: f"deployed {s['service']}\n{status_text(s)}")


def not_ready(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in st["components"] if c["desired_state"] == "running" and not c["ready"]]


def wait_ready(backend: Backend, service: str, timeout: float) -> dict[str, Any]:
    """Poll the service's status until every component that should run is ready."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        st: dict[str, Any] = backend.call("status", service)
        waiting = not_ready(st)
        if not waiting:
            return st
        if time.monotonic() >= deadline:
            break
        time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 1.5, 1.0)
    lines = [f"{service}: not ready after {timeout:g} s:"]
    for c in waiting:
        lines.append(f"  {c['component']}: {c['state']}"
                     + (f", exit code {c['exit_code']}" if c.get("exit_code") is not None
                        else ""))
        try:
            tail = b"".join(backend.logs(service, c["component"], 10, False))
        except MCPError as exc:
            tail = f"(logs unavailable: {exc})".encode()
        lines.extend("    | " + ln for ln in tail.decode(errors="replace").splitlines()[-10:])
    raise MCPError("\n".join(lines))


def _lifecycle(op: str, past: str) -> None:
    @cli.command(name=op, help=f"{op.capitalize()} every component of SERVICE.")
    @click.argument("service")
    @json_option
    @pass_ctx
    def command(ctx: Ctx, service: str) -> None:
        st = ctx.backend().call(op, service)
        show = op in ("start", "restart")
        emit(ctx, st, lambda s: f"{past} {service}" + (
            f"\n{status_text(s)}" if show and isinstance(s, dict) else ""))


_lifecycle("stop", "stopped")
_lifecycle("start", "started")
_lifecycle("restart", "restarted")
_lifecycle("undeploy", "undeployed")


@cli.command()
@json_option
@pass_ctx
def ps(ctx: Ctx) -> None:
    """List every component on the node(s)."""
    emit(ctx, [r for b in ctx.backends() for r in b.call("ps")], ps_table)


@cli.command()
@click.argument("service", required=False)
@json_option
@pass_ctx
def status(ctx: Ctx, service: str | None) -> None:
    """Status of SERVICE with drift and events, or a summary of all services."""
    if service:
        emit(ctx, ctx.backend().call("status", service), status_text)
    else:
        emit(ctx, [r for b in ctx.backends() for r in b.call("ps")], services_summary)


@cli.command()
@click.argument("service")
@click.argument("component", required=False)
@click.option("-n", "--tail", "tail", type=click.IntRange(min=0), help="Last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@pass_ctx
def logs(ctx: Ctx, service: str, component: str | None, tail: int | None,
         follow: bool) -> None:
    """Print the output of a component, as its runtime records it."""
    out = sys.stdout.buffer
    with contextlib.suppress(KeyboardInterrupt):
        for chunk in ctx.backend().logs(service, component, tail, follow):
            out.write(chunk)
            out.flush()


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
    results = [b.call("health") for b in ctx.backends()]
    data = results[0] if len(results) == 1 else results
    emit(ctx, data, lambda d: "\n\n".join(health_text(h) for h in results))


def main() -> None:
    cli(prog_name="mcp")
