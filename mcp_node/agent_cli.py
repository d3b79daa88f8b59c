"""``mcp-agent``: run the node agent daemon, or manage its API tokens.

With no subcommand it runs the daemon on embedded defaults (design §8):
loopback listener, state under $XDG_STATE_HOME/mcp, and on first start an
operator token written 0600 to ``<state>/token``. Log lines go to stderr as
``key=value`` so they can be grepped and parsed without a schema. Project
errors become messages (exit 1) in ``ErrorGroup``, as in ``mcp``.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType

import click

from . import __version__, sdnotify
from .cli import ErrorGroup
from .config import AgentConfig, load
from .errors import MCPError, ValidationError
from .safetext import escape_controls


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… msg`` with the message's own key=value pairs kept verbatim.

    Control characters are escaped (``\\xNN``) in every record, whatever its logger: a
    message is one line, and a traceback keeps only its own line breaks, indented under
    its record, so a volume path or a podman answer cannot reach a reader's terminal as
    escapes or forge a line.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} {escape_controls(record.getMessage())}")
        if record.exc_info:
            # Indented under its record: only a record's own first line starts with ts=.
            line += "".join("\n  " + escape_controls(ln) for ln in
                            self.formatException(record.exc_info).split("\n"))
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
@click.option("--adopt", is_flag=True,
              help="Start on a new (missing or empty) registry although workloads with "
                   "this node's owner label run: they become orphans, which reconcile "
                   "removes.")
@click.version_option(__version__, prog_name="mcp-agent")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, state_dir: Path | None,
         listen: str | None, log_level: str, adopt: bool) -> None:
    """Run the mcp node agent (no subcommand), or manage its tokens.

    \b
    Examples:
      mcp-agent                                   # embedded defaults, loopback only
      mcp-agent --config /etc/mcp/agent.toml check-config
      mcp-agent token add ci-bot reader --output ci-bot.tok
    """
    if ctx.invoked_subcommand == "check-config":
        return   # it reads the file itself, to list every error rather than the first
    cfg = build_config(config_path, state_dir, listen)
    ctx.obj = cfg
    if ctx.invoked_subcommand is None:
        setup_logging(log_level)
        run_daemon(cfg, adopt=adopt,
                   reread=lambda: build_config(config_path, state_dir, listen))


def _watchdog_clamp(cfg: AgentConfig, every: float | None) -> AgentConfig:
    """The watchdog is pinged after each monitor round, so a round must come at least
    every ``every`` seconds (half of WatchdogSec): a longer interval is lowered, logged."""
    if every is None or cfg.monitor.interval_s <= every:
        return cfg
    logging.getLogger("mcp_node.agent_cli").warning(
        "monitor.interval_s=%g lowered to %g: the unit's WatchdogSec needs a round that "
        "often", cfg.monitor.interval_s, every)
    return replace(cfg, monitor=replace(cfg.monitor, interval_s=every))


def run_daemon(cfg: AgentConfig, *, adopt: bool = False,
               reread: Callable[[], AgentConfig] | None = None) -> None:
    """Start-up order: state-dir lock (a second agent stops here, having touched nothing),
    listen address checked, registry checked (corrupt: refused), listener bound, a new
    registry checked against the workloads this node owns, first monitor and reconcile
    round, READY=1. Then SIGHUP reloads the config, SIGTERM/SIGINT stop the agent (its
    workloads keep running)."""
    from .auth import tokens_path
    from .daemon import StateLock, check_new_registry, reload_plan
    from .httpapi import check_listen
    from .reconcile import Policy
    from .registry import inspect_file
    from .server import serve
    from .wiring import around, node_agent

    log = logging.getLogger("mcp_node.agent_cli")
    wake = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise MCPError(f"cannot create state dir {cfg.state_dir}: {exc}") from exc
    lock = StateLock(cfg.state_dir)
    lock.acquire()
    try:
        check_listen(cfg)  # a bad listen address is refused before podman or the registry
        services = inspect_file(cfg.state_dir / "registry.db")
        every = sdnotify.watchdog_interval()
        cfg = _watchdog_clamp(cfg, every)

        def ping() -> None:
            sdnotify.notify("WATCHDOG=1")

        # The node's own agent (adoption checks and live reloads act on it), and what
        # serves it: itself, or the fleet member wrapping it.
        agent = node_agent(cfg, reconcile=False, on_round=ping if every else None)
        ops = around(agent)
        try:
            srv = serve(ops, cfg)
        except MCPError:
            ops.close()
            raise
        try:
            check_new_registry(agent, services, adopt)
            ops.start_monitor(reconcile=True)
        except BaseException:
            srv.shutdown()
            ops.close()
            raise
        gc.freeze()  # start-up objects never die: keep them out of every later full collection
        token_file = srv.token_file
        click.echo(f"mcp-agent {__version__} listening on {srv.url}")
        shown = token_file if token_file else f"(none generated; tokens in {tokens_path(cfg)})"
        click.echo(f"token file: {shown}")
        sys.stdout.flush()
        sdnotify.notify(f"READY=1\nSTATUS=listening on {srv.url}\nMAINPID={os.getpid()}")
        log.info("started version=%s url=%s state_dir=%s pid=%d watchdog_s=%s", __version__,
                 srv.url, cfg.state_dir, os.getpid(), every or 0)
        while True:
            wake.wait()
            wake.clear()
            sigs, got[:] = list(got), []
            stop = [s for s in sigs if s != signal.SIGHUP]
            if stop:
                break
            if reread is None:
                continue
            sdnotify.notify("RELOADING=1")
            try:
                fresh = _watchdog_clamp(reread(), every)
            except MCPError as exc:
                log.error("config reload failed, the running config is kept: %s", exc)
                sdnotify.notify("READY=1")
                continue
            run, applied, restart = reload_plan(cfg, fresh)
            for key in applied:
                log.info("config reload key=%s applied=live", key)
            for key in restart:
                log.warning("config reload key=%s applied=no restart_needed=true", key)
            cfg = run
            agent.config, agent.monitor.config, srv.config = run, run.monitor, run
            agent.reconciler.policy = Policy(run.monitor.restart_backoff_max_s,
                                             run.monitor.restart_reset_s)
            agent.monitor.poke()  # a new interval counts from now
            log.info("config reloaded applied=%s restart_needed=%s",
                     ",".join(applied) or "-", ",".join(restart) or "-")
            sdnotify.notify("READY=1")
        log.info("stopping signal=%s", signal.Signals(stop[0]).name)
        sdnotify.notify("STOPPING=1")
        srv.shutdown()
        ops.close()  # workloads keep running: the agent and its helpers stop, a member leaves
    finally:
        lock.release()
    log.info("stopped")


@main.group()
def token() -> None:
    """Manage API tokens (stored as SHA-256 hashes only)."""


OUTPUT = click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to FILE (mode 0600, ready for mcp --token-file) instead of stdout.")
FORCE = click.option("--force", "-f", is_flag=True, help="Overwrite an existing --output FILE.")


def store_options(f: Callable[..., None]) -> Callable[..., None]:
    """``--config`` and ``--state-dir`` after the subcommand too (``mcp-agent token add
    ci-bot reader --state-dir S``): the tokens file is the one the agent with that
    config and state dir reads; the group's own options are the fallback."""
    def run(ctx: click.Context, /, store_config: Path | None, store_state: Path | None,
            **kwargs: object) -> None:
        root = ctx.find_root().params
        if store_config is None and store_state is None:
            cfg = ctx.find_object(AgentConfig)
        else:
            cfg = build_config(store_config or root.get("config_path"),
                               store_state or root.get("state_dir"), None)
        assert cfg is not None
        f(cfg, **kwargs)

    functools.update_wrapper(run, f)   # the command's name and help are f's
    config = click.option("--config", "store_config", help="The agent's config TOML (as "
                          "mcp-agent --config).", type=click.Path(dir_okay=False, path_type=Path))
    state = click.option("--state-dir", "store_state", help="The agent's state directory (as "
                         "mcp-agent --state-dir).", type=click.Path(file_okay=False,
                                                                   path_type=Path))
    return config(state(click.pass_context(run)))


