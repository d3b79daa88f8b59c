"""Where the CLI's commands go: its config (``mcp.toml``), the agents it
targets, and the backends that carry an operation there (HTTP) or run it
in-process (``--local``)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import MCPError, ValidationError

if TYPE_CHECKING:
    from .agent import Agent

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
        if op == "history":
            return c.get(f"/v1/services/{q[0]}/history")
        if op == "rollback":
            return c.post(f"/v1/services/{q[0]}/rollback",
                          {} if args[1] is None else {"version": args[1]})
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
        if op == "history":
            return a.history(args[0])
        if op == "rollback":
            return a.rollback(args[0], args[1])
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
