"""``mcp-agent``: run the node agent daemon, or manage its API tokens.

With no subcommand it runs the daemon on embedded defaults (design §8):
loopback listener, state under $XDG_STATE_HOME/mcp, and on first start an
operator token written 0600 to ``<state>/token``. Log lines go to stderr as
``key=value`` so they can be grepped and parsed without a schema. Project
errors become messages (exit 1) in ``ErrorGroup``, as in ``mcp``.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

import click

from . import __version__
from .cli import ErrorGroup
from .config import AgentConfig, load
from .errors import MCPError


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… msg`` with the message's own key=value pairs kept verbatim."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def build_config(config_path: Path | None, state_dir: Path | None,
                 listen: str | None) -> AgentConfig:
    cfg = load(config_path)
    if state_dir is not None:
        cfg = replace(cfg, state=replace(cfg.state, dir=str(state_dir)))
    if listen is not None:
        cfg = replace(cfg, server=replace(cfg.server, listen=listen))
    return cfg


@click.group(cls=ErrorGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Agent config TOML (default: $MCP_AGENT_CONFIG, else embedded defaults).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="State directory (overrides [state] dir).")
@click.option("--listen", metavar="ADDR",
              help="HOST:PORT to listen on (overrides [server] listen).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.version_option(__version__, prog_name="mcp-agent")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, state_dir: Path | None,
         listen: str | None, log_level: str) -> None:
    """Run the mcp node agent (no subcommand), or manage its tokens."""
    cfg = build_config(config_path, state_dir, listen)
    ctx.obj = cfg
    if ctx.invoked_subcommand is None:
        setup_logging(log_level)
        run_daemon(cfg)


def run_daemon(cfg: AgentConfig) -> None:
    from .agent import Agent
    from .auth import tokens_path
    from .httpapi import check_listen
    from .server import serve

    log = logging.getLogger("mcp_node.agent_cli")
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        stop.set()

    check_listen(cfg)  # refuse a bad listen address before touching podman or the registry
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    agent = Agent(cfg, monitor=True)
    try:
        srv = serve(agent, cfg)
    except MCPError:
        agent.close()
        raise
    gc.freeze()  # start-up objects never die: keep them out of every later full collection
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    token_file = srv.token_file
    click.echo(f"mcp-agent {__version__} listening on {srv.url}")
    shown = token_file if token_file else f"(none generated; tokens in {tokens_path(cfg)})"
    click.echo(f"token file: {shown}")
    sys.stdout.flush()
    log.info("started version=%s url=%s state_dir=%s pid=%d", __version__, srv.url,
             cfg.state_dir, os.getpid())
    while not stop.wait(3600):
        pass
    log.info("stopping signal=%s", signal.Signals(got[0]).name if got else "?")
    srv.shutdown()
    agent.close()
    log.info("stopped")


@main.group()
def token() -> None:
    """Manage API tokens (stored as SHA-256 hashes only)."""


@token.command("add")
@click.argument("name")
@click.argument("role", type=click.Choice(["reader", "operator", "master"]))
@click.pass_obj
def token_add(cfg: AgentConfig, name: str, role: str) -> None:
    """Create token NAME with ROLE; the token is printed once and never stored."""
    from .auth import TokenStore

    click.echo(TokenStore.for_config(cfg).add(name, role))


@token.command("list")
@click.pass_obj
def token_list(cfg: AgentConfig) -> None:
    """Names and roles of the stored tokens."""
    from .auth import TokenStore

    for t in TokenStore.for_config(cfg).tokens:
        click.echo(f"{t.name}\t{t.role}")