def where_stored(cfg: AgentConfig) -> str:
    """Which file a token command changed, and the agent it belongs to: an agent on
    another state dir (or config) reads another file and refuses the token."""
    from .auth import tokens_path

    default = "" if cfg.state.dir else ", the default: no --config or --state-dir given"
    return f"{tokens_path(cfg)} (state dir {cfg.state_dir}{default})"


def give(token: str, output: Path | None, done: str) -> None:
    """Print the token once, or write it where the CLI will accept it (0600, new file);
    ``done`` says what changed where, on stderr when the token itself is on stdout."""
    if output is None:
        click.echo(done, err=True)
        click.echo(token)
        return
    from .files import atomic_write

    click.echo(done)
    atomic_write(output, (token + "\n").encode(), 0o600)
    click.echo(f"token written to {output} (mode 0600)")


def check_output(output: Path | None, force: bool = False) -> None:
    """Before the token exists anywhere: an --output that would be overwritten."""
    if output is not None and output.exists() and not force:
        raise MCPError(f"{output} exists; remove it or choose another --output")


@token.command("add")
@click.argument("name")
@click.argument("role", type=click.Choice(["reader", "operator", "master"]))
@OUTPUT
@FORCE
@store_options
def token_add(cfg: AgentConfig, name: str, role: str, output: Path | None,
              force: bool) -> None:
    """Create token NAME with ROLE; the token is shown once and only its hash is stored.

    It says which tokens file (and state dir) it changed: the agent that reads that
    file accepts the token from its next request.

    \b
    Example:
      mcp-agent token add ci-bot reader --output ci-bot.tok
      mcp --token-file ci-bot.tok ps
    """
    from .auth import TokenStore

    check_output(output, force)
    tok = TokenStore.for_config(cfg).add(name, role)
    give(tok, output, f"added token {name} ({role}) to {where_stored(cfg)}")


