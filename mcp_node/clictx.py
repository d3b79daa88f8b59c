"""Where the CLI's commands go: its config (``mcp.toml``), the agents it
targets, and the backends that carry an operation there (HTTP) or run it
in-process (``--local``)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import AuthError, MCPError, RemoteError, ValidationError

if TYPE_CHECKING:
    from .client import Client
    from .operations import Operations
    from .problems import Problems

DEFAULT_AGENT = "http://127.0.0.1:9444"
UNIT_STATE_DIR = Path("/var/lib/mcp")   # scripts/mcp-agent.service's --state-dir


# -- CLI configuration ---------------------------------------------------------

TOP_KEYS = ("token_path", "services_dir", "ca", "nodes")
NODE_KEYS = ("name", "address", "token_path", "ca")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: str
    token_path: str = ""   # else the top-level token_path
    ca: str = ""           # CA bundle for an https agent; else the top-level ca


@dataclass
class CLIConfig:
    nodes: dict[str, NodeConfig] = field(default_factory=dict)
    token_path: str = ""
    services_dir: str = ""
    ca: str = ""
    path: str = ""


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mcp"


def _strings(table: dict[str, Any], known: tuple[str, ...], where: str,
             problems: Problems) -> dict[str, str]:
    problems.keys(table, known, where)
    out = {}
    for k, v in table.items():
        if k == "nodes" or k not in known:
            continue
        if isinstance(v, str):
            out[k] = v
        else:
            problems.add(ValidationError("must be a string", f"{where}{k}"))
    return out


def load_cli_config() -> CLIConfig:
    """``mcp.toml``; every unknown key is refused naming it (and the nearest known one),
    so a typo never silently sends commands to the default agent; every error at once."""
    path = Path(os.environ.get("MCP_CLI_CONFIG") or config_home() / "mcp.toml")
    if not path.exists():
        return CLIConfig()
    from .problems import Problems
    from .safetext import loads_toml

    try:
        data = loads_toml(path.read_text(encoding="utf-8"), None)
    except (OSError, ValidationError, UnicodeDecodeError) as exc:
        raise MCPError(f"cannot read {path}: {exc}") from exc
    problems = Problems()
    top = _strings(data, TOP_KEYS, f"{path}: ", problems)
    raw = data.get("nodes", [])
    if not isinstance(raw, list):
        problems.add(ValidationError("must be [[nodes]] tables", f"{path}: nodes"))
        raw = []
    nodes: dict[str, NodeConfig] = {}
    for i, n in enumerate(raw):
        where = f"{path}: nodes[{i}]."
        if not isinstance(n, dict):
            problems.add(ValidationError("must be a table", where.rstrip(".")))
            continue
        bad = len(problems.errors)
        vals = _strings(n, NODE_KEYS, where, problems)
        if len(problems.errors) > bad:
            continue
        if not vals.get("name") or not vals.get("address"):
            problems.add(ValidationError("needs a name and an address", where.rstrip(".")))
        elif vals["name"] in nodes:
            problems.add(ValidationError(f"duplicate node name {vals['name']!r}",
                                         where + "name"))
        else:
            nodes[vals["name"]] = NodeConfig(**vals)
    problems.done()
    return CLIConfig(nodes=nodes, token_path=top.get("token_path", ""),
                     services_dir=top.get("services_dir", ""), ca=top.get("ca", ""),
                     path=str(path))


def services_dir(cfg: CLIConfig) -> Path:
    """Where ``mcp deploy NAME`` finds ``NAME.toml``."""
    return Path(cfg.services_dir).expanduser() if cfg.services_dir \
        else config_home() / "services"


def agent_url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


# -- backends ------------------------------------------------------------------


class Backend(Protocol):
    node: str
    named: bool   # ``node`` is a configured name (shown instead of the agent's host name)

    def call(self, op: str, *args: Any) -> Any: ...
    def logs(self, service: str, component: str | None, tail: int | None,
             follow: bool, since: str | None = None,
             timestamps: bool = False) -> Iterator[bytes]: ...
    def follow_events(self, service: str | None, tail: int) -> Iterator[bytes]: ...


class RemoteBackend:
    """The agent's HTTP API; ``op`` names map to the routes of design §6."""

    def __init__(self, url: str, token: str | None, node: str = "", *,
                 ca_file: str | None = None, token_source: str = "") -> None:
        from .client import Client

        self.node = node or url
        self.token_source = token_source
        self.named = bool(node)   # a configured node name, shown instead of the agent's
        self.client = Client(url, token, ca_file=ca_file)
        self._ca_file = ca_file
        self._side: Client | None = None

    @property
    def side(self) -> Client:
        """A second connection, made on first use: progress is asked while the
        operation's own call holds ``client``."""
        if self._side is None:
            from .client import Client

            self._side = Client(self.client.base_url, self.client.token,
                                ca_file=self._ca_file, timeout=10)
        return self._side

    def call(self, op: str, *args: Any) -> Any:
        try:
            return self._call(op, *args)
        except RemoteError as exc:
            raise self._explained(exc) from exc

    def _explained(self, exc: RemoteError) -> RemoteError:
        """Auth failures say which token went to which node, and how to get a good one."""
        where = f"node {self.node}, token from {self.token_source or 'nowhere'}"
        if exc.status == 401 and self.client.token is None:
            return RemoteError(exc.status, exc.code, no_token_text(self.token_source, self.node))
        if exc.status == 401:
            return RemoteError(exc.status, exc.code, f"{exc.message} ({where}); make one on "
                               "the node with `mcp-agent token add NAME ROLE --output FILE` "
                               "and pass --token-file FILE")
        if exc.status == 403:
            role = exc.message.rsplit("needs ", 1)[-1] if "needs " in exc.message else "ROLE"
            article = "an" if role[:1] in "aeiou" else "a"
            return RemoteError(exc.status, exc.code, f"{exc.message} ({where}); make {article} "
                               f"{role} token on the node with `mcp-agent token add NAME "
                               f"{role} --output FILE` and pass --token-file FILE")
        return exc

    def _call(self, name: str, *args: Any) -> Any:
        """The operation's request, as ``optable`` declares where each argument goes."""
        from urllib.parse import quote

        from .optable import BY_CLI, bind

        op = BY_CLI[name]
        kwargs = bind(op, args)
        path, query, body, whole = op.path, {}, {}, None
        for a in op.args:
            value = kwargs.get(a.name)
            if a.where == "path":
                path = path.replace("{" + a.name + "}", quote(str(value), safe=""))
            elif value is None:         # absent: the agent's default
                continue
            elif a.where == "query":
                query[a.name] = value
            elif a.where == "body":
                body[a.name] = value
            else:
                whole = value
        client = self.side if op.side else self.client
        if op.verb == "GET":
            return client.get(path, params=query or None)
        if op.verb == "DELETE":
            return client.delete(path)
        if op.verb == "PUT":
            return client.put(path, whole)
        return client.post(path, body if whole is None else whole, params=query or None)

    def logs(self, service: str, component: str | None, tail: int | None,
             follow: bool, since: str | None = None,
             timestamps: bool = False) -> Iterator[bytes]:
        from . import clifollow

        if follow:   # across agent restarts and into a replaced component's new run
            return clifollow.logs(self.client, service, component, tail, since, timestamps)
        return self.client.stream(clifollow.logs_path(service, component, tail, False, since,
                                                      timestamps))

    def follow_events(self, service: str | None, tail: int) -> Iterator[bytes]:
        from . import clifollow  # resumed after the last event across agent restarts

        return clifollow.events(self.client, service, tail)


