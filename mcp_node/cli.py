"""The operator CLI, ``mcp`` (design §7).

Every command runs against a ``Backend`` (clictx): the agent over HTTP
(default), or the modules in-process with ``--local``. Domain errors come up
from either and become ``click.ClickException`` in one place,
``ErrorGroup.invoke`` (exit 1, message on stderr); usage errors stay click's
(exit 2).

An operator waits for start-up on every call, so the root group knows each
command's name and one-line help (``COMMANDS``) and imports the module that
defines it only when that command runs or completes: ``mcp ps`` builds no
deploy command and never imports the definition parser. Heavy modules are
imported on first use too.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from .clictx import DEFAULT_AGENT, Backend, Ctx
from .errors import MCPError
from .safetext import for_terminal

if TYPE_CHECKING:
    from .multinode import Answers

F = TypeVar("F", bound=Callable[..., Any])

# Command name -> ("module:attribute" under mcp_node, the first paragraph of its help).
# `mcp --help` lists these without importing a module; tests/test_cli.py checks each
# help against the command's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "deploy": ("clideploy:deploy",
               "Deploy SERVICE (a name in the services dir) or a definition FILE."),
    "validate": ("clideploy:validate",
                 "Check a definition FILE (or - for stdin) without deploying it."),
    "plan": ("clideploy:plan_cmd",
             "Show what deploying SERVICE|FILE would create, replace, start, stop or remove."),
    "history": ("clideploy:history",
                "List the deployed versions of SERVICE, oldest first (* marks the current "
                "one)."),
    "rollback": ("clideploy:rollback",
                 "Deploy VERSION of SERVICE again (default: the version before the current "
                 "one)."),
    "stop": ("cliservice:stop", "Stop every component of SERVICE, or only COMPONENT."),
    "start": ("cliservice:start", "Start every component of SERVICE, or only COMPONENT."),
    "restart": ("cliservice:restart", "Restart every component of SERVICE, or only COMPONENT."),
    "undeploy": ("cliservice:undeploy", "Remove every component of SERVICE and its record."),
    "ps": ("cliread:ps", "List every component on the node(s)."),
    "status": ("cliread:status",
               "Status of SERVICE with drift and events, or a summary of all services."),
    "events": ("cliread:events",
               "State changes of every service, or of SERVICE: what changed, when and why."),
    "logs": ("cliread:logs", "Print the output of a component, or of all, as recorded."),
    "node": ("cliread:node", "Node-level commands."),
    "nodes": ("clifleet:nodes",
              "Every node of the fleet (fleet mode), from etcd, as any agent sees it."),
    "drain": ("clifleet:drain",
              "Cordon NODE and move its unpinned services to other nodes (fleet mode)."),
    "uncordon": ("clifleet:uncordon",
                 "Let placements use NODE again after a drain (fleet mode)."),
    "edge": ("cliedge:edge", "Edge routes: public TLS hostnames forwarded to Tailnet backends."),
    "secret": ("clisecret:secret",
               "Secrets: values given to components as files or env, never shown again."),
}


class ErrorGroup(click.Group):
    """The root command group: reports project errors as one ``Error: ...`` line, and
    loads a command's module on first use (click's lazy group pattern).

    Subcommands (nested groups too) run inside the root's ``invoke``, so this
    is the one place an ``MCPError`` becomes a ``ClickException``: exit 1 with
    the message on stderr. Click's own usage errors pass through (exit 2).
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MCPError as exc:
            raise click.ClickException(for_terminal(str(exc))) from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attr = self.lazy[cmd_name][0].partition(":")
            cmd = getattr(importlib.import_module(f"mcp_node.{module}"), attr)
            assert isinstance(cmd, click.Command) and cmd.name == cmd_name, cmd
            self.add_command(cmd)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.NoSuchCommand as exc:   # "Did you mean" from every name, loaded or not
            raise click.NoSuchCommand(exc.command_name, possibilities=self.list_commands(ctx),
                                      ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, with the help of commands not loaded from ``lazy``."""
        from gettext import gettext as _

        commands = [(name, self.commands.get(name) or click.Command(name, help=self.lazy[name][1]))
                    for name in self.list_commands(ctx)]
        commands = [(name, cmd) for name, cmd in commands if not cmd.hidden]
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _cmd in commands)
            with formatter.section(_("Commands")):
                formatter.write_dl([(name, cmd.get_short_help_str(limit))
                                    for name, cmd in commands])


def emit(ctx: Ctx, data: Any, text: Callable[[Any], str]) -> None:
    if ctx.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text(data)
        if out:
            click.echo(for_terminal(out))   # what the agent relays must not drive the terminal


# -- what the command modules share -----------------------------------------------------


def pass_ctx(fn: F) -> F:
    return click.pass_obj(fn)  # type: ignore[return-value]


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Ctx).json = True  # type: ignore[union-attr]


def json_option(fn: F) -> F:
    """``--json`` after the command too (``mcp ps --json``), same as before it."""
    return click.option("--json", is_flag=True, expose_value=False, callback=_set_json,
                        help="Print JSON.")(fn)


def service_backend(backends: list[Backend], service: str) -> Backend:
    """The node a per-service command goes to: the one -n names (or the only one), else
    the one that has the service; a service no node has yet needs -n on a fleet."""
    if len(backends) == 1:   # nothing to look up, so the fan-out is not even imported
        return backends[0]
    from .multinode import locate

    return locate(backends, service)


def partial(answers: Answers) -> None:
    """After a fleet read's output: say which nodes did not answer, exit 4."""
    if answers.failed:
        from .multinode import PARTIAL_EXIT

        for line in answers.failures_text():
            click.echo(for_terminal(f"warning: {line}"), err=True)
        sys.exit(PARTIAL_EXIT)


# -- the root group ---------------------------------------------------------------------


@click.group(cls=ErrorGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mcp")
@click.option("--agent", metavar="URL", help="Agent URL (default: mcp.toml nodes, $MCP_AGENT, "
              f"or {DEFAULT_AGENT}).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-n", "--node", metavar="NODE", help="Node name from mcp.toml [[nodes]].")
@click.option("--local", is_flag=True, help="Run in-process against the local registry.")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="With --local: the agent's state directory (default: $MCP_STATE_DIR, "
                   "else [state] dir of $MCP_AGENT_CONFIG, else mcp-agent's default).")
@click.pass_context
def cli(ctx: click.Context, agent: str | None, token_file: str | None, as_json: bool,
        node: str | None, local: bool, state_dir: str | None) -> None:
    """Operate mcp_node agents: deploy and manage services, edge routes, node health."""
    ctx.obj = Ctx(agent, token_file, as_json, node, local, state_dir)
    ctx.call_on_close(ctx.obj.close)   # the --local agent's own podman service ends here


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