@token.command("remove")
@click.argument("name")
@store_options
def token_remove(cfg: AgentConfig, name: str) -> None:
    """Revoke token NAME (the running agent refuses it from its next request)."""
    from .auth import TokenStore

    TokenStore.for_config(cfg).remove(name)
    click.echo(f"removed token {name} from {where_stored(cfg)}")


@token.command("rotate")
@click.argument("name")
@OUTPUT
@FORCE
@click.option("--grace-s", type=click.IntRange(0, 7 * 86400), default=0, metavar="SECONDS",
              help="Keep the old token working this long (default 0: it stops at once), "
                   "so the clients that hold it can be moved over.")
@store_options
def token_rotate(cfg: AgentConfig, name: str, output: Path | None, force: bool,
                 grace_s: int) -> None:
    """Replace token NAME with a new one of the same role; the old one stops working at
    once, or after --grace-s SECONDS (its hash is kept in the tokens file with the time
    its grace ends; a second rotate ends the first one's grace).

    \b
    Example:
      mcp-agent token rotate ci-bot --output ci-bot.tok --force --grace-s 600
    """
    from .auth import TokenStore, utc_text

    check_output(output, force)
    store = TokenStore.for_config(cfg)
    tok = store.rotate(name, grace_s)
    new = next(t for t in store.tokens if t.name == name)
    old = (f"the old one works until {utc_text(new.previous_until)} (--grace-s {grace_s})"
           if grace_s else "the old one no longer works")
    give(tok, output, f"rotated token {name} ({new.role}) in {where_stored(cfg)}; {old}")


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Check the config (--config or $MCP_AGENT_CONFIG) and list every error in it.

    \b
    Example:
      mcp-agent --config /etc/mcp/agent.toml check-config
    """
    from .config import parse, read
    from .fleetsecrets import check_key_file
    from .registries import check_files

    path = ctx.parent.params.get("config_path") if ctx.parent else None
    path = path or (Path(os.environ["MCP_AGENT_CONFIG"]) if os.environ.get(
        "MCP_AGENT_CONFIG") else None)
    if path is None:
        click.echo("no config file: the embedded defaults apply")
        return
    cfg, errors = parse(read(path))
    errors += check_files(cfg.registries)   # the registries' files: there, parsed, 0600
    errors += check_key_file(cfg.secrets)   # the fleet key: there, 0600, 32 bytes
    errors += start_refusals(cfg)           # what serve() would refuse
    warnings = runtime_problems(cfg)        # what would leave a runtime without its part
    for line in warnings:
        click.echo(f"{path}: warning: {line}", err=True)
    if errors:
        for err in errors:
            click.echo(f"{path}: {err}", err=True)
        raise MCPError(f"{path}: {len(errors)} error(s)")
    click.echo(f"{path}: ok" + (f" ({len(warnings)} warning(s))" if warnings else ""))


def start_refusals(cfg: AgentConfig) -> list[ValidationError]:
    """The listen address and TLS files as the agent's start checks them."""
    from .httpapi import check_listen, tls_context

    out = []
    for step in (check_listen, tls_context):
        try:
            step(cfg)
        except ValidationError as exc:
            out.append(exc)
    return out