def no_token_text(source: str, node: str) -> str:
    """Why no token went (the default token file is missing), and where the agent's own
    is: ``<state dir>/token``, the state dir being the agent's, which mcp cannot know;
    the systemd unit's is named, or shown when this machine has it."""
    head = (f"token file {source} does not exist, so no token was sent (node {node}); the "
            "agent writes its own operator token to <state dir>/token on first start")
    unit = UNIT_STATE_DIR / "token"
    if unit.exists() and str(unit) != source:
        return (f"{head}, and this machine has one: {unit} (the systemd unit's): pass it "
                f"with --token-file {unit} or $MCP_TOKEN_FILE")
    return (f"{head}, the state dir it runs with (mcp-agent --state-dir, [state] dir; the "
            f"systemd unit's is {UNIT_STATE_DIR}): pass that file with --token-file FILE "
            "or $MCP_TOKEN_FILE")


def local_state_dir(option: str | None) -> str | None:
    """The state dir ``--local`` opens: ``--state-dir``, else ``$MCP_STATE_DIR``, else
    (None) the agent config's ``[state] dir`` or its default, as mcp-agent reads it."""
    return option or os.environ.get("MCP_STATE_DIR") or None


class LocalBackend:
    """The same operations in-process, against this node's registry."""

    def __init__(self, agent: Operations | None = None, state_dir: str | None = None) -> None:
        self._own = agent is None   # built here, so closed here (its podman service too)
        if agent is None:
            from dataclasses import replace

            from .config import load
            from .wiring import build

            cfg = load(None)
            if state_dir:
                cfg = replace(cfg, state=replace(cfg.state, dir=state_dir))
            agent = build(cfg)
            self._state = Path(cfg.state_dir)
        self.agent = agent
        self.node = agent.node
        self.named = False

    def close(self) -> None:
        """Stop what the agent built here started (a ``podman system service --time=0``
        outlives the call otherwise, reparented to init); its workloads keep running."""
        from .daemon import held

        if self._own:
            self._own = False
            # A running daemon's podman service is the one the agent here adopted: closing
            # would stop it under the daemon; the daemon stops it, not this command.
            if not held(self._state):
                self.agent.close()

    def call(self, name: str, *args: Any) -> Any:
        """The operation in-process: the same table, arguments and answer as over HTTP."""
        from .opdecode import KINDS, SPREAD
        from .optable import BY_CLI, answer, bind

        op = BY_CLI[name]
        kwargs: dict[str, Any] = {}
        for a, value in bind(op, args).items():
            arg = next(x for x in op.args if x.name == a)
            if value is None:               # absent: the method's default
                continue
            checked = KINDS[arg.kind](value, arg.name)
            if arg.kind in SPREAD:
                kwargs.update(checked)
            else:
                kwargs[arg.name] = checked
        return answer(op, kwargs, getattr(self.agent, op.call)(**kwargs))

    def logs(self, service: str, component: str | None, tail: int | None,
             follow: bool, since: str | None = None,
             timestamps: bool = False) -> Iterator[bytes]:
        it: Iterator[bytes] = self.agent.logs(service, component, tail, follow, since,
                                              timestamps)
        return it

    def follow_events(self, service: str | None, tail: int) -> Iterator[bytes]:
        return self.agent.event_stream(service, tail)


@dataclass
class Ctx:
    agent: str | None
    token_file: str | None
    json: bool
    node: str | None
    local: bool
    state_dir: str | None = None   # --state-dir, for --local
    _cfg: CLIConfig | None = None
    _local: LocalBackend | None = None

    @property
    def cfg(self) -> CLIConfig:
        if self._cfg is None:
            self._cfg = load_cli_config()
        return self._cfg

    def token_path(self, node: NodeConfig | None = None) -> str:
        path = (self.token_file or os.environ.get("MCP_TOKEN_FILE")
                or (node.token_path if node else "") or self.cfg.token_path)
        if not path:
            from .statedir import default_state_dir

            path = str(default_state_dir() / "token")
        return path

    def token(self, node: NodeConfig | None = None) -> str | None:
        path = self.token_path(node)
        file = Path(path).expanduser()
        if not file.exists():
            if self.token_file or os.environ.get("MCP_TOKEN_FILE") or (node and node.token_path):
                raise MCPError(f"token file {path} not found")
            return None  # the agent will answer 401, which says more than a guess here
        return read_token_file(file)  # refuses a token file others can read

    def targets(self) -> list[NodeConfig]:
        """The agents a command talks to: --agent/$MCP_AGENT, else -n NODE, else every
        configured node, else the default local agent."""
        if self.agent or os.environ.get("MCP_AGENT"):
            url = agent_url(self.agent or os.environ["MCP_AGENT"])
            return [NodeConfig(self.node or "", url)]
        nodes = self.cfg.nodes
        if self.node:
            if self.node not in nodes:
                known = ", ".join(sorted(nodes)) or "none configured"
                raise MCPError(f"unknown node {self.node!r} (known: {known}); nodes are "
                               f"the [[nodes]] of {self.cfg.path or config_home() / 'mcp.toml'}")
            return [nodes[self.node]]
        if nodes:
            return list(nodes.values())
        return [NodeConfig("", DEFAULT_AGENT)]

    def backends(self) -> list[Backend]:
        if self.local:
            if self._local is None:
                self._local = LocalBackend(state_dir=local_state_dir(self.state_dir))
            return [self._local]
        return [RemoteBackend(agent_url(n.address), self.token(n), n.name,
                              ca_file=n.ca or self.cfg.ca or None,
                              token_source=self.token_path(n)) for n in self.targets()]

    def backend(self) -> Backend:
        """The single agent a mutating command goes to (first node unless -n)."""
        return self.backends()[0]

    def close(self) -> None:
        """When the command ends (click's call_on_close): the --local agent, if built."""
        if self._local is not None:
            self._local.close()


def read_token_file(path: Path) -> str:
    """The token in ``path`` (CLI side), refusing a file others can read."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read token file {path}: {exc}") from exc
    if st.st_mode & 0o077:
        raise AuthError(
            f"token file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600"
        )
    token = text.strip()
    if not token:
        raise AuthError(f"token file {path} is empty")
    return token