def runtime_problems(cfg: AgentConfig) -> list[str]:
    """Each runtime's own judgement of what the config asks of it."""
    from .runtime import RUNTIME_NAMES, load_runtime

    out = []
    for name in RUNTIME_NAMES:
        try:
            out.extend(load_runtime(name).config_problems(cfg))
        except ImportError:   # its module cannot load: the start says so, as health does
            continue
    from .servicenet import bridge_problem

    if bridge_problem(cfg.network.mode):   # the agent starts, its services on user-mode
        out.append(f"network.mode: {bridge_problem(cfg.network.mode)}; services would "
                   "get user-mode networking and health would say degraded")
    return out


@token.command("list")
@store_options
def token_list(cfg: AgentConfig) -> None:
    """Names and roles of the stored tokens."""
    from .auth import TokenStore, utc_text, wall_clock

    now = wall_clock()
    for t in TokenStore.for_config(cfg).tokens:
        grace = f"\told token until {utc_text(t.previous_until)}" if t.previous_live(now) else ""
        click.echo(f"{t.name}\t{t.role}{grace}")


@main.group()
def secrets() -> None:
    """The node's secret store (values sealed with AES-256-GCM under its key file)."""


@secrets.command("rotate-key")
@click.pass_obj
def secrets_rotate_key(cfg: AgentConfig) -> None:
    """Seal every stored secret again under a new key, in one transaction, and replace
    the key file ([secrets] key_file, default <state>/secrets.key) with it."""
    from .registry import Registry
    from .secretuse import open_store

    registry = Registry(cfg.state_dir / "registry.db")
    try:
        store = open_store(cfg, registry)
        count = store.rotate()
    finally:
        registry.close()
    click.echo(f"rotated the secret key: {count} stored version(s) sealed again; "
               f"new key in {store.key_path}")


@secrets.command("new-fleet-key")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def secrets_new_fleet_key(path: Path) -> None:
    """Make a fleet key in PATH (32 random bytes in base64, mode 0600; an existing file
    is kept): once per fleet, then copied to every node out of band and named in each
    node's [secrets] fleet_key_file."""
    from .secretstore import KEY_BYTES, write_key

    try:
        write_key(path, os.urandom(KEY_BYTES), exclusive=True)
    except FileExistsError as exc:
        raise MCPError(f"{path} exists; a fleet has one key: copy that one") from exc
    except OSError as exc:
        raise MCPError(f"cannot write {path}: {exc.strerror}") from exc
    click.echo(f"fleet key written to {path} (0600): copy it to every node (scp -p, mode "
               "0600) and set [secrets] fleet_key_file to it there")
